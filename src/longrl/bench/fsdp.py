"""Benchmark: memory per rank of plain data parallelism vs ZeRO-1 vs FSDP2 vs FSDP2 + CPU offload,
and LoRA (plain data parallelism, `model.lora.r`, adapters on every linear layer) vs full.

    longrl bench fsdp --json [--procs 1,2,4] [--layers 8] [--hidden 1024] [--vocab 32000]

For each P it starts P local processes (gloo on CPU) per variant, each holding a model of
real shape (Qwen2 architecture, random weights, tied embeddings), and runs two training
steps through the recipes' own code: `make_optimizer` (ZeRO-1 with `shard=True`),
`parallel.fsdp.shard_model` for FSDP2, the backward, `dist.all_reduce_gradients` and
`clip_and_step`. Per rank it records, in bytes:

- `state`: what the rank keeps for the optimizer step (measured at the second one):
  parameters it stores + their gradients + AdamW's moments. For FSDP2 these are the
  shards; the figure the issue's goal is about.
- `in_step`: the same plus what exists only between two optimizer steps, measured after
  the backward: FSDP2 in longrl gathers the full weights once per step and accumulates
  full gradients (see parallel/fsdp.py), so this is (1 + 1/P) params + grads + moments/P.
- `peak_rss`: the process's peak resident memory (ru_maxrss; includes torch itself).
- `optimizer`: AdamW's moments alone (LoRA's goal: < 2% of full fine-tuning's).

and checks that each sharding variant's weights after the two steps match plain AdamW's
(LoRA trains other weights: not compared). The JSON
gives, per P, the busiest rank's figures and `ratio_to_plain` of each. On a CPU-only
machine CPU offload moves nothing (host and device memory are the same), so its figures
equal FSDP2's; on a GPU it moves the shards and the optimizer step to host memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from longrl.parallel.local_spawn import spawn_local

KINDS = ("plain", "zero", "fsdp", "fsdp_offload", "lora")


def _parse(args):
    p = argparse.ArgumentParser(prog="longrl bench fsdp", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--procs", default="1,2,4", help="comma-separated process counts")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence (2 sequences per rank)")
    p.add_argument("--lora-r", type=int, default=16, help="adapter rank of the lora variant")
    return p.parse_args(args)


def _config(opt):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=opt.vocab, hidden_size=opt.hidden, intermediate_size=opt.hidden * 11 // 4,
                       num_hidden_layers=opt.layers, num_attention_heads=opt.hidden // 64, num_key_value_heads=min(4, opt.hidden // 64),
                       tie_word_embeddings=True, max_position_embeddings=4096)


def _bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors)
    return sum(t.numel() * t.element_size() for t in local)


def _opt_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer wraps this rank's AdamW
    return _bytes(t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def _rank(rank, world, opt, kind, out_dir):
    from transformers import Qwen2ForCausalLM

    from longrl.parallel import dist, fsdp
    from longrl.recipes.common import clip_and_step, make_optimizer, make_scheduler

    dist.setup_layout(1)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(_config(opt))
    if kind.startswith("fsdp"):
        model = fsdp.shard_model(model, offload=kind == "fsdp_offload")
    if kind == "lora":  # the recipes' own adapter (peft, every linear layer but the head)
        from longrl.config import LoRAConfig
        from longrl.models.lora import apply_lora

        model = apply_lora(model, LoRAConfig(r=opt.lora_r))
    optimizer = make_optimizer(model, 1e-3, 0.0, shard=kind == "zero")
    scheduler = make_scheduler(optimizer, 0, 2, decay=False)
    record, times = {}, []

    def at_step(_opt, _args, _kwargs):  # params + grads + moments the step sees (shards under FSDP2)
        params = fsdp.trainable_parameters(model) if kind.startswith("fsdp") else list(model.parameters())
        record["state"] = _bytes(params) + _bytes(p.grad for p in params if p.grad is not None) + _opt_bytes(optimizer)
        record["optimizer"] = _opt_bytes(optimizer)

    for step in range(2):
        gen = torch.Generator().manual_seed(100 * step + rank)  # each rank its own batch
        ids = torch.randint(0, opt.vocab, (2, opt.seq), generator=gen)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss / world
        loss.backward()
        if step == 1:  # between two optimizer steps: gathered weights, full grads, the moments
            shards = _bytes(fsdp.trainable_parameters(model)) if kind.startswith("fsdp") else 0
            record["in_step"] = (_bytes(model.parameters()) + _bytes(p.grad for p in model.parameters()
                                                                        if p.grad is not None)
                                 + shards + _opt_bytes(optimizer))
            hook = getattr(optimizer, "optim", optimizer).register_step_pre_hook(at_step)
        dist.all_reduce_gradients(model)
        clip_and_step(model, optimizer, scheduler, grad_clip=0.0)
        times.append(time.perf_counter() - t0)
    hook.remove()
    record.update(peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, step_seconds=times[-1],
                  rank=rank)
    (Path(out_dir) / f"{kind}_{world}_{rank}.json").write_text(json.dumps(record))
    if rank == 0 and kind != "lora":  # a few full tensors to compare the sharding variants' updates
        names = ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight", f"model.layers.{opt.layers - 1}.mlp.down_proj.weight"]
        params = dict(model.named_parameters())
        torch.save({n: params[n].detach().clone() for n in names}, Path(out_dir) / f"{kind}_{world}.pt")


def run(argv: list[str]) -> dict:
    opt = _parse(argv)
    procs = [int(p) for p in opt.procs.split(",")]
    n_params = sum(p.numel() for p in _meta_model(opt).parameters())
    result = {"model": {"arch": "qwen2", "layers": opt.layers, "hidden": opt.hidden, "vocab": opt.vocab,
                        "params": n_params, "param_bytes": 4 * n_params}, "procs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for world in procs:
            per = {}
            for kind in KINDS:
                print(f"bench fsdp: P={world} {kind}", file=sys.stderr)
                spawn_local(_rank, world, opt, kind, tmp, start_method="fork")
                ranks = [json.loads((Path(tmp) / f"{kind}_{world}_{r}.json").read_text()) for r in range(world)]
                per[kind] = {k: max(r[k] for r in ranks)
                             for k in ("state", "in_step", "peak_rss", "step_seconds", "optimizer")}
            plain = torch.load(Path(tmp) / f"plain_{world}.pt")
            for kind in KINDS:
                if kind != "lora":
                    got = torch.load(Path(tmp) / f"{kind}_{world}.pt")
                    per[kind]["max_weight_diff_vs_plain"] = max(float((got[n] - plain[n]).abs().max()) for n in plain)
                per[kind]["ratio_to_plain"] = {k: round(per[kind][k] / per["plain"][k], 4)
                                               for k in ("state", "in_step", "peak_rss", "optimizer")}
            result["procs"][str(world)] = per
    result["goal"] = {"fsdp_state_ratio_P2_at_most": 0.55, "fsdp_state_ratio_P4_at_most": 0.30,
                      "lora_optimizer_ratio_below": 0.02}
    return result


def _meta_model(opt):
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        return Qwen2ForCausalLM(_config(opt))


def main(argv: list[str] | None = None) -> int:
    result = run(sys.argv[1:] if argv is None else argv)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
