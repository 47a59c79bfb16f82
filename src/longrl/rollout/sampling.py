"""Next-token sampling: temperature, top-p, and the behaviour log-prob of the chosen token.

Shapes: B = batch rows, V = vocabulary.

The behaviour log-prob is taken under `logits / temperature` (the distribution the token was
drawn from, before top-p truncation), and the trainer computes its log-probs with the same
temperature, so the two agree exactly when the weights agree. With temperature 0 (greedy)
the log-prob is under the plain logits.
"""

from __future__ import annotations

import torch


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B], logprobs [B]).

    float64 logits stay float64 (tests compare log-probs to 1e-12); lower precisions are
    upcast to float32. Tokens are drawn on the generator's device (a CPU generator for a
    CUDA model: the same draws on any device) and returned on the logits' device."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature == 0.0:
        logp = torch.log_softmax(logits, dim=-1)  # [B, V]
        tokens = logits.argmax(dim=-1)  # [B]
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [B, V]
    probs = logp.exp()
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    where = generator.device if generator is not None else probs.device
    tokens = torch.multinomial(probs.to(where), 1, generator=generator).squeeze(-1).to(logits.device)  # [B]
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens whose mass reaches top_p."""
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V]
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = torch.where(mass_before < top_p, sorted_p, torch.zeros_like(sorted_p))
    out = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return out / out.sum(-1, keepdim=True)
