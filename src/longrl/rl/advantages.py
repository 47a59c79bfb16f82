"""Group-relative advantages and reward shaping for GRPO-style RL.

Every prompt is sampled G times; a sample's advantage is its reward compared with
the other samples of the same prompt, so no value network is needed.

- "grpo":   (r - mean_g) / (std_g + eps)      GRPO, DeepSeekMath (arXiv 2402.03300)
- "drgrpo": r - mean_g                        Dr. GRPO (arXiv 2503.20783)
- "rloo":   r - mean of the other G-1 samples RLOO (arXiv 2402.14740)

plus two pieces of DAPO (arXiv 2503.14476): `constant_groups` finds the groups that
dynamic sampling drops (every sample got the same reward, so every advantage is 0
and the group carries no gradient), and `overlong_soft_penalty` is the soft
punishment for responses that run into the length limit.

Departures from the papers:
- GRPO's paper does not say which standard deviation; we use the unbiased one
  (divide by G - 1, torch's default), as TRL and verl do.
- The advantage is one number per sequence ([N*G]); the loss broadcasts it over
  tokens. Process supervision (per-step rewards) is not implemented.

Shapes: N prompts (groups), G samples per group (group_size), B = N*G sequences.
Rewards are flat with groups contiguous: sample i belongs to group i // G.
"""

import torch
from torch import Tensor

ADVANTAGE_KINDS = ("grpo", "drgrpo", "rloo")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """View flat rewards [N*G] as [N, G], in floating point; check the sizes."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N*G], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: group-relative advantages need at least 2 samples per group")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.float()  # bool / int rewards from verifiers
    return rewards.view(-1, group_size)  # [N, G]


def group_advantages(rewards: Tensor, group_size: int, kind: str = "grpo", eps: float = 1e-6) -> Tensor:
    """Advantage of each sample relative to its group.

    Args:
        rewards: [N*G] scalar reward per sample; sample i is in group i // group_size.
        group_size: G, samples per prompt (>= 2).
        kind: "grpo":   A = (r - mean_g) / (std_g + eps), std_g the UNBIASED
                        standard deviation of the group (divides by G - 1);
              "drgrpo": A = r - mean_g (no std division, Dr. GRPO);
              "rloo":   A = r - (sum_g - r) / (G - 1), the mean of the other G - 1
                        samples; equals G / (G - 1) * (r - mean_g).
        eps: added to the std so that a constant group gives A = 0, not NaN.

    Returns:
        [N*G] advantages, same floating dtype as `rewards` (float32 for int/bool).
    """
    r = _grouped(rewards, group_size)  # [N, G]
    mean = r.mean(dim=1, keepdim=True)  # [N, 1]
    if kind == "grpo":
        std = r.std(dim=1, keepdim=True, unbiased=True)  # [N, 1]
        adv = (r - mean) / (std + eps)  # [N, G]
    elif kind == "drgrpo":
        adv = r - mean  # [N, G]
    elif kind == "rloo":
        others_mean = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)  # [N, G]
        adv = r - others_mean  # [N, G]
    else:
        raise ValueError(f"unknown advantage kind {kind!r}; choose one of {ADVANTAGE_KINDS}")
    return adv.reshape(-1)  # [N*G]


def constant_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[N] bool, True where every reward in the group is equal.

    Such a group has all-zero advantages under every kind above, so it adds no
    gradient and only dilutes the batch; DAPO's dynamic sampling drops it and
    samples more prompts instead.
    """
    r = _grouped(rewards, group_size)  # [N, G]
    return (r == r[:, :1]).all(dim=1)  # [N]


def overlong_soft_penalty(lengths: Tensor, max_len: int, buffer: int) -> Tensor:
    """DAPO soft overlong punishment, added to the reward of each response.

    With L the response length in tokens and S = max_len - buffer:

        penalty(L) = 0                  if L <= S
                   = (S - L) / buffer   if S < L <= max_len   (linear from 0 to -1)
                   = -1                 if L > max_len

    A response that ends just before the limit is barely punished; one cut off at
    the limit (L == max_len, usually truncated) gets -1. buffer = 0 gives the hard
    version: 0 up to max_len, -1 beyond.

    Args:
        lengths: [B] response lengths (int or float).
        max_len: the generation limit (max_new_tokens).
        buffer: width of the linear ramp, 0 <= buffer <= max_len.

    Returns:
        [B] float32 penalties in [-1, 0].
    """
    if not 0 <= buffer <= max_len:
        raise ValueError(f"overlong buffer={buffer} must be in [0, max_len={max_len}]")
    length = lengths.to(torch.float32)  # [B]
    start = float(max_len - buffer)
    ramp = (start - length) / max(buffer, 1)  # [B]; unused when buffer == 0
    zero = torch.zeros_like(length)
    penalty = torch.where(length <= start, zero, ramp)  # [B]
    return torch.where(length > max_len, torch.full_like(length, -1.0), penalty)  # [B]
