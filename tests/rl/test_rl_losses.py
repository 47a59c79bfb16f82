"""Tests for longrl.rl.losses: hand-worked values, brute-force loops in float64,
micro-batch equivalence, and exactly-zero gradients at masked positions."""

import math

import pytest
import torch

from longrl.rl.losses import aggregate, kl_penalty, loss_normalizer, policy_loss, sft_loss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
LN2 = math.log(2.0)


# ---------------------------------------------------------------- helpers


def _random_batch(seed, B=6, T=9, lengths=None):
    """float64 inputs with uneven lengths (including an empty and a full row)."""
    gen = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = [0, T] + torch.randint(1, T + 1, (B - 2,), generator=gen).tolist()
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # [B, T] bool
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)  # ratios well outside the clip range too
    ref = logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    w = torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    return logp, old, ref, adv, mask, w


def _kl_brute(lp, ref, est):
    r = ref - lp
    return {"k1": -r, "k2": 0.5 * r * r, "k3": torch.exp(r) - 1 - r}[est]


def _ppo_token_brute(r, A, clip_low, clip_high):
    """-min(r A, clip(r) A) written case by case: for A > 0 the ratio is capped
    at 1 + clip_high (a constant, no gradient), for A < 0 floored at 1 - clip_low."""
    if A > 0 and r.item() > 1 + clip_high:
        return -(1 + clip_high) * A + 0 * r
    if A < 0 and r.item() < 1 - clip_low:
        return -(1 - clip_low) * A + 0 * r
    return -r * A


def _brute_loss(logp, old, adv, mask, *, kind, loss_agg, normalizer, clip_low=0.2, clip_high=0.28,
                ref=None, kl_coef=0.0, kl_estimator="k3", w=None):
    """Loops over sequences and tokens. GSPO is written as the paper's sequence-level
    objective, -min(s_i A_i, clip(s_i) A_i) with s_i = exp(mean_t(logp - old)), weighted
    by 1 (seq-mean-token-mean) or n_i (the other modes), not in per-token form."""
    B, T = logp.shape
    total = logp.sum() * 0
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        n = len(toks)
        if n == 0:
            continue
        A = adv[i].item()
        seq = total * 0
        if kind == "ppo":
            for t in toks:
                term = _ppo_token_brute(torch.exp(logp[i, t] - old[i, t]), A, clip_low, clip_high)
                seq = seq + term * (1.0 if w is None else w[i, t])
        else:
            s = torch.exp(sum(logp[i, t] - old[i, t] for t in toks) / n)
            seq = seq + n * _ppo_token_brute(s, A, clip_low, clip_high)
        if kl_coef > 0:
            for t in toks:
                seq = seq + kl_coef * _kl_brute(logp[i, t], ref[i, t], kl_estimator)
        total = total + (seq / n if loss_agg == "seq-mean-token-mean" else seq)
    return total / normalizer


# ---------------------------------------------------------------- normaliser / aggregate


def test_loss_normalizer_hand_worked():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
    assert loss_normalizer(mask, "token-mean") == 3.0  # 3 valid tokens
    assert loss_normalizer(mask, "seq-mean-token-mean") == 2.0  # row 1 is empty: not counted
    assert loss_normalizer(mask.bool(), "seq-mean-token-sum") == 2.0
    assert loss_normalizer(torch.zeros(2, 3), "token-mean") == 1.0  # never 0
    with pytest.raises(ValueError, match="unknown loss_agg"):
        loss_normalizer(mask, "sum")


def test_aggregate_hand_worked():
    # per_token [[1,2,3],[4,5,6]], mask [[1,1,0],[1,0,0]]:
    #   token-mean, D=3:          (1+2+4)/3 = 7/3
    #   seq-mean-token-mean, D=2: (3/2 + 4/1)/2 = 2.75
    #   seq-mean-token-sum, D=2:  (3 + 4)/2 = 3.5
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(x, mask, "token-mean", 3.0).item() == pytest.approx(7 / 3)
    assert aggregate(x, mask, "seq-mean-token-mean", 2.0).item() == pytest.approx(2.75)
    assert aggregate(x, mask, "seq-mean-token-sum", 2.0).item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="normalizer"):
        aggregate(x, mask, "token-mean", 0.0)


