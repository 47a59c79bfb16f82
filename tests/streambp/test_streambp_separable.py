"""A row-separable loss in the row-grouped training pass (`streambp.logprobs.row_separable`):
the same loss, log-probs and gradients as full logits, with no no-grad pass before the groups."""

import pytest
import torch

from longrl.streambp import logprobs as streambp
from longrl.streambp.logprobs import loss_and_backward, make_batch, row_separable


def _batch(vocab, lengths=((3, 4), (5, 1), (2, 7), (4, 0), (1, 9), (6, 3)), seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(2, vocab, (r,), generator=g).tolist() for _, r in lengths]
    return make_batch(prompts, responses, pad_id=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _spy(monkeypatch):
    seen = []
    final_hidden = streambp.final_hidden

    def spy(m, ids):
        seen.append((torch.is_grad_enabled(), ids.numel()))
        return final_hidden(m, ids)

    monkeypatch.setattr(streambp, "final_hidden", spy)
    return seen


@pytest.mark.parametrize("budget", [1, 14, 25])
def test_separable_groups_match_full_logits_float64(tiny_qwen, budget, monkeypatch):
    model = tiny_qwen(dtype=torch.float64)
    batch = _batch(50)
    w = torch.randn(batch.mask.shape, dtype=torch.float64)

    def loss_fn(logp):  # a sum over rows of a non-linear function of each row (and a metric of all)
        per_row = (logp * w * batch.mask).sum(1)  # [B]
        return (per_row.tanh() ** 2).sum() / 3, {"rows/mean": float(per_row.detach().mean())}

    loss_ref, m_ref, logp_ref = loss_and_backward(model, batch, loss_fn, mode="standard", temperature=0.7)
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    seen = _spy(monkeypatch)
    loss, m, logp = loss_and_backward(model, batch, row_separable(loss_fn), mode="chunked", chunk=3,
                                      temperature=0.7, max_tokens=budget)
    g = _grads(model)
    assert seen and all(grad for grad, _ in seen)  # no no-grad pass: every forward is a group's own
    assert len(seen) == len(streambp.row_groups(batch, budget))
    assert torch.allclose(loss, loss_ref, rtol=1e-12, atol=0)
    assert m["rows/mean"] == pytest.approx(m_ref["rows/mean"], rel=1e-12)  # metrics of the whole batch
    assert torch.allclose(logp, logp_ref, rtol=1e-10, atol=1e-12)
    assert g.keys() == g_ref.keys() and len(g) > 0
    for name in g_ref:
        err = (g[name] - g_ref[name]).norm() / g_ref[name].norm().clamp_min(1e-30)
        assert err < 1e-10, f"{name}: relative error {err:.2e}"


def test_an_unmarked_loss_still_runs_the_no_grad_pass_first(tiny_qwen, monkeypatch):
    model = tiny_qwen()
    batch = _batch(50)
    seen = _spy(monkeypatch)
    loss_and_backward(model, batch, lambda lp: lp.sum(), mode="chunked", chunk=4, max_tokens=14)
    assert not seen[0][0] and any(grad for grad, _ in seen)  # whole-batch log-probs first, then the groups
