"""Data parallelism over torch.distributed: process setup, reductions, and the global loss normaliser.

Every function here also works in a single process that never called
`init_process_group` (rank 0 of a world of 1, reductions are the identity), so
a recipe can call them unconditionally.

How longrl splits an RL step over R data-parallel ranks, and why gradients are
SUMMED rather than averaged:

    loss = sum over the step's valid tokens (or sequences) of x / D

`rl.losses.loss_normalizer` gives the denominator D once per optimizer step.
With the step batch split over ranks, D must still be the count over the WHOLE
step (`global_loss_normalizer`, an all-reduce of the per-rank counts). Each
rank's loss is then its share of the global loss, and the global gradient is
the SUM of the per-rank gradients (`all_reduce_gradients(model)`, the default
op). Averaging instead (what DistributedDataParallel does) is only right when
every rank divides by a local normaliser and every rank holds the same number
of tokens, which uneven response lengths break. `average=True` is there for
that other convention (e.g. an SFT loss already normalised per rank with equal
shares).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longrl.rl.losses import loss_normalizer


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its global rank, the world size, its local rank and device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistContext:
    """Join the process group described by torchrun's environment variables.

    Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT through
    init_method "env://"). Uses NCCL with one GPU per process (cuda:LOCAL_RANK)
    when CUDA is available, else gloo on CPU. Without WORLD_SIZE (a plain
    `python` / `longrl` run) nothing is initialised and a single-process
    context is returned. Calling it again after the group exists returns the
    same context.
    """
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistContext(0, 1, 0, device, None)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if _active() else 0


def world(group=None) -> int:
    return dist.get_world_size(group) if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier(group=None) -> None:
    if _active():
        dist.barrier(group)


def _comm_device(group=None) -> torch.device:
    """NCCL reduces only CUDA tensors; gloo only CPU ones."""
    if _active() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x, group=None):
    """Sum of x over the ranks of `group`. A float gives a float (reduced in float64);
    a tensor gives a new tensor on x's device and dtype (x itself is not modified)."""
    if isinstance(x, torch.Tensor):
        if not _active():
            return x.clone()
        buf = x.detach().to(_comm_device(group), copy=True)
        dist.all_reduce(buf, group=group)
        return buf.to(x.device)
    if not _active():
        return float(x)
    buf = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device(group))
    dist.all_reduce(buf, group=group)
    return float(buf.item())


def broadcast_object(obj, src: int = 0, group=None):
    """Rank `src`'s object on every rank (pickled; small things only: configs, index lists).
    `src` is a global rank, as in torch.distributed."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=_comm_device(group))
    return box[0]


def global_loss_normalizer(mask: torch.Tensor, loss_agg: str, group=None) -> float:
    """`loss_normalizer` of the union of every data-parallel rank's step batch.

    `mask` [B_r, T_r] is this rank's whole step batch (before micro-batching).
    The per-rank counts are summed, then clamped to >= 1 as `loss_normalizer`
    does. The counting rule itself stays in `loss_normalizer`: a rank's count is
    its value there, or 0 when the rank has no valid token at all (the only
    case its clamp changes the count). Pass the data-parallel group; ranks of
    one sequence-parallel group share a batch and must not be counted twice.
    """
    local = loss_normalizer(mask, loss_agg) if bool((mask != 0).any()) else 0.0
    return max(1.0, all_reduce_sum(local, group))


def all_reduce_gradients(model: torch.nn.Module, group=None, average: bool = False) -> None:
    """Sum (or average) every trainable parameter's .grad over the ranks of `group`, in place.

    Gradients are flattened into one buffer per dtype, so there is one
    collective per dtype rather than one per parameter. A parameter whose .grad
    is None on this rank but not on another (e.g. an untied LM head on a rank
    whose batch had no trained token) joins as zeros, so every rank reduces the
    same buffer; one whose .grad is None on every rank stays None, as it would
    in a single process (the optimizer then skips it).
    """
    n = world(group)
    if n == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    device = _comm_device(group)
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)  # [n_params]
    dist.all_reduce(present, group=group)
    params = [p for p, k in zip(params, present.tolist()) if k > 0]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1).to(device) for p in ps])  # [sum of numels]
        dist.all_reduce(flat, group=group)
        if average:
            flat /= n
        for p, g in zip(ps, flat.split([p.numel() for p in ps])):
            p.grad.copy_(g.view_as(p.grad))


def average_gradients(model: torch.nn.Module, group=None) -> None:
    """Mean of the gradients over ranks: right only if each rank normalised its loss by a
    LOCAL count and all ranks hold equal shares. With `global_loss_normalizer` use
    `all_reduce_gradients(model)` (the sum) instead."""
    all_reduce_gradients(model, group, average=True)


def shard_indices(n: int, rank: int, world: int, strided: bool = False) -> list[int]:
    """This rank's share of range(n), sizes differing by at most one.

    Contiguous (default): rank r gets a block; the first n % world ranks get one
    extra item, so concatenating the shards in rank order gives range(n). Use it
    to split a step's prompts (GRPO groups stay whole on one rank, so group
    advantages need no communication). Strided: rank r gets r, r + world, ...,
    which balances work when items are sorted by length.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    if strided:
        return list(range(rank, n, world))
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def sum_comm_hook(group, bucket):
    """DistributedDataParallel comm hook that SUMS gradient buckets instead of averaging.

    Usage: `ddp.register_comm_hook(group, sum_comm_hook)` (group None = world),
    then divide each rank's loss by `global_loss_normalizer`. Only for the
    standard forward/backward; the chunked StreamBP head runs several backward
    passes per forward, which DDP's reducer does not allow, so that path uses
    `all_reduce_gradients` after the backward instead.
    """
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