@pytest.mark.parametrize("loss_agg", AGGS)
def test_aggregate_matches_brute_force(loss_agg):
    logp, _, _, _, mask, _ = _random_batch(1)
    D = loss_normalizer(mask, loss_agg)
    want = 0.0
    for i in range(mask.shape[0]):
        vals = [logp[i, t].item() for t in range(mask.shape[1]) if mask[i, t]]
        if vals:
            want += sum(vals) / len(vals) if loss_agg == "seq-mean-token-mean" else sum(vals)
    assert abs(aggregate(logp, mask, loss_agg, D).item() - want / D) < 1e-10


# ---------------------------------------------------------------- KL


def test_kl_hand_worked():
    # logp = log 0.5, ref = log 0.25 -> r = ref - logp = -ln 2
    #   k1 = ln 2 = 0.693147;  k2 = (ln 2)^2 / 2 = 0.240227;  k3 = e^{-ln 2} - 1 + ln 2 = 0.193147
    lp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(LN2, abs=1e-12)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * LN2**2, abs=1e-12)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + LN2, abs=1e-12)
    # equal distributions: every estimator is 0
    for est in ("k1", "k2", "k3"):
        assert kl_penalty(lp, lp, est).item() == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, "k4")


P = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)  # pi
Q = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.2], dtype=torch.float64)  # ref


def test_k1_k3_exact_expectation_is_kl():
    """sum_y pi(y) k(y) == KL(pi || ref) exactly for the unbiased estimators."""
    kl = (P * (P / Q).log()).sum().item()
    for est in ("k1", "k3"):
        k = kl_penalty(P.log()[None], Q.log()[None], est)[0]
        assert abs((P * k).sum().item() - kl) < 1e-12


def test_k1_k3_monte_carlo_unbiased():
    kl = (P * (P / Q).log()).sum().item()  # 0.5183
    reverse = (Q * (Q / P).log()).sum().item()  # 0.6218: what a sign-flipped formula estimates
    n = 200_000
    y = torch.multinomial(P, n, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, ref = P.log()[y][None], Q.log()[y][None]  # [1, n]
    for est in ("k1", "k3"):
        k = kl_penalty(lp, ref, est)[0]
        tol = 4 * k.std().item() / math.sqrt(n)  # about 0.007 for k1
        assert abs(k.mean().item() - kl) < tol, est
        assert abs(reverse - kl) > 10 * tol  # the test can tell the two directions apart
    k2 = kl_penalty(lp, ref, "k2")[0]
    assert (k2 >= 0).all() and abs(k2.mean().item() - kl) > 0.1  # k2 is biased at this distance


# ---------------------------------------------------------------- policy loss: hand-worked


def test_ppo_hand_worked_with_clip_fractions():
    # ratios [1.5, 0.5, 1.0] in both rows, plus a masked 4th token with ratio e^3.
    # row 0, A = +1: clip -> [1.28, 0.8, 1.0]; min(rA, clip A) = [1.28, 0.5, 1.0]   (t0 clipped high)
    # row 1, A = -1: rA = [-1.5, -0.5, -1], clip*A = [-1.28, -0.8, -1]; min = [-1.5, -0.8, -1] (t1 clipped low)
    # per-token loss: row 0 [-1.28, -0.5, -1.0], row 1 [1.5, 0.8, 1.0]; sum 0.52; token-mean D=6 -> 0.086667
    # d loss / d logp_t = -r A / 6 where unclipped, 0 where clipped:
    #   row 0 [0, -0.5, -1.0]/6;  row 1 [1.5, 0, 1.0]/6
    log_ratio = torch.tensor([math.log(1.5), math.log(0.5), 0.0, 3.0], dtype=torch.float64)
    old = torch.full((2, 4), -1.0, dtype=torch.float64)
    logp = (old + log_ratio).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, m = policy_loss(logp, old, adv, mask, normalizer=loss_normalizer(mask, "token-mean"))
    assert loss.item() == pytest.approx(0.52 / 6, abs=1e-12)
    loss.backward()
    want = torch.tensor([[0, -0.5, -1.0, 0], [1.5, 0, 1.0, 0]], dtype=torch.float64) / 6
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-12)
    assert m["clip/frac_high"] == pytest.approx(1 / 6)
    assert m["clip/frac_low"] == pytest.approx(1 / 6)
    assert m["ratio/mean"] == pytest.approx(1.0)  # (1.5 + 0.5 + 1) * 2 / 6; masked e^3 ignored
    assert m["loss/policy"] == pytest.approx(0.52 / 6)
    assert m["tokens/valid"] == 6.0
    assert "loss/kl" not in m


