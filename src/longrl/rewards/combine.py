"""The scalar reward of each rollout: weighted correctness plus weighted format.

    reward_i = correctness_weight * correctness(response_i, example_i)
             + format_weight      * format_reward(response_i)

as in DeepSeek-R1 (arXiv 2501.12948), which adds an accuracy reward and a format reward.
Departure: the weights are free (R1 sums the two with weight 1 each), and the format
reward has a 0.5 level (see `rewards.answer.format_reward`).

Letters: B = number of responses (prompts x samples per prompt).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from longrl.data.example import Example
from longrl.rewards.answer import format_reward


def score_responses(
    responses: list[str],
    examples: list[Example],
    correctness_fn: Callable[[str, Example], float],
    correctness_weight: float,
    format_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward per response and its named components.

    `examples[i]` is the example `responses[i]` answers (repeat each example once per
    sample). `correctness_fn(response_text, example)` is a task's own scorer or a
    verifier applied to the extracted answer; it must return a finite float.

    Returns `(reward [B] float32, {"correctness": [B], "format": [B]})`.
    """
    if len(responses) != len(examples):
        raise ValueError(f"{len(responses)} responses but {len(examples)} examples")
    correctness = [float(correctness_fn(r, ex)) for r, ex in zip(responses, examples)]
    bad = [c for c in correctness if not math.isfinite(c)]
    if bad:
        raise ValueError(f"correctness_fn returned a non-finite score: {bad[0]}")
    b_correct = torch.tensor(correctness, dtype=torch.float32)  # [B]
    b_format = torch.tensor([format_reward(r) for r in responses], dtype=torch.float32)  # [B]
    b_reward = correctness_weight * b_correct + format_weight * b_format  # [B]
    return b_reward, {"correctness": b_correct, "format": b_format}
