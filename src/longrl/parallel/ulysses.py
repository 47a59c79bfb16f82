"""Ulysses sequence parallelism for the softmax attention of Hugging Face decoder LMs.

Paper: DeepSpeed-Ulysses (S. A. Jacobs et al., arXiv 2309.14509). Each of the P
ranks of a sequence-parallel group holds T/P contiguous tokens. Everything in a
decoder layer except attention is per token and runs on the shard as it is.
Around attention, one all-to-all trades the sequence shard for a head shard:

    q, k, v of T/P tokens, all heads  -> all-to-all ->  q, k, v of all T tokens, H/P heads
    causal attention over the whole sequence for those heads
    output of T tokens, H/P heads     -> all-to-all ->  output of T/P tokens, all heads

The all-to-all is its own adjoint (what rank i sent to rank j, rank j sends
back as a gradient), so the backward is the same exchange on the gradients.

Integration with transformers 5.x (Qwen2 / Qwen2.5 / Qwen3 / Llama): the attention
modules call `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` with q, k, v
after rotary embeddings. This module registers one more implementation,
"longrl_ulysses"; `enable_ulysses(model, group)` switches the model's text config to it
and tags every attention module with the group for the duration of a `with`
block (the rollout engine keeps using the model's normal attention outside it).
Rotary embeddings see the shard's GLOBAL positions (`shard_for_sp`).

Departures from the paper:
- q, k and v travel in ONE all-to-all per layer (concatenated along heads), not three.
- GQA with fewer key/value heads than ranks (Hkv not divisible by P): each kv
  head is repeated r = P / gcd(Hkv, P) times before the exchange (the smallest
  repeat that splits evenly and keeps every query head next to its kv head).
  This sends up to r times more k/v bytes than a kv-head-aware scheme; the
  repeat's backward sums the copies' gradients, so gradients stay exact.
- T not divisible by P: the sequence is padded at the END. Causal attention
  means real tokens never attend to the padding, so their outputs are exact;
  padded positions must carry loss mask 0.
- No padding / packing attention mask and no sliding-window layers: sequences
  are right-padded (as `streambp.logprobs.TokenBatch`) and attention is plain
  causal over the whole row. Both are refused loudly rather than ignored.
- The LM head and loss stay sharded (log-probs are per position); only the
  [B, T] log-probs are all-gathered, so sequence-level losses (GSPO,
  seq-mean-token-mean) see whole sequences. See `sp_loss_and_backward`.

Letters: B batch, T full (padded) length, L = T/P tokens per shard, H query heads,
Hkv kv heads, d head dim, D hidden size, P ranks in the group.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface

from longrl.models.key_bias import with_bias_column
from longrl.streambp.logprobs import LossFn, TokenBatch, backward_chunked_head, chunked_logprobs, lm_head_params

ATTN_NAME = "longrl_ulysses"
_GROUP_ATTR = "longrl_sp_group"


# ----------------------------------------------------------------------------------------
# Communication
# ----------------------------------------------------------------------------------------


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    """x [P, ...]: send x[j] to rank j; returns y [P, ...] with y[i] received from rank i."""
    x = x.contiguous()
    y = torch.empty_like(x)  # after .contiguous(): empty_like keeps a permuted input's strides
    dist.all_to_all_single(y, x, group=group)
    return y


class _AllToAll(torch.autograd.Function):
    """`_exchange` with autograd. The exchange is its own adjoint: the gradient of
    y[i] (which came from rank i) is sent back to rank i, where it is the gradient
    of what that rank sent."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group), None


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-to-all over the leading [P] axis of x (identity when P = 1)."""
    return x if dist.get_world_size(group) == 1 else _AllToAll.apply(x, group)


class _GatherSeq(torch.autograd.Function):
    """Concatenate every rank's [B, L] shard along the sequence -> [B, P*L].

    Backward returns this rank's slice of the gradient WITHOUT summing over ranks:
    it is meant for a loss that every rank of the group computes identically
    from the gathered tensor, so each rank owns the gradient of its own slice.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank, ctx.length = dist.get_rank(group), x.shape[1]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(1, ctx.rank * ctx.length, ctx.length), None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[B, L] shard -> [B, P*L] on every rank; see `_GatherSeq` for the gradient rule."""
    return x if dist.get_world_size(group) == 1 else _GatherSeq.apply(x, group)


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------


def kv_repeats(num_heads: int, num_kv_heads: int, P: int) -> int:
    """How many times to repeat each kv head so that kv heads split evenly over P ranks
    and each rank's query heads find their kv heads locally (1 when Hkv % P == 0)."""
    if num_heads % P:
        raise ValueError(f"Ulysses needs the number of attention heads ({num_heads}) to be divisible by the "
                         f"sequence-parallel size ({P})")
    return P // math.gcd(num_kv_heads, P)


