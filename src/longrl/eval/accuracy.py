"""Held-out accuracy: greedy generation on unseen prompts, scored by the task's verifier."""

from __future__ import annotations

from typing import Callable

import torch

from longrl.data.example import Example
from longrl.rewards.answer import format_reward


def encode_prompts(tokenizer, examples: list[Example]) -> list[list[int]]:
    from longrl.models.load import format_prompt

    return [tokenizer(format_prompt(tokenizer, ex.prompt, ex.messages), add_special_tokens=False)["input_ids"]
            for ex in examples]


def decode_response(tokenizer, ids: list[int]) -> str:
    """Response text with format tags kept (they may be special tokens) and EOS dropped."""
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


@torch.no_grad()
def evaluate(policy, backend, examples: list[Example], score: Callable[[str, Example], float], *,
             max_new_tokens: int, batch_size: int, return_items: bool = False, progress: bool = False,
             environment=None, limits=None) -> dict:
    """Greedy accuracy of `policy` decoded by `backend` (`rollout/base.py`) over `examples`:
    {"eval/accuracy", "eval/format", "eval/response_len"} (+ "items" with `return_items`).
    `progress`: a bar over the examples on stderr while they decode (`longrl eval`).
    `environment` (multi-turn tool use, `rollout/episodes.py`) with its `limits`: the same
    episodes as training, greedy; the verifier reads the model's turns, and turns and tool
    calls per question are reported, also per `example.meta["eval_group"]` where examples
    carry one (e.g. the facts task's needs_search / no_search)."""
    from tqdm.auto import tqdm

    from longrl.rollout.base import SamplingParams

    if environment is not None:
        return _evaluate_episodes(policy, backend, examples, score, environment, limits, batch_size, return_items)
    greedy = SamplingParams(max_new_tokens, temperature=0.0)
    responses = []
    with tqdm(total=len(examples), desc="eval", unit="ex", disable=not progress, dynamic_ncols=True) as bar:
        for s in range(0, len(examples), batch_size):
            requests = policy.requests(examples[s : s + batch_size], 1, eval=True)
            responses += [g.response_ids for g in backend.generate(requests, greedy)]
            bar.update(len(requests))
    return score_responses_greedy(policy.tokenizer, examples, responses, score, return_items)


def _evaluate_episodes(policy, backend, examples, score, environment, limits, batch_size, return_items) -> dict:
    from longrl.rewards.agent import turn_format
    from longrl.rollout.base import SamplingParams
    from longrl.rollout.episodes import episode_metrics, model_text, run_episodes

    greedy = SamplingParams(limits.total_tokens, temperature=0.0)
    tools = tuple(getattr(environment, "tools", ()))  # reported even where a group never called one
    records, lengths = [], []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        eps = run_episodes(backend, policy.requests(chunk, 1, eval=True), environment, chunk, greedy, None, limits,
                           policy.tokenizer)
        records += [e.record() for e in eps]
        lengths += [sum(e.loss_mask) for e in eps]
    correct = [float(score(model_text(r), ex)) for r, ex in zip(records, examples)]
    n = max(1, len(examples))
    out = {"eval/accuracy": sum(correct) / n,
           "eval/format": sum(turn_format(r["turn_texts"], r["env"].get("well_formed", [])) for r in records) / n,
           "eval/response_len": sum(lengths) / n,
           **{k.replace("agent/", "eval/"): v for k, v in episode_metrics(records, tools).items()}}
    groups = sorted({ex.meta.get("eval_group") for ex in examples if ex.meta.get("eval_group")})
    for g in groups:  # accuracy and tool use per kind of question
        idx = [i for i, ex in enumerate(examples) if ex.meta.get("eval_group") == g]
        out[f"eval/accuracy/{g}"] = sum(correct[i] for i in idx) / len(idx)
        for k, v in episode_metrics([records[i] for i in idx], tools).items():
            if k.startswith("agent/tool_calls/") or k == "agent/turns":
                out[f"{k.replace('agent/', 'eval/')}/{g}"] = v
    if return_items:
        out["items"] = [{"id": ex.id, "prompt": ex.prompt, "answer": ex.answer, "response": "".join(r["turn_texts"]),
                         "correct": c, "tool_calls": dict(r["env"].get("calls", {})), "turns": r["turns"]}
                        for ex, r, c in zip(examples, records, correct)]
    return out


def score_responses_greedy(tokenizer, examples: list[Example], responses: list[list[int]],
                           score: Callable[[str, Example], float], return_items: bool = False) -> dict:
    """Accuracy, format and length of one response per example (text and video evaluation);
    with `return_items`, also one record per example under "items"."""
    correct, fmt, lengths, items = [], [], [], []
    for ex, r in zip(examples, responses):
        text = decode_response(tokenizer, r)
        c = float(score(text, ex))
        correct.append(c)
        fmt.append(format_reward(text))
        lengths.append(len(r))
        if return_items:
            item = {"id": ex.id, "prompt": ex.prompt, "answer": ex.answer, "response": text, "correct": c}
            items.append({**item, "media": ex.media} if ex.media else item)
    n = max(1, len(correct))
    out = {"eval/accuracy": sum(correct) / n, "eval/format": sum(fmt) / n, "eval/response_len": sum(lengths) / n}
    if return_items:
        out["items"] = items
    return out
