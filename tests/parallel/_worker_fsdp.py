"""FSDP2 inside the recipes; run by test_parallel_fsdp.py.

    python tests/parallel/_worker_fsdp.py OUT.json WORLD SP_SIZE

The cases, the one-process references and the comparison are those of
`_worker_sp_recipes.py` (one SFT step in three backprop/dtype settings, one GRPO step with
two PPO epochs, micro-batches, KL and uneven lengths, one online-DPO step, greedy rollouts),
run here with every rank's model wrapped by `parallel.fsdp.shard_model` over the
data-parallel group (with SP_SIZE > 1: SP_SIZE x FSDP2). Gradients are recorded as full
tensors (the shards' DTensor grads gathered). Each rank also records how much of the
weights and of AdamW's state it holds.
"""
import json
import os
import sys

import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor

import _worker_sp_recipes as sp
from longrl.parallel import dist, fsdp
from longrl.parallel.local_spawn import free_port
from longrl.recipes.common import make_optimizer

_plain_model = sp._model
SHARES: list[float] = []  # per sharded model: this rank's fraction of the parameters' elements


def _sharded_model(dtype, tie=True):
    model = fsdp.shard_model(_plain_model(dtype, tie))
    local = sum(p.to_local().numel() for p in fsdp.trainable_parameters(model))
    SHARES.append(local / sum(p.numel() for p in fsdp.trainable_parameters(model)))
    return model


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _record_full_grads(module):
    """`sp._record_grads` for a sharded model: the recipe's clip_and_step sees the shards."""
    original, steps = module.clip_and_step, []

    def wrapped(model, *args, **kwargs):
        fsdp.shard_grads(model)  # a no-op: all_reduce_gradients already reduced into the shards
        steps.append({n: _full(p.grad).detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None})
        return original(model, *args, **kwargs)

    module.clip_and_step = wrapped
    return steps, lambda: setattr(module, "clip_and_step", original)


def optimizer_share():
    """This rank's bytes of AdamW state / one process's, after one step on the same grads."""
    sizes = []
    for shard in (False, True):
        model = _plain_model(torch.float64, False)
        model = fsdp.shard_model(model) if shard else model
        opt = make_optimizer(model, 1e-3, 0.0)
        for p in fsdp.trainable_parameters(model):
            p.grad = torch.ones_like(p)
        opt.step()
        sizes.append(sum(_full_bytes(t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
                         and t.dim() > 0))
    return sizes[1] / sizes[0]


def _full_bytes(t):
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def main(out_path, sp_size):
    ctx = dist.init_from_env()
    dist.setup_layout(sp_size)
    torch.set_num_threads(1)
    share = optimizer_share()
    sp.main(out_path, sp_size)  # the cases, compared with the references; rank 0 writes OUT.json
    with open(f"{out_path}.rank{ctx.rank}", "w") as f:
        json.dump({"rank": ctx.rank, "param_shares": SHARES, "optimizer_share": share}, f)


def _forked_rank(rank, world, port, out_path, sp_size):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    main(out_path, sp_size)


if __name__ == "__main__":
    out, world, sp_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    sp.references()  # one plain process on the whole batch
    sp._model, sp._record_grads = _sharded_model, _record_full_grads  # the ranks inherit these (fork)
    torch.multiprocessing.start_processes(_forked_rank, args=(world, free_port(), out, sp_size), nprocs=world,
                                          start_method="fork")
