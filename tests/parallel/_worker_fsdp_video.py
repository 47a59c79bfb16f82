"""FSDP2 inside the video recipe; run by test_parallel_fsdp_video.py.

    python tests/parallel/_worker_fsdp_video.py OUT.json

The cases, the one-process references and the comparison are `_worker_sp_video.py`'s (the
encode, one SFT step and one GRPO step of `VideoPolicy` with a frozen and a trainable
vision tower, greedy rollouts), run here by 2 data-parallel ranks whose models are
wrapped by `parallel.fsdp.shard_model` (the decoder layers, the vision tower, the root).
Gradients are recorded as full tensors (the shards' DTensor grads gathered). Each rank
also records the fraction of the parameters' elements it holds.
"""
import json
import sys
from pathlib import Path

import torch

import _worker_sp_video as spv
from _worker_fsdp import _record_full_grads
from _worker_sp_recipes import forked_rank, write_records
from longrl.parallel import dist, fsdp
from longrl.parallel.local_spawn import free_port

_plain_policy = spv._policy
SHARES: list[float] = []


def _sharded_policy(cfg):
    model, tok = _plain_policy(cfg)
    model = fsdp.shard_model(model)
    params = list(getattr(model, fsdp._ATTR).sharded.values())
    SHARES.append(sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params))
    return model, tok


def main(out_path, task):
    ctx = dist.init_from_env()
    torch.set_num_threads(1)
    records = spv.run_layout(task, ctx, 1)  # FSDP2 over the 2 data-parallel ranks
    records.append(dict(rank=ctx.rank, kind="shares", shares=SHARES))
    write_records(records, ctx, out_path)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)  # before any kernel runs: the ranks are forked from this process
    spv._float64_throughout()
    task = spv._task(Path(out).parent)
    spv.references(task)  # one plain process on the whole batch
    spv._policy, spv._record_grads = _sharded_policy, _record_full_grads  # the ranks inherit these (fork)
    torch.multiprocessing.start_processes(forked_rank, args=(main, 2, free_port(), out, task), nprocs=2,
                                          start_method="fork")
    json.loads(Path(out).read_text())  # written by rank 0
