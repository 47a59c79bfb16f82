"""A per-key attention bias without a [Q, K] mask: proportional attention for reduced videos.

Token reduction (`media/reduce.py`) keeps one token for a run of near-identical copies of a
patch; proportional attention (ToMe, arXiv 2210.09461) adds log(count) to that token's
attention logit as a key, for every query. An additive mask would do it but is [Q, K] per
row: 1.4 GB in float32 for the 18.5k tokens of a reduced 3,600-frame video, where the causal
SDPA kernel needs no mask at all. Instead this module appends one dimension to the heads:

    q' = [q, 1],  k' = [k, bias / scale]   =>   scale * (q' . k') = scale * (q . k) + bias

so the kernel still runs causal (or with the caller's padding mask) on [B, H, T, d + 1]
queries and keys, the values untouched; memory is O(T), the numbers the same as adding the
bias to the logits (tested against an explicit mask).

    with key_bias_attention(language_model):
        language_model(..., key_bias=bias)   # bias [B, K]: one value per key, cache included

Transformers hands unknown forward keyword arguments down to the attention function of every
layer, so `key_bias` reaches `key_bias_sdpa` (and `parallel.ulysses`' attention, which
appends the column after its all-to-all). Outside the context an sdpa model would drop the
argument silently: use `models.vlm.lm_forward`, which always opens it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTN_NAME = "longrl_key_bias"
KEEP = ("longrl_ulysses",)
"""Attention implementations that apply `key_bias` themselves (left in place by the context)."""


def with_bias_column(query: torch.Tensor, key: torch.Tensor, key_bias: torch.Tensor, scale: float):
    """query [B, H, Q, d], key [B, Hk, K, d], key_bias [B, K] -> (query', key') [.., d + 1] whose
    scaled dot products are scale * (q . k) + key_bias[k]."""
    B, H, Q, _ = query.shape
    K = key.shape[2]
    if tuple(key_bias.shape) != (B, K):
        raise ValueError(f"key_bias {tuple(key_bias.shape)} does not match {B} rows x {K} keys")
    ones = query.new_ones(B, H, Q, 1)
    column = (key_bias.to(key.dtype) / scale)[:, None, :, None].expand(B, key.shape[1], K, 1)
    return torch.cat([query, ones], -1), torch.cat([key, column], -1)


def key_bias_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  key_bias: torch.Tensor | None = None, **kwargs):
    """Transformers' SDPA attention with `key_bias` [B, K] added to every logit of each key."""
    if key_bias is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    query, key = with_bias_column(query, key, key_bias, scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scale, **kwargs)


AttentionInterface.register(ATTN_NAME, key_bias_sdpa)
# Padding masks as for sdpa (a custom implementation without a mask function gets none at all).
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


@contextmanager
def key_bias_attention(model):
    """Within the block `model`'s (text) attention is `key_bias_sdpa`, unless an implementation
    that handles key_bias itself (Ulysses) is active."""
    cfg = model.config.get_text_config()
    previous = cfg._attn_implementation
    if previous in KEEP or previous == ATTN_NAME:
        yield model
        return
    cfg._attn_implementation_internal = ATTN_NAME  # bypass the setter (it re-dispatches sub-configs)
    try:
        yield model
    finally:
        cfg._attn_implementation_internal = previous
