"""Batched generation with a KV cache over any Hugging Face causal LM.

Shapes: B = sequences in the batch, P = longest prompt, N = new tokens so far.

Prompts are left-padded so every row's next token sits in the last column; position ids
count real tokens only, so a padded row computes exactly what it would alone. Rows that hit
EOS stop contributing tokens (their later positions are padding, excluded from results).
The engine knows nothing about losses or rewards: it returns token ids, behaviour log-probs
and why each row stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from longrl.models.compat import cache_kwargs, returned_cache
from longrl.rollout.sampling import sample_next


@dataclass
class Generation:
    """One generated response."""

    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop id produced; it is the last id) or "length"


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_ids: tuple[int, ...] = (),
) -> list[Generation]:
    """Sample a response for each prompt (token ids), all rows decoded together. A row ends at
    EOS or at any of `stop_ids` (kept as its last token, finish reason 'stop')."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    B, P = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)  # [B, P]
    mask = torch.zeros((B, P), dtype=torch.long, device=device)  # [B, P]
    for i, p in enumerate(prompts):
        input_ids[i, P - len(p):] = torch.tensor(p, device=device)
        mask[i, P - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    cache = DynamicCache()
    out_tokens, out_logps = [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
    enders = torch.tensor([eos_id, *stop_ids], device=device)  # ids that end a row
    step_ids, step_pos = input_ids, positions
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                    **cache_kwargs(model, cache))
        cache = returned_cache(out)  # a model with its own cache type (GLA's recurrent state) returns it here
        logits = out.logits[:, -1]  # [B, V]
        tokens, logps = sample_next(logits, temperature, top_p, generator)  # [B], [B]
        tokens = torch.where(done, torch.full_like(tokens, pad_id), tokens)
        out_tokens.append(tokens)
        out_logps.append(logps)
        done = done | torch.isin(tokens, enders)
        if bool(done.all()):
            break
        step_ids = tokens[:, None]  # [B, 1]
        step_pos = step_pos[:, -1:] + 1  # [B, 1]
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
    model.train(was_training)
    tokens = torch.stack(out_tokens, 1).tolist()  # [B, N]
    logps = torch.stack(out_logps, 1).tolist()  # [B, N]
    results, ends = [], {eos_id, *stop_ids}
    for row_t, row_l in zip(tokens, logps):
        n = next((k + 1 for k, t in enumerate(row_t) if t in ends), 0)
        if n:
            results.append(Generation(row_t[:n], row_l[:n], "stop"))
        else:
            results.append(Generation(row_t, row_l, "length"))
    return results
