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
import warnings
from collections.abc import Callable

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
    verifier applied to the extracted answer, and should return a finite float.

    A response whose reward is NaN or inf (a scorer bug, a judge that overflowed) is refused
    on its own: its reward and correctness are 0, as for a wrong answer, with a warning
    (once per process), so one bad score neither stops the run nor turns its group's
    advantages into NaN. Non-finite weights are a configuration error: ValueError.

    Returns `(reward [B] float32, {"correctness": [B], "format": [B]})`.
    """
    if len(responses) != len(examples):
        raise ValueError(f"{len(responses)} responses but {len(examples)} examples")
    if not (math.isfinite(correctness_weight) and math.isfinite(format_weight)):
        raise ValueError(f"reward weights must be finite (correctness {correctness_weight}, format {format_weight})")
    correctness = [float(correctness_fn(r, ex)) for r, ex in zip(responses, examples)]
    b_correct = torch.tensor(correctness, dtype=torch.float32)  # [B], NaN where the scorer failed
    b_format = torch.tensor([format_reward(r) for r in responses], dtype=torch.float32)  # [B]
    b_reward = correctness_weight * b_correct + format_weight * b_format  # [B]
    b_refused = ~torch.isfinite(b_reward)  # [B] bool; also catches a finite score overflowing float32
    if b_refused.any():
        first = int(b_refused.nonzero()[0])
        warnings.warn(f"{int(b_refused.sum())} of {len(responses)} rewards were not finite and were refused (scored 0); "
                      f"the first: correctness {correctness[first]} for example {examples[first].id!r}",
                      RuntimeWarning, stacklevel=2)
        b_reward = b_reward.masked_fill(b_refused, 0.0)
        b_correct = b_correct.masked_fill(b_refused, 0.0)
    return b_reward, {"correctness": b_correct, "format": b_format}
