"""Sequence-parallel GLA: each rank holds a contiguous shard of the sequence.

A shard's outputs split into a local part (zero initial state) and a
correction from its true initial state S_p, which comes from the other ranks:

    o_t = o_local_t + (scale * q_t * exp(b_t)) @ S_p       # b_t: log decay from shard start to t
    final_p = exp(c_p) * S_p + L_p                          # c_p = b at the shard's last token

S_p is passed by ZeCO All-Scan (`allscan.py`, method "allscan") or by the
LASP-2 all-gather (`lasp2.py`, method "lasp2"). The exchange is started as soon
as L_p is known and finished after the local outputs, so the two overlap.

Sliding-window softmax layers (the hybrid model) need only the window-1 keys and
values before the shard: `window_halo` gathers them from the preceding ranks.

Padding: a sequence whose length is not a multiple of P is padded at the end
(`shard_sequence`); padded tokens must carry k = 0 and g = 0 (GLAttention does
this from `valid`), so they change neither real outputs nor the final state.

Letters: B batch, H heads, T tokens of this shard, K key dim, V value dim, P ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longrl.models.gla import gla_chunk_outputs, gla_chunk_states
from longrl.parallel.allscan import AllScanRelay, CommCounter, allscan_finish
from longrl.parallel.lasp2 import Lasp2Gather, allgather_finish

METHODS = ("allscan", "lasp2")


def gla_sequence_parallel(q, k, v, g, group=None, *, method="allscan", num_blocks=4, chunk_size=16,
                          scale=None, initial_state=None, counter: CommCounter | None = None):
    """GLA over a sequence sharded across the ranks of `group`; call on every rank.

    q, k, g: [B, H, T, K] and v: [B, H, T, V] are this rank's shard (g = log decay).
    `initial_state` [B, H, K, V] is the global initial state, used on rank 0 only.
    Returns this shard's outputs [B, H, T, V] and its final state [B, H, K, V]
    (on the last rank, the final state of the whole sequence).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rank = dist.get_rank(group)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # rank 0 starts from the global initial state, so its L_0 already carries it
    states, local_final = gla_chunk_states(k, v, g, chunk_size, initial_state if rank == 0 else None)
    b = g.cumsum(-2)  # [B, H, T, K]
    log_decay = b[..., -1, :]  # [B, H, K] = c_p
    if method == "allscan":
        exchange = AllScanRelay(group, num_blocks, counter).start(local_final, log_decay)
    else:
        exchange = Lasp2Gather(group, counter).start(local_final, log_decay)
    o_local = gla_chunk_outputs(q, k, v, g, states, chunk_size, scale)  # overlaps the exchange
    finish = allscan_finish if method == "allscan" else allgather_finish
    s_in = finish(local_final, log_decay, exchange)  # [B, H, K, V]
    o = o_local + torch.einsum("bhtk,bhkv->bhtv", q * scale * b.exp(), s_in)
    final = log_decay.exp().unsqueeze(-1) * s_in + local_final
    return o, final


@dataclass
class GLASequenceParallel:
    """What a GLA layer needs to run sequence-parallel; pass as `sp=` to GLAttention/GLAForCausalLM."""

    group: object = None
    """Process group whose ranks hold consecutive shards (None = default group)."""
    method: str = "allscan"
    """'allscan' (ZeCO relay) or 'lasp2' (all-gather baseline)."""
    num_blocks: int = 4
    """All-Scan pipeline blocks along d_k."""
    counter: CommCounter | None = None
    """Optional byte counter for the state exchange."""

    def attend(self, q, k, v, g, chunk_size, scale=None):
        return gla_sequence_parallel(q, k, v, g, self.group, method=self.method, num_blocks=self.num_blocks,
                                     chunk_size=chunk_size, scale=scale, counter=self.counter)

    def window_halo(self, k, v, valid, n):
        return window_halo(k, v, valid, n, self.group)


class _GatherTails(torch.autograd.Function):
    """Every rank's x stacked in rank order -> [P, ...]; backward: the gradient of every
    rank's use of the stack is all-reduced and each rank keeps its own slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def window_halo(k, v, valid, n, group=None):
    """The `n` keys and values just before this rank's shard, for sliding-window attention.

    k, v: [B, H, T, hd] this rank's shard; valid: [B, T] bool. Every rank sends its last
    min(n, T) keys/values (one all-gather, P * min(n, T) tokens) and keeps what its
    predecessors sent: the last n tokens before its shard (fewer on the first ranks). The
    gradient flows back to the ranks the keys came from. Returns (k_halo, v_halo
    [B, H, L, hd], valid_halo [B, L]) with L <= n; L = 0 on rank 0. Call on every rank.
    """
    B, H, T, hd = k.shape
    rank, h = dist.get_rank(group), min(n, T)
    kv = _GatherTails.apply(torch.stack([k[:, :, T - h:], v[:, :, T - h:]]), group)  # [P, 2, B, H, h, hd]
    ok = [torch.empty_like(valid[:, T - h:]) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ok, valid[:, T - h:].contiguous(), group=group)  # [B, h] each, no gradient
    prev = kv[:rank].permute(1, 2, 3, 0, 4, 5).reshape(2, B, H, rank * h, hd)[:, :, :, max(0, rank * h - n):]
    ok = torch.cat(ok[:rank], dim=1)[:, max(0, rank * h - n):] if rank else valid[:, :0]
    return prev[0], prev[1], ok


def shard_sequence(x, group=None, dim=1):
    """This rank's contiguous shard of x along `dim`, zero-padding the end to a multiple of P.

    Returns (shard, valid) with valid [T_shard] bool marking real (unpadded) positions.
    """
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    total = x.shape[dim]
    per = -(-total // P)  # ceil
    pad = per * P - total
    if pad:
        widths = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, pad]
        x = F.pad(x, widths)
    positions = torch.arange(rank * per, (rank + 1) * per, device=x.device)
    return x.narrow(dim, rank * per, per), positions < total
