"""Sequence-chunked backward through a decoder body (StreamBP, arXiv 2506.03077).

A standard backward keeps every layer's activations for the whole sequence alive at
once: memory grows as L * T * (many hidden-sized tensors). StreamBP runs the forward
without a graph, keeping only each layer's input, and then back-propagates layer by
layer, last to first, one sequence chunk at a time:

    for layer l = L-1 .. 0:                       x = input of layer l       # [B, T, D]
        K, V = kv(x) without a graph              # [B, Hkv, T, d]
        for chunk [s, e), last to first:
            y = layer(x[:, s:e]), its queries against leaves K[:, :, :e], V[:, :, :e]
            backward(y, dL/dy[:, s:e])            # -> residual + query share of dL/dx,
                                                  #    dK, dV at 0..e-1, parameter grads
            # every later query is done, so dK, dV at s..e-1 are now complete:
            backward(kv(x[:, s:e]), (dK, dV)[s:e]) # -> K/V share of dL/dx[:, s:e]
            dL/dy[:, s:e] = dL/dx[:, s:e]          # in place: the next layer down reads it

Every token's output of a causal layer depends only on its own input and on K/V of
earlier tokens, so the chunk graphs are exactly the layer's graph split into pieces:
gradients equal those of full backprop up to float rounding. Live memory: the stored
layer inputs (L - 1 of them, B * T * D each; the first is the embedding lookup, redone),
the gradient (B * T * D), K, V and their gradients (4 * B * T * Hkv * d), and one chunk's
graph (B * c * (D + intermediate) plus attention of c queries against at most T keys).

Shapes: B batch, T sequence, D hidden, H query heads, Hkv key/value heads, d head dim,
c chunk length, V vocabulary.

Departures from the paper:
- The head (final logits, log-probs, loss) is a callback, `head_backward`, so that
  `streambp/logprobs.py` owns it (`logprobs.streambp_loss_and_backward` joins the two;
  this module imports nothing of logprobs); the final norm runs inside the last layer's chunks.
- Keys and values are computed once per layer for the whole sequence (graph-free) and
  again, with a graph, per chunk for the chunk's own positions, so no full-sequence
  graph is ever kept; chunks are processed last to first to make that possible.
- The forward pass runs the same chunked layer code without a graph, so no `[T, T]`
  mask is ever built; each chunk builds a boolean `[B, 1, c, e]` mask.
- Only Qwen2 / Qwen2.5, Qwen3, Llama and the text models of Qwen2-VL / Qwen2.5-VL are
  supported (pre-norm, RoPE or M-RoPE, GQA, gated MLP). Sliding-window attention and
  attention dropout raise `UserError`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longrl.errors import UserError

MROPE_MODEL_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text")
"""Text models of Qwen2-VL / Qwen2.5-VL: Qwen2 layers; M-RoPE folded into cos/sin by their
rotary module, so the layer math is the same."""
SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", *MROPE_MODEL_TYPES)

HeadBackward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""`head_backward(final_hidden [B, T, D]) -> (loss, dloss/dfinal_hidden [B, T, D])`.

It receives the final-norm output without a graph, must accumulate the head's own
parameter gradients itself, and returns the loss (detached) and the gradient w.r.t. its
input."""


