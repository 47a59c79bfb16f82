"""The training pass in row groups (`train.pass_tokens`): the same loss, log-probs and every
gradient as full logits; no group holds more positions than asked; the policy hands its
own old log-probs to the pass only while the weights are unchanged; a row-separable loss
needs no no-grad pass before the groups."""

import pytest
import torch

from longrl.policy.text import TextPolicy
from longrl.streambp import logprobs as streambp
from longrl.streambp.logprobs import loss_and_backward, make_batch, row_groups, row_separable, sequence_logprobs


def _batch(vocab, lengths=((3, 4), (5, 1), (2, 7), (4, 0), (1, 9), (6, 3)), seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(2, vocab, (r,), generator=g).tolist() for _, r in lengths]
    return make_batch(prompts, responses, pad_id=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_update(loss, logp, g, loss_ref, logp_ref, g_ref):
    """The loss, log-probs and every parameter's gradient of a pass equal the reference's (float64)."""
    assert torch.allclose(loss, loss_ref, rtol=1e-12, atol=0)
    assert torch.allclose(logp, logp_ref, rtol=1e-10, atol=1e-12)
    assert g.keys() == g_ref.keys() and len(g) > 0
    for name in g_ref:
        err = (g[name] - g_ref[name]).norm() / g_ref[name].norm().clamp_min(1e-30)
        assert err < 1e-10, f"{name}: relative error {err:.2e}"


def test_groups_respect_the_budget_and_cover_every_trained_row():
    b = _batch(50)  # real lengths 7, 6, 9, 4 (no response: never run), 10, 9
    for budget in (1, 10, 18, 20, 40, 10_000):
        groups = row_groups(b, budget)
        rows = sorted(i for g in groups for i in g.tolist())
        assert rows == [0, 1, 2, 4, 5]  # row 3 has no target to train
        for g in groups:
            sub = b[g]
            assert len(g) == 1 or sub.input_ids.numel() <= budget
    assert [g.tolist() for g in row_groups(b, 18)] == [[1, 0], [2, 5], [4]]  # by length, 2 x 9 = 18 fits
    assert [g.tolist() for g in row_groups(b, 10_000)] == [[1, 0, 2, 5, 4]]


@pytest.mark.parametrize("budget", [1, 14, 25])
@pytest.mark.parametrize("handed", [False, True])
def test_row_groups_match_full_logits_float64(tiny_qwen, budget, handed):
    model = tiny_qwen(dtype=torch.float64)
    batch = _batch(50)
    w = torch.randn(batch.mask.shape, dtype=torch.float64)

    def loss_fn(logp):  # couples all rows (a sequence-level non-linearity, then a batch sum)
        return ((logp * w * batch.mask).sum(1).tanh() ** 2).sum() / 3

    loss_ref, _, logp_ref = loss_and_backward(model, batch, loss_fn, mode="standard", temperature=0.7)
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    given = sequence_logprobs(model, batch, 3, 0.7, max_tokens=budget) if handed else None
    loss, _, logp = loss_and_backward(model, batch, loss_fn, mode="chunked", chunk=3, temperature=0.7,
                                      max_tokens=budget, logprobs=given)
    g = _grads(model)
    _assert_same_update(loss, logp, g, loss_ref, logp_ref, g_ref)


def _spy(monkeypatch):
    """(grad enabled, positions) of every forward of the final hidden states, as they run."""
    seen = []
    final_hidden = streambp.final_hidden

    def spy(m, ids):
        seen.append((torch.is_grad_enabled(), ids.numel()))
        return final_hidden(m, ids)

    monkeypatch.setattr(streambp, "final_hidden", spy)
    return seen


def test_row_groups_never_run_more_positions_than_the_budget(tiny_qwen, monkeypatch):
    model = tiny_qwen()
    batch = _batch(50)
    seen = _spy(monkeypatch)
    loss_and_backward(model, batch, lambda lp: lp.sum(), mode="chunked", chunk=4, max_tokens=20)
    assert any(grad for grad, _ in seen) and any(not grad for grad, _ in seen)  # no-grad pass, then the groups
    assert all(n <= 20 for _, n in seen)
    seen.clear()
    loss_and_backward(model, batch, lambda lp: lp.sum(), mode="chunked", chunk=4, max_tokens=0)
    assert seen == [(True, batch.input_ids.numel())]  # 0: one forward, as before


def test_policy_hands_its_old_logprobs_only_under_the_same_weights(tiny_qwen, monkeypatch):
    model = tiny_qwen()
    policy = TextPolicy(model, None, chunk=4, pass_tokens=20)
    batch = _batch(50)
    given = []
    real = streambp.loss_and_backward

    def spy(*a, logprobs=None, **k):
        given.append(logprobs)
        return real(*a, logprobs=logprobs, **k)

    monkeypatch.setattr(streambp, "loss_and_backward", spy)
    old = policy.logprobs(batch, [])
    policy.loss_and_backward(batch, [], lambda lp: lp.sum())
    assert given[-1] is old  # same batch, same weights: no second no-grad pass
    policy.loss_and_backward(batch[torch.tensor([0, 1, 2])], [], lambda lp: lp.sum())
    assert given[-1] is None  # another batch
    policy.loss_and_backward(batch, [], lambda lp: lp.sum(), temperature=0.5)
    assert given[-1] is None  # another temperature
    policy.logprobs(batch, [], model=tiny_qwen(seed=5))  # a reference model's log-probs are not the policy's
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # the weights move
    policy.loss_and_backward(batch, [], lambda lp: lp.sum())
    assert given[-1] is None
    again = policy.logprobs(batch, [])
    assert not torch.equal(again, old)
    policy.loss_and_backward(batch, [], lambda lp: lp.sum())
    assert given[-1] is again
    policy.start_step(1)
    policy.loss_and_backward(batch, [], lambda lp: lp.sum())
    assert given[-1] is None


# ---- a row-separable loss (`streambp.logprobs.row_separable`): the same loss, log-probs and
# gradients as full logits, with no no-grad pass before the groups ----------------------------


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
    assert m["rows/mean"] == pytest.approx(m_ref["rows/mean"], rel=1e-12)  # metrics of the whole batch
    _assert_same_update(loss, logp, g, loss_ref, logp_ref, g_ref)


def test_an_unmarked_loss_still_runs_the_no_grad_pass_first(tiny_qwen, monkeypatch):
    model = tiny_qwen()
    batch = _batch(50)
    seen = _spy(monkeypatch)
    loss_and_backward(model, batch, lambda lp: lp.sum(), mode="chunked", chunk=4, max_tokens=14)
    assert not seen[0][0] and any(grad for grad, _ in seen)  # whole-batch log-probs first, then the groups