def _seq_to_heads(x: torch.Tensor, P: int) -> torch.Tensor:
    """[B, h, L, d] -> [P, B, h/P, L, d]: head block j is what rank j will attend with."""
    B, h, L, d = x.shape
    return x.view(B, P, h // P, L, d).transpose(0, 1)


def ulysses_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, key_bias=None, **kwargs):
    """The "longrl_ulysses" AttentionInterface function.

    query [B, H, L, d], key/value [B, Hkv, L, d] (this rank's tokens, rotary applied)
    -> (output [B, L, H, d], None), as transformers' own implementations return.
    `key_bias` [B, P*L]: a per-key logit bias over the whole padded rows (proportional
    attention, `models.key_bias`), added after the all-to-all.
    """
    if not hasattr(module, _GROUP_ATTR):  # the group itself may be None (the default group)
        raise RuntimeError("longrl_ulysses attention called outside `enable_ulysses(model, group)`")
    if sliding_window is not None:
        raise NotImplementedError("Ulysses attention does not support sliding-window layers")
    group = getattr(module, _GROUP_ATTR)
    P = dist.get_world_size(group)
    B, H, L, d = query.shape
    if attention_mask is not None:
        raise ValueError("Ulysses attention is causal over whole rows; pass no attention mask "
                         "(right-pad sequences instead)")
    r = kv_repeats(H, key.shape[1], P)
    if r > 1:
        key, value = key.repeat_interleave(r, dim=1), value.repeat_interleave(r, dim=1)  # [B, Hkv*r, L, d]
    hq, hkv = H // P, key.shape[1] // P
    # One exchange for q, k and v: per destination rank, its q, k and v head blocks side by side.
    send = torch.cat([_seq_to_heads(t, P) for t in (query, key, value)], dim=2)  # [P, B, hq+2hkv, L, d]
    recv = all_to_all(send, group)  # [P, B, hq+2hkv, L, d]; recv[i] = tokens of rank i
    full = recv.permute(1, 2, 0, 3, 4).reshape(B, hq + 2 * hkv, P * L, d)  # [B, hq+2hkv, T, d]
    q, k, v = full.split([hq, hkv, hkv], dim=1)  # [B, hq, T, d], [B, hkv, T, d] x2
    scale = d ** -0.5 if scaling is None else scaling
    if key_bias is not None:  # more head dimensions carry the bias (no [T, T] mask)
        q, k, v = with_bias_column(q, k, v, key_bias, scale)  # [B, hq | hkv, T, d']
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                         scale=scaling if key_bias is None else scale,
                                         enable_gqa=hq != hkv)[..., :d].contiguous()  # [B, hq, T, d]
    back = all_to_all(out.view(B, hq, P, L, d).permute(2, 0, 1, 3, 4), group)  # [P, B, hq, L, d]; [j] = heads of rank j
    out = back.permute(1, 0, 2, 3, 4).reshape(B, H, L, d)  # [B, H, L, d]
    return out.transpose(1, 2).contiguous(), None  # [B, L, H, d]


AttentionInterface.register(ATTN_NAME, ulysses_attention)


def attention_modules(model, text_config) -> list[torch.nn.Module]:
    """The decoder's softmax-attention modules (q/k/o projections, built from `text_config`):
    the ones Ulysses shards; empty for a model without them."""
    return [m for m in model.modules()
            if getattr(m, "config", None) is text_config and all(hasattr(m, a) for a in ("q_proj", "k_proj", "o_proj"))]


@contextmanager
def enable_ulysses(model, group=None):
    """Within the block, `model`'s decoder attention runs sequence-parallel over `group`.

    Every rank of the group must run the same forward (and backward) with its own
    shard of the tokens (`shard_for_sp`). Keep the block open through the
    backward when activation checkpointing recomputes attention during it.
    """
    cfg = model.config.get_text_config()
    modules = attention_modules(model, cfg)
    if not modules:
        raise ValueError(f"{type(model).__name__}: found no attention modules (q_proj/k_proj/o_proj) to patch")
    P = dist.get_world_size(group)
    kv_repeats(cfg.num_attention_heads, cfg.num_key_value_heads, P)  # fail before any forward
    if any(getattr(m, "sliding_window", None) for m in modules):
        raise NotImplementedError("Ulysses attention does not support sliding-window layers")
    previous = cfg._attn_implementation
    cfg._attn_implementation_internal = ATTN_NAME  # bypass the setter: it would re-dispatch sub-configs
    for m in modules:
        setattr(m, _GROUP_ATTR, group)
    try:
        yield model
    finally:
        cfg._attn_implementation_internal = previous
        for m in modules:
            delattr(m, _GROUP_ATTR)


# ----------------------------------------------------------------------------------------
# Sharding and the chunked log-prob path
# ----------------------------------------------------------------------------------------