@dataclass
class AttentionInputs:
    """Per-batch tensors shared by every layer: rotary tables and what a key may see."""

    cos: torch.Tensor  # [B or 1, T, d]
    sin: torch.Tensor  # [B or 1, T, d]
    key_keep: torch.Tensor | None  # [B, T] bool; False for padding keys
    segment: torch.Tensor | None  # [B, T] int; packed-sequence id (keys attend within one id)
    key_bias: torch.Tensor | None = None  # [B, T] float added to every logit of a key (models.key_bias)


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder stack (`Qwen2Model`, `LlamaModel`, `Qwen2_5_VLTextModel`, ...): the
    model itself, its `.model`, or its `.model.language_model` (vision-language models)."""
    inner = getattr(model, "model", None)
    for candidate in (model, inner, getattr(inner, "language_model", None)):
        if candidate is not None and hasattr(candidate, "layers"):
            return candidate
    raise UserError(f"train.backprop=streambp: no decoder layers found in {type(model).__name__}")


def check_supported(model: nn.Module) -> None:
    """Raise `UserError` unless StreamBP reproduces this model's layers exactly."""
    body = decoder_body(model)
    config = body.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"train.backprop=streambp supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"this model is {model_type!r}. Use train.backprop=checkpoint instead."
        )
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise UserError(
            "train.backprop=streambp does not support sliding-window attention "
            f"({model_type} with use_sliding_window=True). Use train.backprop=checkpoint."
        )
    if getattr(config, "attention_dropout", 0.0) and body.training:
        raise UserError(
            f"train.backprop=streambp needs attention_dropout=0 in training mode "
            f"(got {config.attention_dropout}): recomputed chunks must see the same dropout."
        )


def _rope_fn(layer: nn.Module) -> Callable:
    """The `apply_rotary_pos_emb` of the module that defines this layer's attention."""
    return sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb


def _rotate(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # apply_rotary_pos_emb rotates a (query, key) pair; the two are needed at different
    # lengths here (chunk queries, full-sequence keys), so each is rotated on its own.
    return _rope_fn(layer)(x, x, cos, sin)[0]


def _heads(proj: nn.Linear, norm: nn.Module | None, x: torch.Tensor, d: int) -> torch.Tensor:
    """Project `[B, n, D]` to heads `[B, heads, n, d]`, with Qwen3's per-head norm."""
    h = proj(x).view(*x.shape[:-1], -1, d)  # [B, n, heads, d]
    if norm is not None:
        h = norm(h)
    return h.transpose(1, 2)  # [B, heads, n, d]


def layer_kv(layer: nn.Module, n: torch.Tensor, att: AttentionInputs, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated keys and values of tokens s..s+c-1 from their normed input:
    n [B, c, D] -> 2 x [B, Hkv, c, d]."""
    attn = layer.self_attn
    e = s + n.shape[1]
    k = _heads(attn.k_proj, getattr(attn, "k_norm", None), n, attn.head_dim)  # [B, Hkv, c, d]
    v = _heads(attn.v_proj, None, n, attn.head_dim)  # [B, Hkv, c, d]
    return _rotate(layer, k, att.cos[:, s:e], att.sin[:, s:e]), v


def chunk_mask(att: AttentionInputs, s: int, e: int, batch: int) -> torch.Tensor:
    """Boolean mask `[B, 1, e-s, e]` for queries s..e-1 against keys 0..e-1 (True = attend);
    with `att.key_bias` an additive float mask instead (the bias where True, the dtype's
    minimum elsewhere: proportional attention, `models.key_bias`; a chunk's mask is small).

    Causality is by index, as in Hugging Face's `create_causal_mask`."""
    device = att.cos.device
    q_idx = torch.arange(s, e, device=device)  # [c]
    k_idx = torch.arange(e, device=device)  # [e]
    mask = (k_idx[None, :] <= q_idx[:, None]).expand(batch, -1, -1)  # [B, c, e]
    if att.key_keep is not None:
        mask = mask & att.key_keep[:, None, :e]
    if att.segment is not None:
        mask = mask & (att.segment[:, s:e, None] == att.segment[:, None, :e])
    if att.key_bias is not None:
        bias = att.key_bias[:, None, :e].to(att.cos.dtype).expand(batch, e - s, e)  # [B, c, e]
        return torch.where(mask, bias, torch.finfo(att.cos.dtype).min)[:, None]  # [B, 1, c, e]
    return mask[:, None]  # [B, 1, c, e]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, expand_kv: bool | None = None
) -> torch.Tensor:
    """Masked attention with GQA: q [B, H, c, d], k, v [B, Hkv, e, d], mask [B, 1, c, e] -> [B, H, c, d].

    CUDA's fused SDPA kernels take a mask or grouped K/V but not both (see transformers'
    `use_gqa_in_sdpa`), and the fallback math kernel builds `[B, H, c, e]` scores; so on
    CUDA (or with `expand_kv=True`) K/V are repeated to H heads, as HF's `repeat_kv` does,
    and the memory-efficient kernel runs. CPU's flash kernel handles both directly."""
    if expand_kv is None:
        expand_kv = q.device.type == "cuda"
    if expand_kv and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, e, d]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=not expand_kv)


