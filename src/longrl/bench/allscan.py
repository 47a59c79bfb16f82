"""Benchmark: ZeCO All-Scan vs the LASP-2 all-gather for sequence-parallel GLA.

    python -m longrl.bench.allscan --json [--procs 2,4,8] [--tokens-per-rank 512] ...

For each P it starts P local processes (gloo on CPU, NCCL with --device cuda),
each holding `tokens-per-rank` tokens, and measures per rank:
- bytes of tensors this rank handed to send / all-gather calls for the state
  exchange, forward and backward (counted at the calls; see CommCounter);
- the time of the state exchange alone, forward + backward (median over
  repeats of the slowest rank);
- end-to-end GLA forward + backward with sequence parallelism, against one
  process running one rank's length (weak scaling: ideal ratio 1).
It prints one JSON object with `bytes_ratio` and `exchange_time_ratio`
(all-gather / All-Scan) per P.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longrl.models.gla import gla_chunked
from longrl.parallel.allscan import CommCounter, allscan_states
from longrl.parallel.gla_sp import gla_sequence_parallel
from longrl.parallel.lasp2 import allgather_states
from longrl.parallel.local_spawn import spawn_local

METHODS = ("allscan", "lasp2")


def _parse(args):
    p = argparse.ArgumentParser(prog="longrl bench allscan", description=__doc__.split("\n")[0])
    p.add_argument("--procs", default="2,4,8", help="comma-separated process counts P")
    p.add_argument("--tokens-per-rank", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--key-dim", type=int, default=64, help="d_k per head")
    p.add_argument("--value-dim", type=int, default=64, help="d_v per head")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--blocks", type=int, default=4, help="All-Scan pipeline blocks along d_k")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    return p.parse_args(args)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest_median(times, device):
    """Median over repeats of the slowest rank's time."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist())


def _timed(step, repeats, device):
    """Time `step()` after a barrier, `repeats` times after one warm-up."""
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def _worker(rank, world, opt, out_path):
    device = torch.device("cuda", rank) if opt.device == "cuda" else torch.device("cpu")
    B, H, T, K, V = opt.batch, opt.heads, opt.tokens_per_rank, opt.key_dim, opt.value_dim
    gen = torch.Generator().manual_seed(rank)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device)
    qkvg = [rnd(B, H, T, K), rnd(B, H, T, K), rnd(B, H, T, V), F.logsigmoid(rnd(B, H, T, K))]
    local, log_decay, grad = rnd(B, H, K, V), -rnd(B, H, K).abs(), rnd(B, H, K, V)
    exchange = {"allscan": lambda L, c: allscan_states(L, c, num_blocks=opt.blocks),
                "lasp2": lambda L, c: allgather_states(L, c)}

    def sp_step(method, counter=None):
        leaves = [x.clone().requires_grad_() for x in qkvg]
        o, _ = gla_sequence_parallel(*leaves, method=method, num_blocks=opt.blocks, chunk_size=opt.chunk_size,
                                     counter=counter)
        o.sum().backward()

    def exchange_step(method):
        L, c = local.clone().requires_grad_(), log_decay.clone().requires_grad_()
        exchange[method](L, c).backward(grad)

    result = {}
    for method in METHODS:
        counter = CommCounter()
        sp_step(method, counter)  # one layer forward + backward, counted
        sent = torch.tensor([counter.bytes_sent["forward"], counter.bytes_sent["backward"]], device=device)
        every = [torch.zeros_like(sent) for _ in range(world)]
        dist.all_gather(every, sent)
        result[method] = {
            "bytes_sent_per_rank": [{"forward": int(s[0]), "backward": int(s[1])} for s in every],
            "exchange_time_s": _slowest_median(_timed(lambda: exchange_step(method), opt.repeats, device), device),
            "sp_fwd_bwd_time_s": _slowest_median(_timed(lambda: sp_step(method), opt.repeats, device), device),
        }

    def single_step():  # one process, one rank's length, no communication
        leaves = [x.clone().requires_grad_() for x in qkvg]
        gla_chunked(*leaves, chunk_size=opt.chunk_size)[0].sum().backward()

    single = []
    for i in range(opt.repeats + 1):
        dist.barrier()  # the other ranks wait here while rank 0 runs alone
        if rank == 0:
            t0 = time.perf_counter()
            single_step()
            _sync(device)
            if i:
                single.append(time.perf_counter() - t0)
    if rank == 0:
        result["single_fwd_bwd_time_s"] = statistics.median(single)
        Path(out_path).write_text(json.dumps(result))
    dist.barrier()


def _summarise(P, raw, state_bytes):
    per_rank_total = {m: max(r["forward"] + r["backward"] for r in raw[m]["bytes_sent_per_rank"]) for m in METHODS}
    forward = {m: max(r["forward"] for r in raw[m]["bytes_sent_per_rank"]) for m in METHODS}
    t = {m: raw[m]["exchange_time_s"] for m in METHODS}
    e2e = {m: raw[m]["sp_fwd_bwd_time_s"] for m in METHODS}
    return {
        "P": P,
        "bytes_sent_per_rank": {m: raw[m]["bytes_sent_per_rank"] for m in METHODS},
        "max_bytes_sent_per_rank_fwd_bwd": per_rank_total,
        "allscan_states_sent_per_rank_fwd_bwd": per_rank_total["allscan"] / state_bytes,
        "bytes_ratio": per_rank_total["lasp2"] / per_rank_total["allscan"],
        "bytes_ratio_forward": forward["lasp2"] / forward["allscan"],
        "exchange_time_s": t,
        "exchange_time_ratio": t["lasp2"] / t["allscan"],
        "sp_fwd_bwd_time_s": e2e,
        "single_rank_length_fwd_bwd_time_s": raw["single_fwd_bwd_time_s"],
        "weak_scaling_time_ratio": {m: e2e[m] / raw["single_fwd_bwd_time_s"] for m in METHODS},
    }


def run(args: list[str]) -> dict:
    """Run the benchmark; prints and returns the JSON result."""
    opt = _parse(args)
    procs = [int(p) for p in opt.procs.split(",")]
    state_bytes = opt.batch * opt.heads * opt.key_dim * opt.value_dim * 4  # float32
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for P in procs:
            out = Path(tmp) / f"p{P}.json"
            if opt.device == "cuda":
                spawn_local(_worker, P, opt, str(out), backend="nccl", start_method="spawn")
            else:  # fork: no torch re-import in every child
                spawn_local(_worker, P, opt, str(out), start_method="fork")
            results.append(_summarise(P, json.loads(out.read_text()), state_bytes))
            if not opt.json:
                r = results[-1]
                print(f"P={P}: bytes_ratio={r['bytes_ratio']:.2f} exchange_time_ratio={r['exchange_time_ratio']:.2f}",
                      file=sys.stderr)
    report = {
        "benchmark": "allscan",
        "what": "GLA sequence parallelism: ZeCO All-Scan relay vs LASP-2 all-gather of (state, decay)",
        "config": {k: v for k, v in vars(opt).items() if k != "json"},
        "state_bytes": state_bytes,
        "note": ("bytes are counted at the send / all-gather calls (an all-gather counts P-1 copies of the "
                 "rank's tensor) and are the stable figure. On a CPU machine all P processes share the cores "
                 "(this one has %d), so times include contention and weak-scaling ratios far above 1 are "
                 "expected there." % os.cpu_count()),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run(sys.argv[1:])
