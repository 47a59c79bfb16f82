"""Where one GRPO step's time and memory go, and how close its training pass is to the machine's peak.

Three pieces for `bench/grpo_step.py` (and any bench that runs the recipes' own step):

- `PhaseClock` wraps the library calls one step makes (the rollout's `generate` and the
  model forwards inside it, the old and reference log-prob passes, the training pass, the
  optimizer step) on *instances* for the life of one bench process, so it times the code the
  recipe runs, not a copy. Per phase: seconds per step, calls, and how far the process's
  peak resident set (VmHWM) rose while it ran (the phase that raises it sets the peak).
- `training_flops` counts the FLOPs of one training pass analytically from the model's config
  (a Llama/Qwen-style decoder): forward = 2 x (the layers' matmul weights) per real token,
  + attention 4 x H x hd x (t + 1) per token at position t (causal, no padding), + the LM
  head 2 x D x V at the positions that get a log-prob (response tokens: the chunked head skips
  the rest); training = 3 x forward (backward = 2 x forward). These are *model* FLOPs: the
  chunked head's extra no-grad pass, recomputation and padded positions are not counted, so
  the rate is a lower bound on the arithmetic the CPU actually did.
- `matmul_peak` times square float32 `torch.mm`s on the current thread count, best of many:
  the machine's practical float32 peak, measured in the same process as the step it is
  compared with (before and after the steps; the higher counts).
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager

import torch


def rss_hwm_mb() -> float:
    """This process's peak resident set so far (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PhaseClock:
    """Seconds and peak-RSS rise per named phase, per step. Phases may nest (the prefill
    inside `generate`); each is timed on its own, so nested phases are not additive."""

    def __init__(self):
        self.steps: list[dict[str, dict]] = []
        self._open: list[str] = []

    def start_step(self) -> None:
        self.steps.append({})

    @contextmanager
    def phase(self, name: str):
        rec = (self.steps[-1].setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0, "calls": 0, "rss_rise_mb": 0.0})
               if self.steps else None)
        hwm0, t0, c0 = rss_hwm_mb(), time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if rec is not None:
                rec["seconds"] += time.perf_counter() - t0
                rec["cpu_seconds"] += time.process_time() - c0
                rec["calls"] += 1
                rec["rss_rise_mb"] += rss_hwm_mb() - hwm0

    def wrap(self, obj, attr: str, name) -> None:
        """Replace `obj.attr` (a bound method or a module function) by a timed call.
        `name` is a phase name or a function of the call's (args, kwargs) giving one."""
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.phase(name(args, kwargs) if callable(name) else name):
                return fn(*args, **kwargs)

        setattr(obj, attr, timed)

    def summary(self, skip: int) -> dict:
        """Per phase: mean seconds (wall and this process's CPU) per step over the steps after `skip`, calls per step, and
        the total peak-RSS rise over all steps (warm-up included: that is where peaks are set)."""
        timed = self.steps[skip:] or self.steps
        names = sorted({n for s in self.steps for n in s})
        out = {}
        for n in names:
            out[n] = {
                "seconds": sum(s.get(n, {}).get("seconds", 0.0) for s in timed) / len(timed),
                "cpu_seconds": sum(s.get(n, {}).get("cpu_seconds", 0.0) for s in timed) / len(timed),
                "calls": sum(s.get(n, {}).get("calls", 0) for s in timed) / len(timed),
                "rss_rise_mb": round(sum(s.get(n, {}).get("rss_rise_mb", 0.0) for s in self.steps), 1),
            }
        return out


# ----------------------------------------------------------------------------------------
# FLOPs of a training pass, and the machine's float32 matmul peak
# ----------------------------------------------------------------------------------------


def decoder_shape(config) -> dict | None:
    """(D, L, H, K, hd, I, V) of a Llama/Qwen-style decoder config; None for other models."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    if not all(hasattr(cfg, k) for k in need):
        return None
    H = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    return {"D": cfg.hidden_size, "L": cfg.num_hidden_layers, "H": H, "K": getattr(cfg, "num_key_value_heads", None) or H,
            "hd": hd, "I": cfg.intermediate_size, "V": cfg.vocab_size}


def layer_matmul_params(s: dict) -> int:
    """Weights one token multiplies by in one decoder layer: q, k, v, o and the gated MLP."""
    D, H, K, hd, I = s["D"], s["H"], s["K"], s["hd"], s["I"]
    return D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * I


def training_flops(s: dict, row_lengths: list[int], head_positions: int) -> dict:
    """Model FLOPs of one forward + backward over rows of `row_lengths` real tokens, with the
    LM head at `head_positions` positions (see the module docstring for the convention)."""
    tokens = sum(row_lengths)
    layers = 2 * s["L"] * layer_matmul_params(s) * tokens
    # causal attention: QK^T and AV, 2 * H * hd FLOPs each per (query, key) pair, n(n+1)/2 pairs
    attention = s["L"] * 4 * s["H"] * s["hd"] * sum(n * (n + 1) // 2 for n in row_lengths)
    head = 2 * s["D"] * s["V"] * head_positions
    forward = layers + attention + head
    return {"forward": forward, "training": 3 * forward, "layers": 3 * layers, "attention": 3 * attention,
            "head": 3 * head, "tokens": tokens, "head_positions": head_positions}


def matmul_peak(sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 10) -> dict:
    """Best float32 `torch.mm` rate of [n, n] @ [n, n] over `sizes` on the current thread
    count, GFLOP/s. Best-of-many: on a shared machine a slow repeat is someone else's load."""
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up: allocation, thread pool
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            t = min(t, time.perf_counter() - t0)
        best[n] = 2 * n**3 / t / 1e9
    n = max(best, key=best.get)
    return {"gflops": best[n], "n": n, "gflops_by_n": {k: round(v, 1) for k, v in best.items()},
            "repeats": repeats, "threads": torch.get_num_threads()}


def best_peak(*peaks: dict) -> dict:
    """The higher of peaks measured at different times of one run (before and after the steps)."""
    return max(peaks, key=lambda p: p["gflops"])