def layer_chunk(
    layer: nn.Module,
    x: torch.Tensor,
    n: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    att: AttentionInputs,
    s: int,
) -> torch.Tensor:
    """One decoder layer for the tokens s..s+c-1 -> [B, c, D].

    x: layer input [B, c, D]; n: `input_layernorm(x)` [B, c, D]; k, v: [B, Hkv, s+c, d].
    Mirrors `Qwen2DecoderLayer` / `Qwen3DecoderLayer` / `LlamaDecoderLayer.forward`."""
    attn = layer.self_attn
    b, c, _ = x.shape
    e = s + c
    q = _heads(attn.q_proj, getattr(attn, "q_norm", None), n, attn.head_dim)  # [B, H, c, d]
    q = _rotate(layer, q, att.cos[:, s:e], att.sin[:, s:e])
    o = attend(q, k, v, chunk_mask(att, s, e, b), attn.scaling)  # [B, H, c, d]
    h = x + attn.o_proj(o.transpose(1, 2).reshape(b, c, -1))  # [B, c, D]
    return h + layer.mlp(layer.post_attention_layernorm(h))  # [B, c, D]


def _spans(t: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, t)) for s in range(0, t, chunk)]


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y


@torch.no_grad()
def layer_forward(
    layer: nn.Module, x: torch.Tensor, att: AttentionInputs, chunk: int, post: Callable = _identity
) -> torch.Tensor:
    """Graph-free forward of one layer, chunk by chunk: [B, T, D] -> post(layer(x)) [B, T, D].

    `post` is a per-token map applied to each chunk's output (the final norm after the
    last layer, so the last layer's raw output is never kept). Each chunk appends its own
    keys and values before attending, which causality makes sufficient."""
    out = torch.empty_like(x)  # [B, T, D]
    k = v = None
    for s, e in _spans(x.shape[1], chunk):
        n = layer.input_layernorm(x[:, s:e])  # [B, c, D]
        k_c, v_c = layer_kv(layer, n, att, s)  # [B, Hkv, c, d]
        k, v = _kv_into(k, v, k_c, v_c, s, x.shape[1])  # [B, Hkv, T, d]
        out[:, s:e] = post(layer_chunk(layer, x[:, s:e], n, k[:, :, :e], v[:, :, :e], att, s))
    return out


def _kv_into(k: torch.Tensor | None, v: torch.Tensor | None, k_c: torch.Tensor, v_c: torch.Tensor, s: int, t: int):
    """Write a chunk's keys/values [B, Hkv, c, d] at position s of [B, Hkv, T, d] buffers
    (allocated on first use, in the dtype the projections produced)."""
    if k is None:
        k, v = (piece.new_empty(*piece.shape[:2], t, piece.shape[3]) for piece in (k_c, v_c))
    k[:, :, s : s + k_c.shape[2]] = k_c
    v[:, :, s : s + v_c.shape[2]] = v_c
    return k, v