def shard_for_sp(x: torch.Tensor, rank: int, world: int, pad_value=0) -> torch.Tensor:
    """This rank's contiguous shard of x [B, T, ...] along dim 1, the end padded with
    `pad_value` to a multiple of `world` -> [B, ceil(T / world), ...]."""
    T = x.shape[1]
    L = -(-T // world)  # ceil
    if L * world > T:
        pad = x.new_full((x.shape[0], L * world - T, *x.shape[2:]), pad_value)
        x = torch.cat([x, pad], dim=1)
    return x[:, rank * L : (rank + 1) * L]


def shard_positions(batch_size: int, T: int, rank: int, world: int, device=None) -> torch.Tensor:
    """Global position ids of this rank's shard: [B, L]. Padding continues the count
    (T, T+1, ...); causal attention keeps real tokens from ever seeing it."""
    L = -(-T // world)  # ceil
    return torch.arange(rank * L, (rank + 1) * L, device=device)[None].expand(batch_size, L)


def shard_batch(batch: TokenBatch, rank: int, world: int) -> tuple[TokenBatch, torch.Tensor]:
    """This rank's shard of a right-padded TokenBatch (padding masked out) and its position ids [B, L]."""
    B, T = batch.input_ids.shape
    shard = TokenBatch(shard_for_sp(batch.input_ids, rank, world), shard_for_sp(batch.targets, rank, world),
                       shard_for_sp(batch.mask, rank, world, pad_value=0))
    return shard, shard_positions(B, T, rank, world, batch.input_ids.device)


def sp_final_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor, group=None) -> torch.Tensor:
    """Body forward (after the final norm) of this rank's shard: [B, L] -> [B, L, D].

    The sequence-parallel twin of `streambp.logprobs.final_hidden`. The backward
    of the result must be run by every rank of the group (it exchanges
    gradients); if the model recomputes activations in the backward
    (checkpointing), run it inside `enable_ulysses(model, group)` as well.
    """
    with enable_ulysses(model, group):
        return model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


@torch.no_grad()
def sp_sequence_logprobs(model, batch: TokenBatch, group=None, chunk: int = 256,
                         temperature: float = 1.0) -> torch.Tensor:
    """Sequence-parallel `streambp.logprobs.sequence_logprobs`: every rank of the group
    passes the same full batch and gets the full [B, T] log-probs (0 where unmasked)."""
    T = batch.input_ids.shape[1]
    shard, positions = shard_batch(batch, dist.get_rank(group), dist.get_world_size(group))
    hidden = sp_final_hidden(model, shard.input_ids, positions, group)  # [B, L, D]
    weight, bias = lm_head_params(model)
    logp = chunked_logprobs(hidden, weight, bias, shard.targets, shard.mask, chunk, temperature)  # [B, L]
    return gather_sequence(logp, group)[:, :T]  # [B, T]


def sp_loss_and_backward(model, batch: TokenBatch, loss_fn: LossFn, group=None, *, chunk: int = 256,
                         temperature: float = 1.0):
    """Sequence-parallel `streambp.logprobs.loss_and_backward` (chunked head): every rank of
    the group passes the same full micro-batch and the same loss_fn.

    Each rank runs the body on its shard and the chunked head on its shard's
    positions; the [B, L] log-probs are all-gathered so `loss_fn` sees whole
    [B, T] rows (sequence-level terms stay exact) and every rank computes the
    same loss. A rank back-propagates only through its own positions, so the
    parameter gradients of the group's ranks must be SUMMED
    (`parallel.dist.all_reduce_gradients`) to give the full gradient.
    Returns (loss, metrics, logprobs [B, T]), identical on every rank.
    """
    T = batch.input_ids.shape[1]
    shard, positions = shard_batch(batch, dist.get_rank(group), dist.get_world_size(group))

    def body():  # [B, L] -> [B, L, D]
        return model.base_model(input_ids=shard.input_ids, position_ids=positions, use_cache=False).last_hidden_state

    return sp_body_loss_and_backward(model, body, shard, T, loss_fn, group, chunk=chunk, temperature=temperature)


def sp_body_loss_and_backward(model, body, shard: TokenBatch, T: int, loss_fn: LossFn, group=None, *,
                              chunk: int = 256, temperature: float = 1.0):
    """The part of `sp_loss_and_backward` after sharding, for any body: `body()` returns this
    rank's final hidden states [B, L, D] (e.g. a language model on sharded inputs_embeds with
    multimodal positions). `shard` is this rank's TokenBatch shard, T the unpadded length."""
    weight, bias = lm_head_params(model)
    full_logp = {}

    def shard_loss(logp_shard):  # [B, L] -> the loss of the whole rows
        logp = gather_sequence(logp_shard, group)[:, :T]  # [B, T]
        full_logp["value"] = logp.detach()
        return loss_fn(logp)

    with enable_ulysses(model, group):  # open through the backward: checkpointing recomputes attention there
        hidden = body()  # [B, L, D]
        loss, metrics, grad_h, _ = backward_chunked_head(hidden, weight, bias, shard.targets, shard.mask,
                                                         shard_loss, chunk, temperature)
        hidden.backward(grad_h)
    return loss, metrics, full_logp["value"]