def test_gspo_hand_worked_clips_per_sequence():
    # row 0: log-ratios [ln 2, 0]     -> s = exp(ln2 / 2) = sqrt 2 = 1.41421 > 1.28
    # row 1: log-ratios [ln 2, -ln 2] -> s = 1 (PPO would clip token 0 of this row; GSPO does not)
    # A = [+1, +1], seq-mean-token-mean, D = 2 sequences:
    #   row 0 clipped high: per-token loss -1.28, zero gradient
    #   row 1: per-token loss -1, d/dlogp_t = -s A / (n_i D) = -1 / 4
    #   loss = (-1.28 - 1) / 2 = -1.14
    old = torch.zeros(2, 2, dtype=torch.float64)
    logp = torch.tensor([[LN2, 0.0], [LN2, -LN2]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 2)
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    loss, m = policy_loss(logp, old, adv, mask, normalizer=2.0, loss_agg="seq-mean-token-mean", kind="gspo")
    assert loss.item() == pytest.approx(-1.14, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0, 0], [-0.25, -0.25]], dtype=torch.float64))
    assert m["clip/frac_high"] == 0.5  # both tokens of row 0, none of row 1
    assert m["ratio/mean"] == pytest.approx((2 * math.sqrt(2) + 2) / 4)
    _, m_ppo = policy_loss(logp, old, adv, mask, normalizer=2.0)
    assert m_ppo["clip/frac_high"] == 0.5  # PPO: token 0 of each row


def test_kl_and_is_weights_hand_worked():
    # one token, ratio 1, A = 2, w = 0.5: pg = -1 * 2 * 0.5 = -1
    # ref = logp - ln 2 -> r = -ln 2, k1 = ln 2; kl_coef 0.1 -> +0.1 ln 2
    # d/dlogp: pg -> -r A w = -1;  k1 = logp - ref -> +0.1  => -0.9
    logp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    ref = old - LN2
    loss, m = policy_loss(logp, old, torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 1), normalizer=1.0,
                          ref_logprobs=ref, kl_coef=0.1, kl_estimator="k1", is_weights=torch.tensor([[0.5]]).double())
    assert loss.item() == pytest.approx(-1 + 0.1 * LN2, abs=1e-12)
    loss.backward()
    assert logp.grad.item() == pytest.approx(-0.9, abs=1e-12)
    assert m["loss/policy"] == pytest.approx(-1.0)
    assert m["loss/kl"] == pytest.approx(0.1 * LN2)
    assert m["kl/mean"] == pytest.approx(LN2)