@torch.no_grad()
def sequence_kv(layer: nn.Module, x: torch.Tensor, att: AttentionInputs, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of a whole layer input, without a graph: [B, T, D] -> 2 x [B, Hkv, T, d]."""
    k = v = None
    for s, e in _spans(x.shape[1], chunk):
        k_c, v_c = layer_kv(layer, layer.input_layernorm(x[:, s:e]), att, s)  # [B, Hkv, c, d]
        k, v = _kv_into(k, v, k_c, v_c, s, x.shape[1])  # [B, Hkv, T, d]
    return k, v


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def layer_backward(
    layer: nn.Module,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    att: AttentionInputs,
    chunk: int,
    post: Callable = _identity,
) -> torch.Tensor:
    """Back-propagate dL/d(output) [B, T, D] through post(layer(x)) chunk by chunk.

    Accumulates the layer's parameter gradients into `.grad` and returns dL/dx [B, T, D],
    written into `grad_out`'s storage.

    Chunks go last to first. Keys and values come from a graph-free pass; each chunk's
    gradients w.r.t. them are added into `grad_k`, `grad_v` (for every earlier position
    its queries saw). Once a chunk is reached, every later query has been processed, so
    the gradient w.r.t. its own keys and values is complete: the chunk then recomputes
    its input norm and own K/V with a graph and finishes dL/dx for its positions, and
    nothing [B, T, D]-sized but `grad_out` is live. The norm's gradient from the queries
    and from K/V is summed before going through the norm's backward, as in full backprop
    (this matters because the RMSNorm upcasts to float32: two separate passes through its
    backward would round twice)."""
    k, v = sequence_kv(layer, x, att, chunk)  # [B, Hkv, T, d] each, no graph
    grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)  # [B, Hkv, T, d]
    for s, e in reversed(_spans(x.shape[1], chunk)):
        x_res, x_norm = _leaf(x[:, s:e]), _leaf(x[:, s:e])  # [B, c, D]: residual / norm paths
        k_seen, v_seen = _leaf(k[:, :, :e]), _leaf(v[:, :, :e])  # [B, Hkv, e, d]
        with torch.enable_grad():
            n = layer.input_layernorm(x_norm)  # [B, c, D]
            n_leaf = _leaf(n)
            k_own, v_own = layer_kv(layer, n_leaf, att, s)  # [B, Hkv, c, d], with a graph
            y = post(layer_chunk(layer, x_res, n_leaf, k_seen, v_seen, att, s))  # [B, c, D]
        torch.autograd.backward(y, grad_out[:, s:e])  # queries' share of dL/dn into n_leaf.grad
        grad_k[:, :, :e] += k_seen.grad
        grad_v[:, :, :e] += v_seen.grad
        torch.autograd.backward((k_own, v_own), (grad_k[:, :, s:e], grad_v[:, :, s:e]))  # += K/V share
        torch.autograd.backward(n, n_leaf.grad)
        grad_out[:, s:e] = x_res.grad + x_norm.grad
        del y, n, n_leaf, k_own, v_own, k_seen, v_seen, x_res, x_norm
    return grad_out


def _segments(text_positions: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Packed-sequence ids [B, T] where positions restart (as HF's
    `find_packed_sequence_indices`), or None when every row is one sequence."""
    pos = text_positions.expand(batch, -1)  # [B, T]
    step = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)  # [B, T]
    segment = (step != 1).cumsum(-1)  # [B, T]
    return segment if bool(segment[:, -1].any()) else None


def attention_inputs(
    body: nn.Module, h0: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
    key_bias: torch.Tensor | None = None,
) -> AttentionInputs:
    """Rotary tables and key masks, following the model's own forward.

    Text models (`Qwen2Model.forward`): positions 0..T-1 unless given; packed sequences
    (positions restarting) are detected only when there is no attention mask, as in
    `create_causal_mask`. Qwen2(.5)-VL text models take M-RoPE positions [3, B, T] (or
    [4, B, T] with text positions first, the only form in which they detect packing)."""
    b, t, _ = h0.shape
    text_positions = position_ids  # [B, T] or [1, T] or None
    if body.config.model_type in MROPE_MODEL_TYPES:  # mirrors Qwen2_5_VLTextModel.forward
        text_positions = None
        if position_ids is None:
            position_ids = torch.arange(t, device=h0.device)[None, None].expand(3, b, -1)  # [3, B, T]
        elif position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, position_ids.shape[0], -1)  # [3, B, T]
        elif position_ids.shape[0] == 4:
            text_positions, position_ids = position_ids[0], position_ids[1:]
    elif position_ids is None:
        position_ids = torch.arange(t, device=h0.device)[None]  # [1, T]
    segment = None
    if text_positions is not None and attention_mask is None:
        segment = _segments(text_positions, b)
    cos, sin = body.rotary_emb(h0, position_ids)  # [B or 1, T, d]
    keep = None
    if attention_mask is not None and not bool(attention_mask.all()):
        keep = attention_mask.to(device=h0.device, dtype=torch.bool)  # [B, T]
    if key_bias is not None:
        key_bias = key_bias.to(device=h0.device).expand(b, t)  # [B, T]
    return AttentionInputs(cos=cos, sin=sin, key_keep=keep, segment=segment, key_bias=key_bias)


