"""A per-key attention bias without a [Q, K] mask: proportional attention for reduced videos.

Token reduction (`media/reduce.py`) keeps one token for a run of near-identical copies of a
patch; proportional attention (ToMe, arXiv 2210.09461) adds log(count) to that token's
attention logit as a key, for every query. An additive mask would do it but is [Q, K] per
row: 1.4 GB in float32 for the 18.5k tokens of a reduced 3,600-frame video, where the causal
SDPA kernel needs no mask at all. Instead this module appends one dimension to the heads:

    q' = [q, 1, 0..],  k' = [k, bias / scale, 0..],  v' = [v, 0, 0..]
    =>   scale * (q' . k') = scale * (q . k) + bias,  softmax(..) v' = [out, 0, 0..]

so the kernel still runs causal (or with the caller's padding mask) on [B, H, T, d'] inputs
and the output's first d columns are the answer; memory is O(T), the numbers the same as
adding the bias to the logits (tested against an explicit mask). The values get the extra
columns too: with q/k wider than v the CPU kernel falls back to materialising [T, T] scores
(2.5 GB at 8k tokens and 4 heads, against 12 MB). d' = d + 1 on the CPU, rounded up to a
multiple of 8 elsewhere (the fused GPU kernels' head sizes).

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


def with_bias_column(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_bias: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [B, H, Q, d], key/value [B, Hk, K, d], key_bias [B, K] -> (q', k', v') [.., d'] whose
    scaled dot products are scale * (q . k) + key_bias[k]; the attention output's first d
    columns are the biased attention's."""
    B, H, Q, d = query.shape
    Hk, K = key.shape[1], key.shape[2]
    if tuple(key_bias.shape) != (B, K):
        raise ValueError(f"key_bias {tuple(key_bias.shape)} does not match {B} rows x {K} keys")
    width = d + 1 if query.device.type == "cpu" else -(-(d + 1) // 8) * 8
    zeros = width - d - 1
    q = torch.cat([query, query.new_ones(B, H, Q, 1), query.new_zeros(B, H, Q, zeros)], -1)
    column = (key_bias.to(key.dtype) / scale)[:, None, :, None].expand(B, Hk, K, 1)
    k = torch.cat([key, column, key.new_zeros(B, Hk, K, zeros)], -1)
    v = torch.cat([value, value.new_zeros(B, Hk, K, width - d)], -1)
    return q, k, v


def key_bias_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  key_bias: torch.Tensor | None = None, **kwargs):
    """Transformers' SDPA attention with `key_bias` [B, K] added to every logit of each key.
    -> (output [B, Q, H, d], None)"""
    if key_bias is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    d = value.shape[-1]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q, k, v = with_bias_column(query, key, value, key_bias, scale)
    out, weights = sdpa_attention_forward(module, q, k, v, attention_mask, dropout=dropout, scaling=scale, **kwargs)
    return out[..., :d], weights  # [B, Q, H, d]


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
