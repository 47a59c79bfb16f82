"""ZeCO All-Scan: pipelined state passing for sequence-parallel linear attention.

Paper: "ZeCO: Zero Communication Overhead Sequence Parallelism for Linear
Attention", arXiv 2507.01004. The sequence is split into P contiguous shards,
one per rank. Rank p computes its shard's final state L_p from a zero initial
state and its whole-shard log decay c_p (sum of the shard's log gates). The true
initial states follow the scan

    S_0 = 0,    S_{p+1} = exp(c_p) * S_p + L_p              # [B, H, K, V], decay over K

All-Scan runs it as a relay: rank p receives S_p from p-1 in `num_blocks`
blocks along K, and as soon as block i has arrived it folds in its own block
and sends block i of S_{p+1} on to p+1. Each rank sends one state, whatever P.
The decay is diagonal over K, so the K-blocks are independent and can be
pipelined.

Backward runs the same relay from the last rank to the first. With G_p the
gradient that rank p's own outputs put on S_p, the total gradient on S_p is

    Gt_p = G_p + exp(c_p) * Gt_{p+1},    Gt_P = 0
    dL/dL_p = Gt_{p+1},    dL/dc_p = exp(c_p) * sum_V(Gt_{p+1} * S_p)

Departures from the paper:
- No CUDA streams: the relay is started (receives posted; rank 0 sends at once)
  before the shard's intra-chunk outputs are computed and finished after them,
  so transfers overlap local compute, but a middle rank forwards its blocks only
  once its own outputs are done. In backward the relay runs when autograd
  reaches it; it is pipelined over K-blocks but not overlapped with other work.
- A global initial state is folded into rank 0's local state by the caller,
  so the relay always starts from zero.

Letters: B batch, H heads, K key dim, V value dim, P ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommCounter:
    """Bytes of tensors this rank handed to send / all-gather calls, by direction."""

    bytes_sent: dict = field(default_factory=lambda: {"forward": 0, "backward": 0})
    messages: dict = field(default_factory=lambda: {"forward": 0, "backward": 0})

    def add(self, direction: str, tensor: torch.Tensor, copies: int = 1) -> None:
        self.bytes_sent[direction] += copies * tensor.numel() * tensor.element_size()
        self.messages[direction] += copies


def _count(counter, direction, tensor, copies=1):
    if counter is not None:
        counter.add(direction, tensor, copies)


def k_blocks(K: int, num_blocks: int) -> list[slice]:
    """Split range(K) into at most `num_blocks` near-equal contiguous slices."""
    n = max(1, min(num_blocks, K))
    bounds = [round(i * K / n) for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def scan_input_grads(gt_next, log_decay, s_in):
    """Gradients on (L_p, c_p) given Gt_{p+1}, the total gradient on the next rank's S.

    gt_next, s_in: [B, H, K, V]; log_decay: [B, H, K].
    """
    return gt_next, log_decay.exp() * (gt_next * s_in).sum(-1)


def _peer(group, group_rank):
    # p2p calls take global ranks, whatever the group
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


class AllScanRelay:
    """One rank's part of the forward relay, split into `start` and `finish`.

    `start` posts the receives (and on rank 0 sends at once); `finish` waits for
    each block in turn, forwards it, and returns this rank's input state S_p.
    Call local work between the two to overlap it with the transfers.
    """

    def __init__(self, group=None, num_blocks: int = 4, counter: CommCounter | None = None):
        self.group, self.num_blocks, self.counter = group, num_blocks, counter
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def start(self, local_state, log_decay):
        """local_state [B, H, K, V] = L_p, log_decay [B, H, K] = c_p (no grad needed)."""
        self.local = local_state.detach()
        self.decay = log_decay.detach().exp().unsqueeze(-1)  # [B, H, K, 1]
        self.blocks = k_blocks(self.local.shape[-2], self.num_blocks)
        self.recvs, self.sends = [], []
        if self.rank > 0:
            for i, sl in enumerate(self.blocks):
                buf = torch.empty_like(self.local[..., sl, :], memory_format=torch.contiguous_format)
                self.recvs.append((buf, dist.irecv(buf, src=_peer(self.group, self.rank - 1), group=self.group, tag=i)))
        elif self.world > 1:
            for i, sl in enumerate(self.blocks):  # S_0 = 0, so S_1 = L_0
                self._send(self.local[..., sl, :].contiguous(), i)
        return self

    def _send(self, block, tag):
        _count(self.counter, "forward", block)
        self.sends.append((block, dist.isend(block, dst=_peer(self.group, self.rank + 1), group=self.group, tag=tag)))

    def finish(self):
        """Wait, fold, forward; returns S_p [B, H, K, V]."""
        if self.rank == 0:
            s_in = torch.zeros_like(self.local)
        else:
            parts = []
            for i, (sl, (buf, req)) in enumerate(zip(self.blocks, self.recvs)):
                req.wait()
                parts.append(buf)
                if self.rank < self.world - 1:
                    self._send(self.decay[..., sl, :] * buf + self.local[..., sl, :], i)  # block of S_{p+1}
            s_in = torch.cat(parts, dim=-2)
        for _, req in self.sends:
            req.wait()
        self.sends = []
        return s_in


def _relay_backward(grad_s_in, log_decay, group, num_blocks, counter):
    """Reverse relay: receive Gt_{p+1} from p+1 block by block, send Gt_p to p-1."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    decay = log_decay.exp().unsqueeze(-1)  # [B, H, K, 1]
    blocks = k_blocks(grad_s_in.shape[-2], num_blocks)
    recvs = []
    if rank < world - 1:
        for i, sl in enumerate(blocks):
            buf = torch.empty_like(grad_s_in[..., sl, :], memory_format=torch.contiguous_format)
            recvs.append((buf, dist.irecv(buf, src=_peer(group, rank + 1), group=group, tag=i)))
    parts, sends = [], []
    for i, sl in enumerate(blocks):
        if recvs:
            buf, req = recvs[i]
            req.wait()
            parts.append(buf)
            gt = grad_s_in[..., sl, :] + decay[..., sl, :] * buf  # block of Gt_p
        else:
            gt = grad_s_in[..., sl, :].contiguous()  # last rank: Gt_P = 0
        if rank > 0:
            _count(counter, "backward", gt)
            sends.append((gt, dist.isend(gt, dst=_peer(group, rank - 1), group=group, tag=i)))
    for _, req in sends:
        req.wait()
    return torch.cat(parts, dim=-2) if parts else torch.zeros_like(grad_s_in)  # Gt_{p+1}