def embedding_backward(emb: nn.Module, ids: torch.Tensor, grad: torch.Tensor) -> None:
    """Add dL/dW of `emb(ids)` into `emb.weight.grad` given dL/d(output) [B, T, D].

    A plain `nn.Embedding` gets the rows added in place (index_add_), as its backward
    does, without re-running the lookup or building a second [V, D] buffer; padding_idx
    rows get nothing. Anything else goes through autograd."""
    weight = emb.weight
    if not weight.requires_grad:
        return
    if type(emb) is not nn.Embedding or emb.max_norm is not None or emb.scale_grad_by_freq:
        with torch.enable_grad():
            torch.autograd.backward(emb(ids), grad)
        return
    idx, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])  # [B*T], [B*T, D]
    if emb.padding_idx is not None:
        keep = idx != emb.padding_idx
        idx, rows = idx[keep], rows[keep]
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    weight.grad.index_add_(0, idx, rows.to(weight.dtype))


def streambp_backward(
    model: nn.Module,
    head_backward: HeadBackward,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    chunk: int = 256,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward, loss and exact backward of a decoder LM without a full activation stack.

    Give exactly one of `input_ids` [B, T] or `inputs_embeds` [B, T, D]. `head_backward`
    maps the final hidden states to (loss, their gradient); `streambp/logprobs.py` builds
    it from a `loss_fn(logprobs [B, T])`. Parameter gradients accumulate into `.grad`
    (call `zero_grad` yourself). Returns `(loss, grad)` where `grad` is dL/d inputs_embeds
    [B, T, D] when embeddings were given (e.g. with video features spliced in), else None
    (the token-embedding gradient has then gone into `embed_tokens.weight.grad`).
    `key_bias` [B, T]: added to every attention logit of each key (proportional attention
    on reduced videos, `models.key_bias`).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be at least 1")
    check_supported(model)
    body = decoder_body(model)
    layers = list(body.layers)

    # ---- forward without a graph, keeping each layer's input (the only O(L T) memory) ----
    with torch.no_grad():
        h = body.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.detach()  # [B, T, D]
        att = attention_inputs(body, h, attention_mask, position_ids, key_bias)
        # Layer inputs, except the embedding lookup (re-done in the backward: cheaper than
        # keeping it). Given `inputs_embeds` are the caller's: keeping them costs nothing.
        inputs = [None if input_ids is not None else h]
        for layer in layers[:-1]:
            h = layer_forward(layer, h, att, chunk)
            inputs.append(h)
        # The final norm rides on the last layer's chunks: its raw output is never stored.
        final = layer_forward(layers[-1], h, att, chunk, post=body.norm)  # [B, T, D]
        del h
    loss, grad = head_backward(final)  # grad: [B, T, D]
    del final

    # ---- backward: layers last to first (the final norm with the last), then the embedding ----
    for i in reversed(range(len(layers))):
        x = inputs.pop()
        if x is None:
            with torch.no_grad():
                x = body.embed_tokens(input_ids)  # [B, T, D]
        post = body.norm if i == len(layers) - 1 else _identity
        grad = layer_backward(layers[i], x, grad, att, chunk, post)
        del x
    if inputs_embeds is not None:
        return loss, grad
    embedding_backward(body.embed_tokens, input_ids, grad)
    return loss, None


def supports(model: nn.Module) -> bool:
    """Whether `streambp_backward` handles this model (see `check_supported`)."""
    try:
        check_supported(model)
    except UserError:
        return False
    return True

