"""Policy-gradient losses for GRPO-style RL: PPO-clip and GSPO, KL penalty, aggregation.

Papers:
- PPO clipped surrogate (arXiv 1707.06347), used per token as in GRPO
  (DeepSeekMath, arXiv 2402.03300).
- DAPO (arXiv 2503.14476): clip-higher (separate clip_low / clip_high) and the
  token-level mean ("token-mean") over all tokens of the step.
- GSPO (arXiv 2507.18071): one length-normalised importance ratio per sequence,
  clipped per sequence; implemented in its "GSPO-token" per-token form.
- KL estimators k1, k2, k3 from J. Schulman, "Approximating KL divergence" (2020);
  GRPO adds k3 to the loss rather than to the reward, and so do we.
- Truncated importance sampling (TIS, F. Yao et al. 2025, "Your efficient RL
  framework secretly brings you off-policy RL training"): the caller passes
  already-clipped weights pi_old / pi_rollout per token.

Departures:
- The loss normaliser is an argument, not computed here: `loss_normalizer` is
  called ONCE per optimizer step on the whole step's mask, then every micro-batch
  divides by that same number. Summing the micro-batch losses (gradient
  accumulation) therefore gives exactly the full-batch loss and gradient, for
  every `loss_agg`. Computing the normaliser per micro-batch, as many trainers
  do, weights tokens differently depending on how the batch was split.
- GRPO's paper averages tokens within a sequence, then over sequences
  ("seq-mean-token-mean"); our default follows DAPO ("token-mean").
- GSPO with loss_agg="seq-mean-token-mean" has exactly the paper's gradient; with
  "token-mean" each sequence's term is weighted by its length n_i / n_tokens.
- TIS weights multiply the policy-gradient term only, not the KL term.

Shapes: B sequences (responses), T response tokens (right-padded). `mask` [B, T]
is 1/True on response tokens that count and 0/False on padding (and on tokens a
caller chooses to drop); fractional mask weights are not supported (use
`is_weights`). Masked positions contribute exactly zero loss and zero gradient
even if the log-probs stored there are garbage (inf, NaN): they are replaced with
torch.where before any arithmetic, never multiplied by 0.
"""

