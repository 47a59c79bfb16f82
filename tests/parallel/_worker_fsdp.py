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
import sys

import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor

import _worker_sp_recipes as sp
from longrl.parallel import dist, fsdp
from longrl.parallel.local_spawn import free_port
from longrl.recipes.common import make_optimizer

_plain_model = sp._model
STREAMBP = ("streambp", torch.float64)
STREAMBP_REF: dict = {}  # the one-process reference of the StreamBP SFT case, filled before forking
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
    side = {"rank": ctx.rank, "optimizer_share": share}
    if sp_size == 1:  # StreamBP's layer-by-layer backward on the gathered weights (SP refuses StreamBP)
        side["streambp_errs"] = sp._compare(sp.sft_case(*STREAMBP), STREAMBP_REF[STREAMBP])
    if dist.layout().dp_size <= sp.N_PROMPTS - 1:
        sp.main(out_path, sp_size)  # the cases, compared with the references; rank 0 writes OUT.json
    else:  # more replicas than the rollout case has prompts: the update cases only
        _update_cases(out_path)
    with open(f"{out_path}.rank{ctx.rank}", "w") as f:
        json.dump({**side, "param_shares": SHARES}, f)


def _update_cases(out_path):
    """`sp.main` without its rollout case (which needs a prompt per replica): the same SFT,
    GRPO and DPO records, written the same way."""
    ctx, lay = dist.init_from_env(), dist.layout()
    base = dict(rank=ctx.rank, world=ctx.world, sp_size=lay.sp_size, sp_rank=lay.sp_rank, dp_rank=lay.dp_rank)
    records = []
    for mode, dtype in sp.SFT_CASES:
        got = sp.sft_case(mode, dtype)
        records.append(dict(base, kind="sft", mode=mode, dtype=str(dtype), checkpointed=got["checkpointed"],
                            errs=sp._compare(got, sp.REF["sft"][(mode, dtype)])))
    for case in sp.GRPO_CASES:
        records.append(dict(base, kind="grpo", loss=case[0], kl=case[2] > 0, clip_frac=sp.REF["grpo"][case]["clip_frac"],
                            errs=sp._compare(sp.grpo_case(*case), sp.REF["grpo"][case])))
    got = sp.dpo_case()
    records.append(dict(base, kind="dpo", pairs=got["pairs"], errs=sp._compare(got, sp.REF["dpo"])))
    sp.write_records(records, ctx, out_path)


if __name__ == "__main__":
    out, world, sp_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    sp.references()  # one plain process on the whole batch
    STREAMBP_REF[STREAMBP] = sp.sft_case(*STREAMBP)
    sp._model, sp._record_grads = _sharded_model, _record_full_grads  # the ranks inherit these (fork)
    torch.multiprocessing.start_processes(sp.forked_rank, args=(main, world, free_port(), out, sp_size), nprocs=world,
                                          start_method="fork")


# ----------------------------------------------------------------------------------------
# DCP: save at one world size, load at another (run through spawn_local by the test)
# ----------------------------------------------------------------------------------------


def _stepped(offload=False):
    """The test model, FSDP2-sharded (or plain in one process), after one AdamW step on fixed grads."""
    model = _plain_model(torch.float64, False)
    model = fsdp.shard_model(model, offload=offload) if tdist.is_initialized() else model
    opt = make_optimizer(model, 1e-2, 0.0)
    gen = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():  # the gathered tensors: every rank the same full grads
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    from longrl.recipes.common import make_scheduler, clip_and_step

    clip_and_step(model, opt, make_scheduler(opt, 0, 1, decay=False), grad_clip=0.5)
    return model, opt


def _full_state(model, opt):
    """Full weights (gathered) and AdamW moments by parameter name (collective for shards)."""
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in zip(weights, fsdp.trainable_parameters(model))}
    moments = {f"{names[id(p)]}.{k}": _full(v).clone() for p, s in opt.state.items() for k, v in s.items()
               if k != "step"}
    return weights, moments


def save_rank(rank, world, out_dir, offload):
    """World `world`: one step, a sharded checkpoint of it, and the full state to compare."""
    from pathlib import Path

    from longrl.checkpoint import save_sharded_checkpoint
    from longrl.models.tiny import build_tiny_tokenizer

    dist.setup_layout(1)
    model, opt = _stepped(offload)
    full = _full_state(model, opt)
    save_sharded_checkpoint(Path(out_dir), 1, model, build_tiny_tokenizer(), {"step": 1} if rank == 0 else None,
                            opt, keep=2)
    if rank == 0:
        torch.save(full, Path(out_dir) / "full.pt")


def load_rank(rank, world, out_dir, sharded):
    """World `world` (or one plain process): load the checkpoint into a fresh model and
    optimizer; rank 0 records whether weights and moments are bit-equal to the saved ones."""
    from pathlib import Path

    from longrl.checkpoint import load_sharded_state, load_trainer_state

    ckpt = Path(out_dir) / "checkpoints" / "step_1"
    model = _plain_model(torch.float64, False)
    model = fsdp.shard_model(model) if sharded else model
    opt = make_optimizer(model, 1e-2, 0.0)
    load_sharded_state(ckpt, model, opt, load_trainer_state(ckpt)["optimizer_param_groups"])
    weights, moments = _full_state(model, opt)
    want_w, want_m = torch.load(Path(out_dir) / "full.pt")
    if rank == 0:
        result = {"weights_equal": weights.keys() == want_w.keys() and all(torch.equal(weights[k], want_w[k]) for k in want_w),
                  "moments_equal": moments.keys() == want_m.keys() and all(torch.equal(moments[k], want_m[k]) for k in want_m),
                  "n_moments": len(moments), "lr": opt.param_groups[0]["lr"]}
        with open(Path(out_dir) / f"load_{world}_{sharded}.json", "w") as f:
            json.dump(result, f)


def replica_rank(rank, world, out_dir):
    """The KL/DPO reference of a sharded model: a plain module with the same weights and the
    same layer classes (bf16 autocast linears stay autocast), giving the same logits."""
    from pathlib import Path

    from longrl.models.precision import compute_dtype, set_compute_dtype

    dist.setup_layout(1)
    model = set_compute_dtype(_plain_model(torch.float32), "bfloat16")
    ids = torch.randint(6, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    want = model(ids).logits
    model = fsdp.shard_model(model)
    ref = fsdp.replica(model)
    result = {"plain": not fsdp.is_sharded(ref) and not any(isinstance(p, DTensor) for p in ref.parameters()),
              "compute_dtype": str(compute_dtype(ref)), "same_logits": torch.equal(ref(ids).logits, want),
              "own_memory": all(a.data_ptr() != b.data_ptr() for a, b in zip(ref.parameters(), model.parameters()))}
    (Path(out_dir) / f"replica_{rank}.json").write_text(json.dumps(result))
