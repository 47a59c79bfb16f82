"""Benchmark: longest sequence that fits a memory cap, and step time, per backprop mode.

    python -m longrl.bench.streambp --json [--cap-gib 0.75] [--limit 16384] [--objectives sft,grpo] ...

Model: a random Qwen2 (4 layers, hidden 512, 8 heads, 2 KV heads, intermediate 1408, vocab
32000, float32, untied head), built from a config. One training step = forward, loss,
backward; gradients land in `.grad` (no optimizer, so no optimizer state in memory).

Objectives (the loss is the library's own, from `rl/losses.py`):
- sft:  1 sequence of length T, token-mean NLL on every position (`sft_loss`).
- grpo: a group of 4 sequences of length T, the first T/4 tokens a prompt, PPO-clip on the
  rest with one advantage per sequence (`policy_loss`); the old log-probs are the current
  ones plus noise so that the ratio and the clipping are live.

Modes:
- standard:    HF forward, full `[B, T, V]` logits, one backward.
- checkpoint:  HF activation checkpointing (each decoder layer recomputed in backward)
               with full logits: activation checkpointing as commonly used.
- checkpoint_chunked_head: the same checkpointing, with the chunked log-prob head of
               `streambp/logprobs.py` instead of full logits (isolates the layer part).
- streambp:    chunked head + the sequence-chunked layer backward of `streambp/layers.py`.
- chunked:     (not run by default) the chunked head with an ordinary backward through
               the layers, `train.backprop=chunked`.

Memory. Each (mode, objective, length) runs in its own process, forked from this one before
torch has run anything. On CPU its peak resident set (VmHWM) is the memory; a watchdog thread
kills the run as soon as the resident set passes the cap ("does not fit"). glibc's malloc
normally raises its mmap threshold after large frees, so freed activation buffers stay
resident and peak RSS then reflects allocation history more than live tensors; each run
therefore fixes the threshold at 64 KiB (mallopt), the same for every mode. On CUDA the
memory is `torch.cuda.max_memory_allocated`. The longest length is found by doubling from
`--start`, then bisection to `--step` tokens (or 1/8 of the length); lengths stop at
`--limit` (the search reports `hit_limit` and the ratio is then a lower bound).

Time. At the longest length every mode fits (rounded down to `--step`), and again at
`--time-tokens` tokens per step (no cap there), one process runs all modes on one model,
interleaved round by round (one warm-up round, then `--repeats` timed rounds), so that
the load of a shared machine drifts over all modes alike; the ratios use each mode's
fastest step. Runs use `--threads 1` by default: on an oversubscribed machine every
multi-threaded op waits at its barrier for a descheduled thread, a per-op delay that
punishes whichever mode issues more, smaller ops (StreamBP's chunks) rather than
measuring the work.

Result ratios, per objective: `max_len_ratio` = streambp / checkpoint max length;
`time_ratio` = streambp / checkpoint step time at the common length; `time_ratio_at_len`
the same at `time_len` (= `--time-tokens` / batch); and each again against
checkpoint_chunked_head (suffix `_vs_chunked_head`).

The default cap is small because every probe is a real step on a CPU: StreamBP's longest
length grows ~30x faster with the cap than checkpointing's. On a bigger machine raise it
(e.g. `--cap-gib 3 --limit 131072`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from longrl.rl.losses import loss_normalizer, policy_loss, sft_loss
from longrl.streambp import logprobs

MODES = ("standard", "checkpoint", "checkpoint_chunked_head", "streambp")
OBJECTIVES = ("sft", "grpo")
GROUP = 4
MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
DOES_NOT_FIT = 3  # exit status of a run the watchdog stopped


def _parse(args):
    p = argparse.ArgumentParser(prog="longrl bench streambp", description=__doc__.split("\n")[0])
    p.add_argument("--cap-gib", type=float, default=0.75, help="memory cap per run (GiB)")
    p.add_argument("--objectives", default="sft,grpo")
    p.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES + ('chunked',))}")
    p.add_argument("--chunk", type=int, default=256, help="StreamBP chunk (tokens), head and layers")
    p.add_argument("--start", type=int, default=256, help="first length tried")
    p.add_argument("--step", type=int, default=64, help="length resolution of the search")
    p.add_argument("--limit", type=int, default=16384, help="longest length tried")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per mode (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default); see Time")
    p.add_argument("--time-tokens", type=int, default=2048,
                   help="also time all modes at this many tokens per step, B*T (0 = off)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    opt = p.parse_args(args)
    for name, given, known in (("mode", opt.modes, MODES + ("chunked",)), ("objective", opt.objectives, OBJECTIVES)):
        for item in given.split(","):
            if item not in known:
                p.error(f"unknown {name} {item!r}; choose from {', '.join(known)}")
    return opt


# ---- one training step ----

def _build_model(device: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(max_position_embeddings=1 << 20, **MODEL)
    return Qwen2ForCausalLM(cfg).to(device).train()


def _batch(objective: str, length: int, device: str):
    """TokenBatch and loss_fn(logprobs [B, T]) for one objective at sequence length T."""
    g = torch.Generator().manual_seed(length)
    b = 1 if objective == "sft" else GROUP
    ids = torch.randint(2, MODEL["vocab_size"], (b, length), generator=g)  # [B, T]
    targets = torch.roll(ids, -1, dims=1)  # [B, T]
    mask = torch.ones(b, length)  # [B, T]
    mask[:, -1] = 0
    if objective == "grpo":
        mask[:, : length // 4] = 0  # the prompt
    noise = 0.2 * torch.randn(b, length, generator=g)  # [B, T]
    adv = torch.randn(b, generator=g)  # [B]
    batch = logprobs.TokenBatch(ids, targets, mask).to(device)
    noise, adv = noise.to(device), adv.to(device)
    norm = loss_normalizer(batch.mask, "token-mean")

    def loss_fn(logp):
        if objective == "sft":
            return sft_loss(logp, batch.mask, norm)
        return policy_loss(logp, logp.detach() + noise, adv, batch.mask, normalizer=norm)
    return batch, loss_fn


def _set_checkpointing(model, on: bool) -> None:
    if on and not model.is_activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif not on and model.is_activation_checkpointing:
        model.activation_checkpointing_disable()


def _step(model, mode: str, batch, loss_fn, chunk: int) -> None:
    """One forward + backward; gradients accumulate in `.grad`."""
    _set_checkpointing(model, mode in ("checkpoint", "checkpoint_chunked_head"))
    if mode == "streambp":
        logprobs.streambp_loss_and_backward(model, batch, loss_fn, chunk=chunk)
    elif mode in ("checkpoint_chunked_head", "chunked"):
        lead_mode = "checkpoint" if mode == "checkpoint_chunked_head" else "chunked"
        logprobs.loss_and_backward(model, batch, loss_fn, mode=lead_mode, chunk=chunk)
    else:  # standard or checkpoint: full logits, as a stock Hugging Face training step
        logprobs.loss_and_backward(model, batch, loss_fn, mode="standard")


# ---- one measured run, in a child process ----

def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _watch_rss(cap: int) -> None:
    def loop():
        while True:
            if _rss_bytes("VmRSS") > cap:
                os._exit(DOES_NOT_FIT)
            time.sleep(0.002)
    threading.Thread(target=loop, daemon=True).start()


def _fits_child(conn, mode, objective, length, opt):
    """Child process: one step at `length`; sends {'fits', 'peak_gib', 'base_gib'}."""
    _setup_child(opt)
    cap = int(opt.cap_gib * 2**30)
    model = _build_model(opt.device)
    batch, loss_fn = _batch(objective, length, opt.device)
    base = _rss_bytes("VmRSS")
    if opt.device == "cpu":
        _watch_rss(cap)
    try:
        _step(model, mode, batch, loss_fn, opt.chunk)
    except torch.OutOfMemoryError:
        conn.send({"fits": False})
        return
    peak = torch.cuda.max_memory_allocated() if opt.device == "cuda" else _rss_bytes("VmHWM")
    conn.send({"fits": peak <= cap, "peak_gib": round(peak / 2**30, 4), "base_gib": round(base / 2**30, 4)})


def _time_child(conn, modes, objective, length, opt):
    """Child process: all modes on one model, interleaved round by round so that load
    drifts hit each alike; one warm-up round, then `opt.repeats` timed rounds."""
    _setup_child(opt)
    model = _build_model(opt.device)
    batch, loss_fn = _batch(objective, length, opt.device)
    times = {mode: [] for mode in modes}
    for _ in range(1 + opt.repeats):
        for mode in modes:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            _step(model, mode, batch, loss_fn, opt.chunk)
            if opt.device == "cuda":
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t0)
    conn.send({mode: t[1:] for mode, t in times.items()})


def _setup_child(opt) -> None:
    if opt.threads > 0:
        torch.set_num_threads(opt.threads)
    if opt.device == "cpu":
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: see module docstring


def _in_child(target, *args):
    """Run target(conn, *args) in a forked process; its message, or None if it died."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(send, *args))
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:  # the watchdog ended it, or it crashed
        result = None
    proc.join()
    return result if proc.exitcode == 0 else None


