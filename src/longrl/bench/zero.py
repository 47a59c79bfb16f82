"""Benchmark: optimizer memory per rank with `parallel.zero_optimizer` (ZeRO-1) vs plain AdamW.

    python -m longrl.bench.zero --json [--procs 2,4] [--layers 4] [--hidden 256] [--steps 3]

For each P it starts P local processes (gloo on CPU) holding the same Qwen2-architecture
model (random weights, vocab 32k), and runs the same optimizer steps twice, with plain AdamW
and with `make_optimizer(..., shard=True)`, on identical gradients. Per rank it records the
bytes of optimizer state (AdamW's two moments and step counters) and the median step time,
and checks that both leave bit-identical weights. It prints one JSON object with, per P,
`state_ratio` (ZeRO bytes on the busiest rank / plain bytes; ideal 1/P) and `time_ratio`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from longrl.parallel.local_spawn import spawn_local


def _parse(args):
    p = argparse.ArgumentParser(prog="longrl bench zero", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--procs", default="2,4", help="comma-separated process counts")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    return p.parse_args(args)


def _state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer wraps this rank's AdamW
    return sum(t.numel() * t.element_size() for state in inner.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def _rank(rank, world, opt, out_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from longrl.recipes.common import make_optimizer

    cfg = Qwen2Config(vocab_size=32000, hidden_size=opt.hidden, intermediate_size=opt.hidden * 3,
                      num_hidden_layers=opt.layers, num_attention_heads=8, num_key_value_heads=2,
                      tie_word_embeddings=False)
    result, weights = {}, {}
    for kind in ("plain", "zero"):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg)
        optimizer = make_optimizer(model, 1e-3, 0.0, shard=kind == "zero")
        times = []
        for step in range(opt.steps):
            gen = torch.Generator().manual_seed(step)  # the same gradients on every rank and for both kinds
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            t0 = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - t0)
        result[kind] = {"state_bytes": _state_bytes(optimizer), "step_time_s": statistics.median(times)}
        weights[kind] = [p.detach().clone() for p in model.parameters()]
    result["identical_weights"] = all(torch.equal(a, b) for a, b in zip(weights["plain"], weights["zero"]))
    result["param_bytes"] = sum(p.numel() * p.element_size() for p in weights["plain"])
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(result))
    dist.barrier()


def run(args: list[str]) -> dict:
    """Run the benchmark; prints and returns the JSON result."""
    opt = _parse(args)
    procs = [int(x) for x in opt.procs.split(",")]
    results = {}
    for P in procs:
        with tempfile.TemporaryDirectory() as out:
            spawn_local(_rank, P, opt, out)
            ranks = [json.loads((Path(out) / f"{r}.json").read_text()) for r in range(P)]
        plain = max(r["plain"]["state_bytes"] for r in ranks)
        zero = max(r["zero"]["state_bytes"] for r in ranks)
        results[str(P)] = {
            "param_bytes": ranks[0]["param_bytes"],
            "state_bytes_per_rank": {"plain": plain, "zero_busiest": zero,
                                     "zero_each": [r["zero"]["state_bytes"] for r in ranks]},
            "state_ratio": zero / plain,
            "ideal_ratio": 1 / P,
            "step_time_s": {"plain": max(r["plain"]["step_time_s"] for r in ranks),
                            "zero": max(r["zero"]["step_time_s"] for r in ranks)},
            "time_ratio": max(r["zero"]["step_time_s"] for r in ranks) / max(r["plain"]["step_time_s"] for r in ranks),
            "identical_weights": all(r["identical_weights"] for r in ranks),
        }
    report = {"benchmark": "zero", "config": {k: v for k, v in vars(opt).items() if k != "json"},
              "note": ("ZeRO-1 splits the optimizer state by whole parameters, so the busiest rank holds a little "
                       "more than 1/P; the P processes share this machine's cores, so times include contention."),
              "results": results}
    print(json.dumps(report, indent=None if opt.json else 2))
    return report


if __name__ == "__main__":
    run(sys.argv[1:])