import torch
from torch import Tensor

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
POLICY_KINDS = ("ppo", "gspo")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _valid(mask: Tensor) -> Tensor:
    """[B, T] bool: which tokens count (mask may be bool or 0/1 float)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _check_agg(loss_agg: str) -> None:
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; choose one of {LOSS_AGGS}")


def loss_normalizer(mask: Tensor, loss_agg: str) -> float:
    """The denominator of the loss for one optimizer step; call it ONCE per step.

    Pass the mask of the WHOLE step batch [B, T], before splitting into
    micro-batches, and give the result to every `aggregate` / `policy_loss` call of
    that step.

        "token-mean":                 number of valid tokens in the step
        "seq-mean-token-mean"/"-sum": number of sequences with >= 1 valid token

    Sequences with no valid token (e.g. truncated responses dropped by
    rl.overlong="filter") are not counted: they add nothing to the numerator, so
    counting them would just shrink the loss. The result is at least 1, so a step
    in which every token is masked gives loss 0 rather than NaN.
    """
    _check_agg(loss_agg)
    valid = _valid(mask)  # [B, T]
    if loss_agg == "token-mean":
        count = int(valid.sum())
    else:
        count = int(valid.any(dim=1).sum())
    return float(max(1, count))


def aggregate(per_token: Tensor, mask: Tensor, loss_agg: str, normalizer: float) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar. With x = per_token on valid tokens
    (0 elsewhere), n_i = valid tokens of sequence i, and D = `normalizer`:

        "token-mean":          sum_{i,t} x_{i,t} / D                   (D = valid tokens)
        "seq-mean-token-mean": sum_i [ sum_t x_{i,t} / max(1, n_i) ] / D (D = sequences)
        "seq-mean-token-sum":  sum_{i,t} x_{i,t} / D                   (D = sequences)

    D is fixed for the optimizer step (see `loss_normalizer`), so the sum of this over
    any split of the step batch into micro-batches equals its value on the whole batch.
    """
    _check_agg(loss_agg)
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    valid = _valid(mask)  # [B, T]
    if per_token.shape != valid.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(valid.shape)} differ")
    x = torch.where(valid, per_token, 0.0)  # [B, T]; where, not *, so NaN/inf cannot leak
    if loss_agg == "seq-mean-token-mean":
        n_tokens = valid.sum(dim=1).clamp(min=1)  # [B]
        total = (x.sum(dim=1) / n_tokens).sum()
    else:
        total = x.sum()
    return total / normalizer


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate [B, T] of KL(pi || ref) for tokens sampled from pi.

    With r = ref_logprobs - logprobs = log(ref(y) / pi(y)):

        k1 = -r                 unbiased, high variance, can be negative
        k2 = r^2 / 2            biased (low bias when pi ~ ref), always >= 0
        k3 = exp(r) - 1 - r     unbiased, always >= 0 (GRPO's choice)

    No clamping: large |r| gives a large k3 (exp overflows only for r > ~88 in float32).
    Gradients flow through both arguments; detach `ref_logprobs` if it should be a
    constant (`policy_loss` does).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    log_ratio = ref_logprobs - logprobs  # [B, T]  r
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.exp(log_ratio) - 1.0 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def _importance_ratio(logprobs: Tensor, old_logprobs: Tensor, valid: Tensor, kind: str) -> Tensor:
    """[B, T] ratio pi / pi_old per token. Inputs are already zero at masked positions.

    ppo:  ratio_t = exp(logp_t - old_t).
    gspo: s_i = exp( sum_t valid (logp - old) / n_i ), the geometric mean of the token
          ratios, written per token as sg[s_i] * exp(logp_t - sg[logp_t]): its value is
          s_i at every token and d/dlogp_t = s_i, so averaging the per-token loss over
          the sequence's n_i tokens gives exactly the gradient of the sequence term,
          since d s_i / d logp_t = s_i / n_i.
    """
    log_ratio = logprobs - old_logprobs  # [B, T]
    if kind == "ppo":
        return torch.exp(log_ratio)
    if kind == "gspo":
        n_tokens = valid.sum(dim=1).clamp(min=1)  # [B]
        seq_ratio = torch.exp(log_ratio.detach().sum(dim=1) / n_tokens)  # [B]
        return seq_ratio[:, None] * torch.exp(logprobs - logprobs.detach())  # [B, T]
    raise ValueError(f"unknown policy loss kind {kind!r}; choose one of {POLICY_KINDS}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    normalizer: float,
    loss_agg: str = "token-mean",
    kind: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss (to minimise) for one micro-batch.

    Per valid token (i, t), with A_i = advantages[i] and rho the importance ratio
    (ppo: exp(logp - old) per token; gspo: the sequence ratio s_i, see
    `_importance_ratio`):

        pg_{i,t}  = -min( rho * A_i, clip(rho, 1 - clip_low, 1 + clip_high) * A_i ) * w_{i,t}
        kl_{i,t}  = kl_penalty(logp, ref, kl_estimator)_{i,t}         (if kl_coef > 0)
        loss      = aggregate(pg, mask, loss_agg, normalizer)
                    + kl_coef * aggregate(kl, mask, loss_agg, normalizer)

    where w = is_weights (1 if None). With x = pg + kl_coef * kl, n_i the valid tokens
    of sequence i and D = `normalizer` (from `loss_normalizer` on the whole step):

        token-mean:          loss = sum_{i,t} x_{i,t} / D
        seq-mean-token-mean: loss = sum_i (sum_t x_{i,t} / n_i) / D
        seq-mean-token-sum:  loss = sum_{i,t} x_{i,t} / D

    old_logprobs, advantages, ref_logprobs and is_weights are treated as constants
    (detached). logprobs / old_logprobs / mask / ref_logprobs / is_weights are [B, T];
    advantages is [B], one per sequence.

    Returns (loss, metrics). Metrics are python floats for THIS call:
        loss/policy     the pg term as aggregated above (sums over micro-batches)
        loss/kl         kl_coef * aggregated KL (sums over micro-batches; if KL on)
        kl/mean         mean KL estimate per valid token (if KL on)
        clip/frac_low   fraction of valid tokens where A < 0 and rho < 1 - clip_low
        clip/frac_high  fraction of valid tokens where A > 0 and rho > 1 + clip_high
                        (the two cases where the clipped branch wins the min)
        ratio/mean      mean of rho over valid tokens
        tokens/valid    number of valid tokens (to weight the per-call fractions)
    """
    valid = _valid(mask)  # [B, T]
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("is_weights", is_weights)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match logprobs {tuple(logprobs.shape)}")
    if logprobs.shape != valid.shape or advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"shapes: logprobs {tuple(logprobs.shape)}, mask {tuple(valid.shape)}, "
            f"advantages {tuple(advantages.shape)} (want [B, T], [B, T], [B])"
        )
    use_kl = kl_coef > 0
    if use_kl and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")

    # Replace masked positions first: exp() of garbage there would give inf/NaN,
    # and inf * 0 in the backward pass is NaN.
    logp = torch.where(valid, logprobs, 0.0)  # [B, T]
    old = torch.where(valid, old_logprobs.detach(), 0.0)  # [B, T]
    adv = advantages.detach().to(logp.dtype)[:, None]  # [B, 1]

    ratio = _importance_ratio(logp, old, valid, kind)  # [B, T]
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    pg = torch.maximum(-ratio * adv, -clipped * adv)  # [B, T]  = -min(rho A, clip(rho) A)
    if is_weights is not None:
        pg = pg * torch.where(valid, is_weights.detach(), 0.0)  # [B, T]
    pg_loss = aggregate(pg, valid, loss_agg, normalizer)
    loss = pg_loss

    with torch.no_grad():
        n_valid = max(1, int(valid.sum()))
        high = valid & (adv > 0) & (ratio > 1.0 + clip_high)  # [B, T]
        low = valid & (adv < 0) & (ratio < 1.0 - clip_low)  # [B, T]
        metrics = {
            "loss/policy": float(pg_loss.detach()),
            "clip/frac_low": float(low.sum()) / n_valid,
            "clip/frac_high": float(high.sum()) / n_valid,
            "ratio/mean": float(torch.where(valid, ratio, 0.0).sum()) / n_valid,
            "tokens/valid": float(valid.sum()),
        }

    if use_kl:
        ref = torch.where(valid, ref_logprobs.detach(), 0.0)  # [B, T]
        kl = kl_penalty(logp, ref, kl_estimator)  # [B, T]
        kl_loss = kl_coef * aggregate(kl, valid, loss_agg, normalizer)
        loss = loss + kl_loss
        metrics["loss/kl"] = float(kl_loss.detach())
        metrics["kl/mean"] = float(torch.where(valid, kl.detach(), 0.0).sum()) / n_valid
    return loss, metrics


def sft_loss(logprobs: Tensor, mask: Tensor, normalizer: float) -> Tensor:
    """Token-mean negative log-likelihood: -sum_{i,t} mask * logp / normalizer.

    `normalizer` is the number of target tokens in the whole optimizer step
    (`loss_normalizer(mask, "token-mean")`), so micro-batches sum to the full loss.
    """
    return -aggregate(logprobs, mask, "token-mean", normalizer)


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float,
             normalizer: float) -> tuple[Tensor, Tensor]:
    """DPO (Rafailov et al., arXiv 2305.18290) on sequence log-probs, one entry per pair [n].

    loss = -sum_i log sigmoid(beta * ((chosen_i - ref_chosen_i) - (rejected_i - ref_rejected_i)))
    / normalizer, where `normalizer` is the number of pairs in the whole optimizer step (so
    micro-batches sum to the full loss). The reference terms carry no gradient. Returns
    (loss, margins [n], detached): a margin > 0 means the policy prefers the chosen response
    more than the reference does.
    """
    margin = beta * ((chosen - ref_chosen.detach()) - (rejected - ref_rejected.detach()))  # [n]
    return -torch.nn.functional.logsigmoid(margin).sum() / normalizer, margin.detach()