def fits(mode: str, objective: str, length: int, opt) -> dict:
    """One step at `length` in its own process: {'fits': bool, 'length', ...}."""
    out = _in_child(_fits_child, mode, objective, length, opt) or {"fits": False}
    out["length"] = length
    if not opt.json:
        print(f"  {mode:24s} {objective:4s} T={length:6d} -> {json.dumps(out)}", file=sys.stderr)
    return out


# ---- search and report ----

def max_length(mode: str, objective: str, opt) -> dict:
    """Longest T that fits: doubling from opt.start, then bisection."""
    fit, fail, runs = 0, None, []
    length = opt.start
    while fail is None and length <= opt.limit:
        runs.append(fits(mode, objective, length, opt))
        if runs[-1]["fits"]:
            fit, length = length, length * 2
        else:
            fail = length
    if fail is not None:
        while fail - fit > max(opt.step, fit // 8):
            mid = (fit + fail) // 2 // opt.step * opt.step
            runs.append(fits(mode, objective, mid, opt))
            fit, fail = (mid, fail) if runs[-1]["fits"] else (fit, mid)
    fitting = [r for r in runs if r["fits"] and r["length"] == fit]
    return {"max_len": fit, "hit_limit": fail is None,
            "peak_gib_at_max": fitting[0]["peak_gib"] if fitting else None, "runs": len(runs)}


def _timings(modes, objective, length, opt) -> dict:
    """{mode: (fastest, median) step seconds} at `length`, modes interleaved in one process."""
    times = _in_child(_time_child, modes, objective, length, opt) if length > 0 else None
    if not opt.json:
        print(f"  time {objective} T={length}: {json.dumps(times)}", file=sys.stderr)
    return {mode: (min(t), statistics.median(t)) for mode, t in (times or {}).items()}


def run(args: list[str]) -> dict:
    """Run the benchmark; prints and returns the JSON result."""
    opt = _parse(args)
    modes = opt.modes.split(",")
    results = {}
    for objective in opt.objectives.split(","):
        res = {mode: max_length(mode, objective, opt) for mode in modes}
        common = min(r["max_len"] for r in res.values()) // opt.step * opt.step
        res["common_len"] = common
        at_common = _timings(modes, objective, common, opt)
        time_len = opt.time_tokens // (1 if objective == "sft" else GROUP)
        res["time_len"] = time_len
        at_len = _timings(modes, objective, time_len, opt) if time_len > 0 else {}
        for mode in modes:
            for key, timing in (("step_s", at_common), ("step_s_at_len", at_len)):
                if mode in timing:
                    res[mode][key + "_min"], res[mode][key + "_median"] = (round(x, 3) for x in timing[mode])
        for base, suffix in (("checkpoint", ""), ("checkpoint_chunked_head", "_vs_chunked_head")):
            if base not in res or "streambp" not in res:
                continue
            if res[base]["max_len"] > 0:
                res["max_len_ratio" + suffix] = round(res["streambp"]["max_len"] / res[base]["max_len"], 3)
            for key, timing in (("time_ratio", at_common), ("time_ratio_at_len", at_len)):
                if base in timing and "streambp" in timing:
                    res[key + suffix] = round(timing["streambp"][0] / timing[base][0], 3)
        results[objective] = res
        if not opt.json:
            print(f"{objective}: " + json.dumps({k: v for k, v in res.items() if "ratio" in k}), file=sys.stderr)
    report = {
        "benchmark": "streambp",
        "what": "longest sequence under a memory cap and step time: standard / HF activation checkpointing / "
                "StreamBP (chunked head + sequence-chunked layer backward)",
        "config": {k: v for k, v in vars(opt).items() if k != "json"},
        "model": MODEL,
        "cpus": os.cpu_count(),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run(sys.argv[1:])
