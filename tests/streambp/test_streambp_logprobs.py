"""The chunked LM-head path gives the same loss, log-probs and every gradient as full logits."""

import pytest
import torch

from longrl.streambp.logprobs import TokenBatch, loss_and_backward, make_batch, sequence_logprobs


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (3, 5, 2)]
    responses = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (4, 1, 7)]
    return make_batch(prompts, responses, pad_id=0)


def test_make_batch_masks_exactly_the_response_targets():
    b = make_batch([[5, 6]], [[7, 8, 9]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert b.targets.tolist() == [[6, 7, 8, 9, 0]]
    assert b.mask.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["chunked", "checkpoint", "streambp"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_matches_full_logits_float64(tiny_qwen, mode, chunk, temperature):
    model = tiny_qwen(dtype=torch.float64)
    batch = _batch(50)
    w = torch.randn(batch.mask.shape, dtype=torch.float64)

    def loss_fn(logp):  # a non-linear function of the log-probs, like GSPO's
        return ((logp * w * batch.mask).sum(1).tanh() ** 2).sum() / 3

    loss_ref, _, logp_ref = loss_and_backward(model, batch, loss_fn, mode="standard", temperature=temperature)
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    loss, _, logp = loss_and_backward(model, batch, loss_fn, mode=mode, chunk=chunk, temperature=temperature)
    g = _grads(model)
    assert torch.allclose(loss, loss_ref, rtol=1e-12, atol=0)
    assert torch.allclose(logp.double(), logp_ref, rtol=1e-10, atol=1e-12)
    assert g.keys() == g_ref.keys() and len(g) > 0
    for name in g_ref:
        err = (g[name] - g_ref[name]).norm() / g_ref[name].norm().clamp_min(1e-30)
        assert err < 1e-10, f"{name}: relative error {err:.2e}"


def test_sequence_logprobs_zero_outside_mask(tiny_qwen):
    model = tiny_qwen()
    batch = _batch(50, seed=1)
    logp = sequence_logprobs(model, batch, chunk=4)
    assert (logp[batch.mask == 0] == 0).all()
    assert (logp[batch.mask != 0] < 0).all()


def test_row_selection_trims_padding_only():
    b = make_batch([[5, 6], [1]], [[7], [2, 3, 4, 5]], pad_id=0)
    sub = b[torch.tensor([0])]
    assert sub.input_ids.tolist() == [[5, 6, 7]] and sub.mask.sum() == 1
    assert isinstance(sub, TokenBatch)
