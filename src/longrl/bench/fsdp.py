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

    longrl bench fsdp --largest --cap-gib 6 [--hidden 1024] [--vocab 32000]

The largest model that trains one GRPO step with 2 processes under a memory cap, plain data
parallelism vs FSDP2 vs FSDP2 + offload: the model's depth (decoder layers at the given
width) is searched, each trial in 2 freshly forked processes running the recipe's own
`grpo_step` (rollouts on the native engine, old log-probs, one PPO epoch, the gradient
reduce, `clip_and_step`) on the addition task with a tokenizer padded to the vocabulary
and rewards from a hash of each response (so groups differ and the step updates). A trial
fits when both ranks finish, the step made an update, and the two processes' peak RSS
(ru_maxrss, torch's own pages counted in each) sum to at most the cap; a watchdog thread
in each rank ends the trial as soon as its resident memory passes cap / 2, so a search
never takes the machine past the cap by more than one allocation. The result: each
variant's largest depth and parameter count, and `params_ratio_to_plain`.
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
    p.add_argument("--largest", action="store_true",
                   help="search the largest model one GRPO step fits with 2 processes under --cap-gib")
    p.add_argument("--cap-gib", type=float, default=6.0, help="--largest: the 2 processes' summed peak RSS cap")
    p.add_argument("--max-layers", type=int, default=64, help="--largest: the deepest model tried")
    p.add_argument("--new-tokens", type=int, default=16, help="--largest: rollout tokens per sample")
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
    if opt.largest:
        return largest(opt)
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


# ----------------------------------------------------------------------------------------
# --largest: the deepest model one GRPO step fits under a memory cap, per variant
# ----------------------------------------------------------------------------------------

LARGEST_KINDS = ("plain", "fsdp", "fsdp_offload")
LARGEST_PROCS = 2
_SETUP: dict = {}  # the tokenizer and task, built once in the parent; the forked ranks inherit them


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _watchdog(limit: int, flag: Path) -> None:
    """A daemon thread that ends this process (exit 3, after writing `flag`) once its
    resident memory passes `limit` bytes: a trial over the cap stops there."""
    import os
    import threading

    def watch():
        while True:
            if _rss() > limit:
                flag.write_text(str(_rss()))
                os._exit(3)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()


def _grpo_config(opt, world: int):
    from dataclasses import replace

    from longrl.config import Config

    cfg = Config()
    cfg.task = replace(cfg.task, name="addition", n_train=16, n_eval=1)
    cfg.rl = replace(cfg.rl, group_size=4, prompts_per_step=world, micro_batch_size=4, ppo_epochs=1, kl_coef=0.0,
                     lr=1e-5, warmup_steps=0)
    cfg.rollout = replace(cfg.rollout, max_new_tokens=opt.new_tokens)
    cfg.run.progress = False
    return cfg


def _hash_reward(text: str, example) -> float:
    """Rewards that differ within a group of random responses (the step then updates)."""
    import zlib

    return (zlib.crc32(text.encode()) % 5) / 4


def _setup(opt) -> None:
    """The tokenizer (the tiny one padded with plain tokens to `--vocab`, so sampled ids
    decode to distinct texts) and the task with `_hash_reward`; once, before forking."""
    from dataclasses import replace

    from longrl.models.tiny import build_tiny_tokenizer
    from longrl.recipes.tasks import load_task

    base = len(build_tiny_tokenizer())
    tokenizer = build_tiny_tokenizer(tuple(f"<t{i}>" for i in range(max(0, opt.vocab - base))))
    task = load_task(_grpo_config(opt, LARGEST_PROCS).task)
    _SETUP.update(tokenizer=tokenizer, task=replace(task, score=_hash_reward))


def _grpo_rank(rank, world, opt, kind, layers, cap_bytes, out_dir):
    from transformers import Qwen2ForCausalLM

    from longrl.parallel import dist, fsdp
    from longrl.policy.text import TextPolicy
    from longrl.recipes.grpo import grpo_step, init_state
    from longrl.rollout import make_backend

    out = Path(out_dir)
    _watchdog(cap_bytes // world, out / f"over_{rank}")
    dist.setup_layout(1)
    tokenizer, task = _SETUP["tokenizer"], _SETUP["task"]
    cfg = _grpo_config(opt, world)
    before = _rss()
    torch.manual_seed(0)
    shape = argparse.Namespace(**{**vars(opt), "layers": layers, "vocab": len(tokenizer)})
    model = Qwen2ForCausalLM(_config(shape))
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if kind.startswith("fsdp"):
        model = fsdp.shard_model(model, offload=kind == "fsdp_offload")
    policy, backend = TextPolicy.from_config(model, tokenizer, cfg), make_backend(cfg, model, tokenizer)
    state = init_state(model, cfg, len(task.train), backend)
    setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the model built (and sharded)
    t0 = time.perf_counter()
    metrics = grpo_step(policy, backend, task, cfg, state)
    record = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before_model": before,
              "peak_rss_setup": setup,
              "updated": "grad/norm" in metrics and metrics.get("train/no_signal_steps", 0) == 0,
              "step_seconds": time.perf_counter() - t0}
    (out / f"trial_{rank}.json").write_text(json.dumps(record))


def _trial(opt, kind: str, layers: int, cap_bytes: int) -> dict:
    """One GRPO step of a `layers`-deep model in 2 fresh processes. -> the trial's record."""
    params = sum(p.numel() for p in _meta_model(argparse.Namespace(
        **{**vars(opt), "layers": layers, "vocab": len(_SETUP["tokenizer"])})).parameters())
    out = {"layers": layers, "params": params}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            spawn_local(_grpo_rank, LARGEST_PROCS, opt, kind, layers, cap_bytes, tmp, start_method="fork")
        except Exception as e:  # a rank stopped by its watchdog (exit 3) or failed
            over = sorted(Path(tmp).glob("over_*"))
            return {**out, "fits": False, "why": "over the cap" if over else f"failed: {type(e).__name__}"}
        ranks = [json.loads((Path(tmp) / f"trial_{r}.json").read_text()) for r in range(LARGEST_PROCS)]
    peak = sum(r["peak_rss"] for r in ranks)
    out.update(peak_rss_sum=peak, rss_before_model=max(r["rss_before_model"] for r in ranks),
               peak_rss_setup=max(r["peak_rss_setup"] for r in ranks),
               updated=all(r["updated"] for r in ranks), step_seconds=max(r["step_seconds"] for r in ranks))
    out["fits"] = out["updated"] and peak <= cap_bytes
    out["why"] = "" if out["fits"] else ("no update" if not out["updated"] else "over the cap")
    return out


def _search(opt, kind: str, cap_bytes: int, start: int) -> dict:
    """Largest depth in [1, --max-layers] whose trial fits: up from `start` by doubling, then
    bisection (fitting is taken as monotone in depth)."""
    trials, lo, hi, probe = [], 0, opt.max_layers + 1, max(1, min(start, opt.max_layers))  # lo fits, hi does not

    def fits(layers: int) -> bool:
        print(f"bench fsdp --largest: {kind} {layers} layers", file=sys.stderr)
        trials.append(_trial(opt, kind, layers, cap_bytes))
        return trials[-1]["fits"]

    while hi - lo > 1:
        if fits(probe):
            lo = probe
        else:
            hi = probe
        grow = hi > opt.max_layers and lo > 0  # nothing failed yet: double
        probe = min(max(2 * lo if grow else (lo + hi) // 2, lo + 1), hi - 1)
    best = next((t for t in reversed(trials) if t["fits"] and t["layers"] == lo), None)
    return {"layers": lo, "params": best["params"] if best else 0,
            "peak_rss_sum": best["peak_rss_sum"] if best else None, "trials": trials}


def largest(opt) -> dict:
    """The `--largest` result: per variant the deepest model that fits, and the ratios."""
    cap = int(opt.cap_gib * 2**30)
    _setup(opt)
    per_layer = sum(p.numel() for p in _meta_model(argparse.Namespace(**{**vars(opt), "layers": 1})).parameters())
    # Where to start: ~16 B/param for plain (weights, grads, AdamW's two moments), less with FSDP2.
    guess = {"plain": 16, "fsdp": 12, "fsdp_offload": 12}
    result = {"model": {"arch": "qwen2", "hidden": opt.hidden, "vocab": len(_SETUP["tokenizer"]),
                        "params_one_layer_model": per_layer},
              "procs": LARGEST_PROCS, "cap_gib": opt.cap_gib, "grpo": {"group_size": 4, "prompts": LARGEST_PROCS,
                                                                       "new_tokens": opt.new_tokens}, "variants": {}}
    for kind in LARGEST_KINDS:
        budget = cap / LARGEST_PROCS - 0.6 * 2**30  # torch and the process itself, roughly
        start = max(1, int((budget / guess[kind] - per_layer) / max(1, _layer_params(opt))) + 1)
        result["variants"][kind] = _search(opt, kind, cap, start)
    plain = result["variants"]["plain"]["params"]
    for kind, v in result["variants"].items():
        v["params_ratio_to_plain"] = round(v["params"] / plain, 4) if plain else None
    return result


def _layer_params(opt) -> int:
    one = sum(p.numel() for p in _meta_model(argparse.Namespace(**{**vars(opt), "layers": 1})).parameters())
    two = sum(p.numel() for p in _meta_model(argparse.Namespace(**{**vars(opt), "layers": 2})).parameters())
    return two - one


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
