"""Rewards of multi-turn, tool-using episodes: outcome, search penalty, per-turn format,
tool errors. Pure tensor arithmetic over per-episode numbers (no episode objects here).

    paid_i   = correctness_i * (1 - search_penalty * searched_i)
    reward_i = correctness_weight * paid_i + format_weight * turn_format_i
             - min(1, tool_error_penalty * errors_i)

- the search penalty is MMSearch-R1's (arXiv 2506.20670): a correct answer found with a
  search is worth less than one found without, so within a group the model learns to search
  only where it cannot answer otherwise (a wrong answer is 0 either way);
- turn_format_i is the mean over the episode's turns of each turn's format: 1 for a
  well-formed tool call, and the answer template's score (`rewards.answer.format_reward`)
  on the final turn; a single-turn episode's is exactly the single-turn format reward;
- errors_i counts failed calls (malformed, unknown tool, raised, timed out).

Letters: B = episodes.
"""

from __future__ import annotations

import torch

from longrl.rewards.answer import format_reward


def turn_format(turn_texts: list[str], well_formed: list[int]) -> float:
    """Mean per-turn format of one episode: `well_formed` holds the tool turns' 0/1 (one per
    turn that ended in a call); the last turn that did not call a tool is scored as an answer."""
    scores = [float(w) for w in well_formed]
    if len(turn_texts) > len(well_formed):  # the episode ended with an answer turn (or a cut one)
        scores.append(format_reward(turn_texts[-1]))
    return sum(scores) / len(scores) if scores else 0.0


def agent_rewards(correctness: torch.Tensor, turn_format: torch.Tensor, searched: torch.Tensor, errors: torch.Tensor, *,
                  correctness_weight: float, format_weight: float, search_penalty: float,
                  tool_error_penalty: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """correctness [B], turn_format [B], searched [B] bool, errors [B] -> (reward [B], components)."""
    penalty = correctness * search_penalty * searched.float()  # [B] what the search cost
    paid = correctness - penalty  # [B]
    errors_cost = (tool_error_penalty * errors.float()).clamp(max=1.0)  # [B]
    reward = correctness_weight * paid + format_weight * turn_format - errors_cost  # [B]
    return reward, {"correctness": correctness, "format": turn_format, "search_penalty": correctness_weight * penalty,
                    "tool_errors": errors_cost}
