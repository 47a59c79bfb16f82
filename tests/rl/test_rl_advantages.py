"""Tests for longrl.rl.advantages: hand-worked values and brute-force loops."""

import math

import pytest
import torch

from longrl.rl.advantages import constant_groups, group_advantages, overlong_soft_penalty


def _brute_advantages(rewards, group_size, kind, eps):
    """Plain Python reference: one group at a time, no tensor ops."""
    r = rewards.tolist()
    out = []
    for start in range(0, len(r), group_size):
        g = r[start : start + group_size]
        mean = sum(g) / len(g)
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / (len(g) - 1))  # unbiased
        for j, x in enumerate(g):
            if kind == "grpo":
                out.append((x - mean) / (std + eps))
            elif kind == "drgrpo":
                out.append(x - mean)
            else:
                others = [y for k, y in enumerate(g) if k != j]
                out.append(x - sum(others) / len(others))
    return torch.tensor(out, dtype=torch.float64)


def test_hand_worked_values():
    # Group 0 = [1, 0, 0, 1]: mean 0.5, unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.577350
    #   grpo:   +-0.5 / 0.577350 = +-0.866025
    #   drgrpo: +-0.5
    #   rloo:   r=1 -> 1 - (1+0+0)/3 = 2/3;  r=0 -> 0 - (1+0+1)/3 = -2/3
    # Group 1 = [1, 1, 1, 1]: every advantage is 0 (eps keeps grpo finite).
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(
        group_advantages(rewards, 4, "grpo", eps=1e-12),
        torch.tensor([s, -s, -s, s, 0, 0, 0, 0], dtype=torch.float64),
        rtol=0,
        atol=1e-9,
    )
    torch.testing.assert_close(
        group_advantages(rewards, 4, "drgrpo"),
        torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64),
    )
    torch.testing.assert_close(
        group_advantages(rewards, 4, "rloo"),
        torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0], dtype=torch.float64),
    )


def test_grpo_uses_unbiased_std():
    # [0, 2]: mean 1, unbiased std sqrt(2) (biased would be 1) -> A = -+1/sqrt(2)
    adv = group_advantages(torch.tensor([0.0, 2.0], dtype=torch.float64), 2, "grpo", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0], dtype=torch.float64) / math.sqrt(2))


@pytest.mark.parametrize("kind", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_matches_brute_force(kind, group_size):
    gen = torch.Generator().manual_seed(group_size)
    rewards = torch.randn(5 * group_size, generator=gen, dtype=torch.float64)
    got = group_advantages(rewards, group_size, kind, eps=1e-6)
    torch.testing.assert_close(got, _brute_advantages(rewards, group_size, kind, 1e-6), rtol=0, atol=1e-10)


def test_rloo_is_scaled_drgrpo():
    rewards = torch.rand(12, dtype=torch.float64)
    torch.testing.assert_close(
        group_advantages(rewards, 4, "rloo"), 4 / 3 * group_advantages(rewards, 4, "drgrpo"), rtol=0, atol=1e-12
    )


def test_bool_rewards_give_float():
    adv = group_advantages(torch.tensor([True, False, True, False]), 2, "drgrpo")
    assert adv.dtype == torch.float32
    assert adv.tolist() == [0.5, -0.5, 0.5, -0.5]


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown advantage kind"):
        group_advantages(torch.zeros(4), 2, "ppo")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


def test_constant_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    assert constant_groups(rewards, 3).tolist() == [True, False, True]
    assert constant_groups(torch.tensor([0.0, 0.0, 0.0, 0.0]), 2).tolist() == [True, True]


def test_overlong_soft_penalty_hand_worked():
    # max_len 10, buffer 4 -> ramp starts after S = 6:
    #   L <= 6 -> 0;  L = 7 -> (6-7)/4 = -0.25;  L = 8 -> -0.5;  L = 10 -> -1;  L = 11 -> -1
    lengths = torch.tensor([0, 5, 6, 7, 8, 10, 11])
    got = overlong_soft_penalty(lengths, max_len=10, buffer=4)
    assert got.dtype == torch.float32
    assert got.tolist() == [0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0]


def test_overlong_soft_penalty_zero_buffer_is_hard():
    got = overlong_soft_penalty(torch.tensor([9, 10, 11]), max_len=10, buffer=0)
    assert got.tolist() == [0.0, 0.0, -1.0]
    with pytest.raises(ValueError):
        overlong_soft_penalty(torch.tensor([1]), max_len=4, buffer=5)