class _AllScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_state, log_decay, relay):
        s_in = relay.finish()
        ctx.save_for_backward(log_decay, s_in)
        ctx.group, ctx.num_blocks, ctx.counter = relay.group, relay.num_blocks, relay.counter
        return s_in

    @staticmethod
    def backward(ctx, grad_s_in):
        log_decay, s_in = ctx.saved_tensors
        gt_next = _relay_backward(grad_s_in.contiguous(), log_decay, ctx.group, ctx.num_blocks, ctx.counter)
        grad_local, grad_log_decay = scan_input_grads(gt_next, log_decay, s_in)
        return grad_local, grad_log_decay, None


def allscan_finish(local_state, log_decay, relay: AllScanRelay):
    """Differentiable end of the relay started with `relay.start(local_state, log_decay)`.

    Returns S_p [B, H, K, V]; gradients reach every rank's L and c through the
    reverse relay.
    """
    return _AllScanFn.apply(local_state, log_decay, relay)


def allscan_states(local_state, log_decay, group=None, num_blocks=4, counter=None):
    """All-Scan in one call (no local work overlapped): S_p from every rank's (L, c)."""
    relay = AllScanRelay(group, num_blocks, counter).start(local_state, log_decay)
    return allscan_finish(local_state, log_decay, relay)
