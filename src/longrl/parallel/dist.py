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

Sequence parallelism (`parallel.sp_size` = P > 1) splits the world of W ranks into
W / P groups of P consecutive ranks (`setup_layout`). The P ranks of one SP group
hold the SAME step batch and each runs the training passes on its T/P slice of
every sequence (`parallel/sp_train.py`); the W / P groups are data-parallel
replicas. The loss normaliser is counted over the DP group (the ranks with the
same place in every SP group: each sample counted once), and gradients are still
summed over the whole world: an SP rank's gradient covers its own positions only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from longrl.errors import UserError
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


@dataclass(frozen=True)
class Layout:
    """How the world splits into sequence-parallel groups and data-parallel replicas.

    Global rank = dp_rank * sp_size + sp_rank. An SP group is sp_size consecutive
    ranks: torchrun numbers the processes of one node consecutively, so an SP
    group whose size divides the processes per node stays inside one node, where
    the per-layer all-to-all is cheapest. The DP group of a rank is the ranks
    with the same sp_rank in every SP group.
    """

    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    sp_group: Any = None  # a torch ProcessGroup; only used when sp_size > 1
    dp_group: Any = None  # None: the default (world) group, right whenever sp_size == 1


_LAYOUT: Layout | None = None
SHARDING_ATTR = "longrl_sharding"
"""The attribute under which `parallel.fsdp.shard_model` leaves its state on a model."""


def layout() -> Layout:
    """The layout set by `setup_layout`, else plain data parallelism over the whole world."""
    return _LAYOUT if _LAYOUT is not None else Layout(1, 0, world(), rank())


def check_sp_size(sp_size: int, world_size: int) -> None:
    """UserError unless `world_size` processes can form groups of `sp_size`."""
    if sp_size > 1 and world_size == 1:
        raise UserError(f"parallel.sp_size={sp_size} splits every sequence over {sp_size} processes, but this is "
                        f"a single process; launch with torchrun, e.g. `torchrun --nproc-per-node {sp_size} "
                        f"-m longrl train parallel.sp_size={sp_size}`")
    if world_size % sp_size:
        options = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise UserError(f"parallel.sp_size={sp_size} does not divide the {world_size} processes; use a process "
                        f"count that is a multiple of {sp_size}, or parallel.sp_size in {options}")


def setup_layout(sp_size: int) -> Layout:
    """Build the SP and DP process groups (collective: every rank must call it) and make
    them the current `layout()`. sp_size 1 keeps plain data parallelism."""
    global _LAYOUT
    W, r = world(), rank()
    check_sp_size(sp_size, W)
    if sp_size == 1:
        _LAYOUT = None
        return layout()
    sp_group = dp_group = None
    for d in range(W // sp_size):  # new_group is collective: every rank creates every group, in order
        g = dist.new_group(list(range(d * sp_size, (d + 1) * sp_size)))
        sp_group = g if d == r // sp_size else sp_group
    for s in range(sp_size):
        g = dist.new_group(list(range(s, W, sp_size)))
        dp_group = g if s == r % sp_size else dp_group
    _LAYOUT = Layout(sp_size, r % sp_size, W // sp_size, r // sp_size, sp_group, dp_group)
    return _LAYOUT


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


def comm_device(group=None) -> torch.device:
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
        buf = x.detach().to(comm_device(group), copy=True)
        dist.all_reduce(buf, group=group)
        return buf.to(x.device)
    if not _active():
        return float(x)
    buf = torch.tensor([float(x)], dtype=torch.float64, device=comm_device(group))
    dist.all_reduce(buf, group=group)
    return float(buf.item())


def broadcast_object(obj, src: int = 0, group=None):
    """Rank `src`'s object on every rank (pickled; small things only: configs, index lists).
    `src` is a global rank, as in torch.distributed."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=comm_device(group))
    return box[0]


def all_gather_object(obj, group=None) -> list:
    """Every rank's object of `group`, in rank order (pickled; rollouts and other small things)."""
    if not _active() or world(group) == 1:
        return [obj]
    out = [None] * world(group)
    dist.all_gather_object(out, obj, group=group)
    return out


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

    A model sharded with FSDP2 (`parallel/fsdp.py`) is reduced there instead, into its
    shards (reduce-scatter over the DP group, all-reduce over the SP group): every rank
    must call this for it, and `group` is not used.
    """
    sharding = getattr(model, SHARDING_ATTR, None)  # set by parallel.fsdp.shard_model (which imports this module)
    if sharding is not None:
        sharding.shard_grads(model, average=average)
        return
    n = world(group)
    if n == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    device = comm_device(group)
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
