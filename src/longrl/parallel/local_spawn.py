"""Start P local processes joined in one process group (tests, benchmarks, laptops).

Each child gets `fn(rank, world_size, *args)` called after
`init_process_group` on a free localhost port, and the group is destroyed
when `fn` returns. On a cluster use torchrun instead; the library code is the same.
"""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, backend, threads, args):
    torch.set_num_threads(threads)  # P processes share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)  # one GPU per process
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn_local(fn, world_size: int, *args, backend: str = "gloo", threads: int = 1,
                start_method: str = "spawn") -> None:
    """Run fn(rank, world_size, *args) in `world_size` processes; raises if any fails.

    With "spawn" fn must be importable by the children (a module-level function).
    "fork" skips re-importing torch in every child (much faster to start) but is
    only safe on CPU, before the parent has touched CUDA or run parallel kernels.
    """
    mp.start_processes(_entry, args=(fn, world_size, free_port(), backend, threads, args), nprocs=world_size,
                       join=True, start_method=start_method)
