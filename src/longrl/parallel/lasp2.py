"""LASP-2-style state passing: the all-gather baseline that All-Scan is measured against.

Paper: Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear
Attention and Its Hybrid", arXiv 2502.07563. Every rank all-gathers all ranks'
(local final state L_j, whole-shard log decay c_j) and folds the prefix itself:

    S_p = sum_{j<p} exp(c_{j+1} + ... + c_{p-1}) * L_j      # [B, H, K, V]

Backward all-gathers every rank's gradient on its S and folds the suffix to
Gt_{p+1} (notation as in `allscan.py`). Each rank ships (P - 1) copies of its
(state, decay) per direction, so traffic grows with P; All-Scan's does not.

Departures from the paper: the gather is asynchronous and started before the
shard's intra-chunk outputs, so it overlaps them the same way All-Scan's relay
does; a global initial state is folded into rank 0's local state by the caller.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from longrl.parallel.allscan import CommCounter, scan_input_grads


def _all_gather_async(x, group, counter, direction):
    """Start an all-gather of x; returns (list of P tensors, work handle)."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(world)]
    if counter is not None:  # each rank's tensor must reach P - 1 peers
        counter.add(direction, x, copies=world - 1)
    return out, dist.all_gather(out, x, group=group, async_op=True)


class Lasp2Gather:
    """Start the forward all-gather of (L_p, c_p); `allgather_finish` waits and folds."""

    def __init__(self, group=None, counter: CommCounter | None = None):
        self.group, self.counter = group, counter

    def start(self, local_state, log_decay):
        """local_state [B, H, K, V], log_decay [B, H, K]; sent packed as one flat buffer."""
        self.state_shape = local_state.shape
        packed = torch.cat([local_state.detach().flatten(), log_decay.detach().flatten()])  # [BHKV + BHK]
        self.gathered, self.work = _all_gather_async(packed, self.group, self.counter, "forward")
        return self

    def finish(self):
        """Returns S_p [B, H, K, V] and all ranks' log decays [P, B, H, K]."""
        self.work.wait()
        n = self.state_shape.numel()
        states = [x[:n].view(self.state_shape) for x in self.gathered]  # P x [B, H, K, V]
        log_decays = torch.stack([x[n:].view(self.state_shape[:-1]) for x in self.gathered])  # [P, B, H, K]
        s_in = torch.zeros(self.state_shape, dtype=states[0].dtype, device=states[0].device)
        for j in range(dist.get_rank(self.group)):
            s_in = log_decays[j].exp().unsqueeze(-1) * s_in + states[j]
        return s_in, log_decays


class _GatherScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_state, log_decay, gather):
        s_in, log_decays = gather.finish()
        ctx.save_for_backward(log_decays, s_in)
        ctx.group, ctx.counter = gather.group, gather.counter
        return s_in

    @staticmethod
    def backward(ctx, grad_s_in):
        log_decays, s_in = ctx.saved_tensors
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        grads, work = _all_gather_async(grad_s_in, ctx.group, ctx.counter, "backward")
        work.wait()
        gt_next = torch.zeros_like(grad_s_in)  # Gt_P = 0
        for q in range(world - 1, rank, -1):
            gt_next = grads[q] + log_decays[q].exp().unsqueeze(-1) * gt_next  # Gt_q
        return (*scan_input_grads(gt_next, log_decays[rank], s_in), None)


def allgather_finish(local_state, log_decay, gather: Lasp2Gather):
    """Differentiable end of the gather started with `gather.start(local_state, log_decay)`."""
    return _GatherScanFn.apply(local_state, log_decay, gather)


def allgather_states(local_state, log_decay, group=None, counter=None):
    """LASP-2 state passing in one call: S_p from every rank's (L, c)."""
    gather = Lasp2Gather(group, counter).start(local_state, log_decay)
    return allgather_finish(local_state, log_decay, gather)