def test_sft_loss_hand_worked():
    # -(-1 - 2 - 3) / 3 = 2; the masked NaN is ignored and gets zero gradient
    logp = torch.tensor([[-1.0, -2.0], [-3.0, float("nan")]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss = sft_loss(logp, mask, loss_normalizer(mask, "token-mean"))
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert logp.grad.tolist() == [[-1 / 3, -1 / 3], [-1 / 3, 0.0]]


def test_bad_arguments():
    lp, old, ref, adv, mask, _ = _random_batch(0)
    with pytest.raises(ValueError, match="unknown policy loss kind"):
        policy_loss(lp, old, adv, mask, normalizer=1.0, kind="trpo")
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(lp, old, adv, mask, normalizer=1.0, kl_coef=0.1)
    with pytest.raises(ValueError, match="shapes"):
        policy_loss(lp, old, adv[:-1], mask, normalizer=1.0)
    with pytest.raises(ValueError, match="must match"):
        policy_loss(lp, old[:, :-1], adv, mask, normalizer=1.0)


# ---------------------------------------------------------------- policy loss: brute force


def _grad_of(fn, logp):
    x = logp.clone().requires_grad_()
    loss = fn(x)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("kind", ["ppo", "gspo"])
@pytest.mark.parametrize("with_kl", [False, True])
def test_policy_loss_matches_brute_force(loss_agg, kind, with_kl):
    logp, old, ref, adv, mask, w = _random_batch(10 * AGGS.index(loss_agg) + 2 * (kind == "gspo") + with_kl)
    w = w if kind == "ppo" else None  # GSPO's brute force is the sequence objective, which has no token weights
    D = loss_normalizer(mask, loss_agg)
    kw = dict(loss_agg=loss_agg, normalizer=D, clip_low=0.2, clip_high=0.28,
              kl_coef=0.05 if with_kl else 0.0, kl_estimator="k3")
    got_loss, got_grad = _grad_of(
        lambda x: policy_loss(x, old, adv, mask, kind=kind, ref_logprobs=ref, is_weights=w, **kw)[0], logp)
    want_loss, want_grad = _grad_of(
        lambda x: _brute_loss(x, old, adv, mask, kind=kind, ref=ref, w=w, **kw), logp)
    assert abs(got_loss.item() - want_loss.item()) < 1e-10
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-10)
    assert got_grad.abs().sum() > 0  # not a vacuous comparison


@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("kind", ["ppo", "gspo"])
def test_micro_batches_sum_to_full_batch(loss_agg, kind):
    """Any split into micro-batches, each trimmed to its own longest sequence, gives the
    full-batch loss and gradient when every micro-batch uses the step's normaliser."""
    B, T = 10, 12
    logp, old, ref, adv, mask, w = _random_batch(7, B=B, T=T)
    D = loss_normalizer(mask, loss_agg)  # once, on the whole step
    kw = dict(loss_agg=loss_agg, kind=kind, normalizer=D, kl_coef=0.1, kl_estimator="k3")
    full_loss, full_grad = _grad_of(
        lambda x: policy_loss(x, old, adv, mask, ref_logprobs=ref, is_weights=w, **kw)[0], logp)

    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # three random splits
        order = torch.randperm(B, generator=gen)
        cuts = sorted(torch.randperm(B - 1, generator=gen)[:3].add(1).tolist())
        x = logp.clone().requires_grad_()
        total = 0.0
        for rows in torch.tensor_split(order, cuts):
            t_mb = max(1, int(mask[rows].sum(1).max()))  # trim padding to this micro-batch
            sl = (rows[:, None], torch.arange(t_mb)[None, :])
            mb_loss, _ = policy_loss(x[sl], old[sl], adv[rows], mask[sl], ref_logprobs=ref[sl], is_weights=w[sl], **kw)
            mb_loss.backward()
            total += mb_loss.item()
        assert abs(total - full_loss.item()) < 1e-10
        torch.testing.assert_close(x.grad, full_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["ppo", "gspo"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_masked_positions_get_exactly_zero_gradient(kind, mask_dtype):
    logp, old, ref, adv, mask, w = _random_batch(11)
    garbage = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30, -1e30], dtype=torch.float64)
    pad = ~mask
    fill = garbage[torch.arange(int(pad.sum())) % len(garbage)]
    dirty = {}
    for name, t in (("logp", logp), ("old", old), ("ref", ref), ("w", w)):
        d = t.clone()
        d[pad] = fill
        dirty[name] = d
    m = mask.to(mask_dtype)
    for agg in AGGS:
        D = loss_normalizer(m, agg)
        kw = dict(kind=kind, loss_agg=agg, normalizer=D, kl_coef=0.1, kl_estimator="k3")
        clean_loss, clean_grad = _grad_of(
            lambda x: policy_loss(x, old, adv, m, ref_logprobs=ref, is_weights=w, **kw)[0], logp)
        loss, grad = _grad_of(
            lambda x: policy_loss(x, dirty["old"], adv, m, ref_logprobs=dirty["ref"], is_weights=dirty["w"], **kw)[0],
            dirty["logp"])
        assert torch.isfinite(grad).all() and torch.isfinite(loss)
        assert (grad[pad] == 0.0).all()
        assert loss.item() == clean_loss.item()
        assert torch.equal(grad, clean_grad)
        _, metrics = policy_loss(dirty["logp"], dirty["old"], adv, m, ref_logprobs=dirty["ref"], **kw)
        assert all(math.isfinite(v) for v in metrics.values())
