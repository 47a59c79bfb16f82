"""Benchmark: one GRPO step of the tiny VLM on an hour-long video (up to 3,600 frames).

Issue 17 of longrl ("Scaling RL to Long Videos", arXiv 2507.07966: 3,600 frames, about
256k tokens, on one 8-GPU node). Each row is ONE GRPO step as the recipe runs it
(`recipes.grpo.grpo_step` on a `policy.video.VideoPolicy` and the configured rollout
backend, built with the recipe's own loaders), in a fresh process, at every frame count:

- `uncached`: pixels in every pass (the baseline of `bench.video_cache`, its `uncached`
  step: the vision tower on G copies in every pass, every row runs the whole prompt);
- `cached`: the recipe (`train.backprop=chunked`: the video encoded once, the prompt run
  once per pass and shared by the G rows);
- `cached_sp2`: the recipe under `parallel.sp_size=2`, two gloo processes (MR-SP: each
  rank encodes half the temporal patches, Ulysses on whole rows); per-rank figures;
- `cached_streambp`: the recipe with `train.backprop=streambp` (whole rows, layer backward
  chunk by chunk);
- `cached_reduced`: the recipe with `video.token_reduction=diff video.max_unseen=0` (tokens
  that barely change from frame to frame dropped, positions kept; the threshold alone, no
  refresh: the most a long still video can shed); the tokens kept are recorded;
  `cached_streambp_reduced` (not in the default set): both.

Frames: `--tokens-per-frame` (default 64, what the paper's 3,600 frames / 256k tokens
give) sets the frame size (64 tokens: 224 x 448 pixels, 2 frames per temporal patch). The
clip is synthetic, with static stretches: a new scene every `--scene-frames` frames and a
small square that moves every frame, so token reduction has the redundancy a real video
(lectures, surveillance, games) has.

Measured per row: peak memory per rank and step time. Peak memory on CPU: the growth of
peak resident memory (VmHWM, reset through /proc/self/clear_refs just before the step)
over the resident memory of the process before the model was built, in a fresh process
started with MALLOC_MMAP_THRESHOLD_=65536 (glibc then maps every tensor above 64 KiB on
its own and unmaps it on free, so resident memory follows live tensors; the kernel keeps
the high-water mark, nothing is sampled). It therefore counts weights, the reference copy,
AdamW moments (a warm-up step on a 4-frame clip creates them first, as in any step after
the first), the decoded frames and everything the step allocates: what a GPU's
max_memory_allocated would count, plus allocator slack. On GPU: torch.cuda's peak
allocated over the same span. Step time: process CPU seconds with torch on one thread
(other jobs on the shared machine do not inflate it), wall seconds beside it.

Next to each measurement the planner's estimate (`longrl.plan`) for the same config, and
for every row the largest frame count whose estimated peak fits `--budget-gib` (default
20), marked `estimated` (the planner) unless a measured row reached it.

    longrl bench long-video --json                       # 256 frames, every row (minutes)
    longrl bench long-video --json --frames 1024,3600 --rows cached_reduced
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

ROWS = ("uncached", "cached", "cached_sp2", "cached_streambp", "cached_reduced", "cached_streambp_reduced")
DEFAULT_ROWS = ROWS[:5]
QUESTION = "Which object appeared first?\nA. red\nB. blue\nC. green\nD. cyan"
WARMUP_FRAMES = 4


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="longrl bench long-video", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", default="256", help="comma-separated frame counts (the issue's: 256,1024,3600)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated rows, of {', '.join(ROWS)}")
    p.add_argument("--tokens-per-frame", type=int, default=64, choices=(16, 32, 64, 128),
                   help="video tokens per frame (sets the frame size)")
    p.add_argument("--scene-frames", type=int, default=32, help="frames per static scene of the synthetic clip")
    p.add_argument("--group", type=int, default=4, help="G rollouts per prompt")
    p.add_argument("--response-len", type=int, default=8, help="tokens per rollout")
    p.add_argument("--uncached-max-frames", type=int, default=256,
                   help="the uncached row runs only up to this many frames (G encodes per pass); above: estimated")
    p.add_argument("--budget-gib", type=float, default=20.0, help="memory for the 'largest frame count' column")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every row (e.g. model.tiny.hidden_size=128)")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # "ROW,FRAMES"
    return p.parse_args(argv)


FRAME_SIZES = {16: (112, 224), 32: (224, 224), 64: (224, 448), 128: (448, 448)}
"""Tokens per frame -> (H, W): (H/14)*(W/14) patches per frame pair, merged 2x2: H*W/1568 per frame."""

MODEL = ["model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=4",
         "model.tiny.num_kv_heads=2", "model.tiny.intermediate_size=192",
         "model.tiny.max_position_embeddings=32768"]
"""The tiny VLM's text model (TinyVLMShape's defaults: the shape the video tests use)."""

ROW_KEYS = {
    "uncached": [],
    "cached": [],
    "cached_sp2": ["parallel.sp_size=2"],
    "cached_streambp": ["train.backprop=streambp"],
    "cached_reduced": ["video.token_reduction=diff", "video.max_unseen=0"],
    "cached_streambp_reduced": ["train.backprop=streambp", "video.token_reduction=diff", "video.max_unseen=0"],
}


def overrides(a, row: str, frames: int) -> list[str]:
    """The config of one row: the recipe's keys, one prompt of G rows, one micro-batch."""
    H, W = FRAME_SIZES[a.tokens_per_frame]
    return [*MODEL, "task.name=videos", f"video.max_frames={frames}", f"video.max_pixels={H * W}",
            f"rl.group_size={a.group}", "rl.prompts_per_step=1", f"rl.micro_batch_size={a.group}",
            f"rollout.max_new_tokens={a.response_len}", "rl.kl_coef=0.01", "rl.steps=2", "rl.warmup_steps=0",
            "run.progress=false", *ROW_KEYS[row], *a.set]


def bench_config(a, row: str, frames: int):
    """The row's validated Config (`task.name=videos` without a train file is fine here:
    the bench builds its task in memory)."""
    from longrl.config import load_config

    return load_config(None, overrides(a, row, frames))


# ----------------------------------------------------------------------------------------
# The clip and the task
# ----------------------------------------------------------------------------------------


def synthetic_clip(frames: int, height: int, width: int, scene_frames: int, seed: int = 0):
    """uint8 frames [N, H, W, 3]: a new random blocky scene every `scene_frames` frames and
    an 8x8-pixel-per-frame moving square on top, so most patches are static for a while."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_scenes = -(-frames // scene_frames)
    scenes = torch.randint(0, 256, (n_scenes, 3, height // 28, width // 28), dtype=torch.uint8, generator=g)
    scenes = torch.nn.functional.interpolate(scenes.float(), size=(height, width), mode="nearest").to(torch.uint8)
    clip = scenes.permute(0, 2, 3, 1).repeat_interleave(scene_frames, 0)[:frames].contiguous()  # [N, H, W, 3]
    side = 28
    for i in range(frames):  # the moving square: one patch-sized block, 8 px a frame
        x = (8 * i) % (width - side)
        y = (height - side) * ((i // ((width - side) // 8)) % 2)
        clip[i, y : y + side, x : x + side] = 255
    return clip


def build_task(cfg, clip, name: str):
    """A one-question VideoTask over `clip` (the cache key hashes a small file naming it)."""
    from longrl.data.example import Example
    from longrl.data.video_task import VideoClip, VideoTask, frame_sampling
    from longrl.rewards.verifiers import answer_scorer

    path = os.path.join(tempfile.gettempdir(), f"longrl-long-video-{os.getpid()}-{name}.id")
    with open(path, "w") as f:
        f.write(f"{name} {tuple(clip.shape)}\n")
    ex = Example(id=name, prompt=QUESTION, answer="A", solution="<answer>A</answer>", media=[path])
    task = VideoTask("bench", [ex], [], answer_scorer("mcq"), {path: VideoClip(clip, 1.0)}, frame_sampling(cfg))
    if not hasattr(task, "environment"):  # the recipe reads task.environment (tools); a video task has none
        task.environment = None
    return task


# ----------------------------------------------------------------------------------------
# Measuring one step
# ----------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    """The kernel's resident high-water mark restarts from the current resident size."""
    gc.collect()
    try:  # return freed heap pages (small tensors live in the heap) before the mark restarts
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Meter:
    """Peak memory over [start, stop]: CUDA peak allocated on GPU, VmHWM on CPU."""

    def __init__(self, device):
        self.device = device
        self.base = self._now()

    def _now(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.device.type == "cuda" else _rss()

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak()
        self.before = self._now()
        self.t_cpu, self.t_wall = time.process_time(), time.perf_counter()

    def stop(self) -> dict:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _hwm()
        return {"peak_bytes": peak - self.base, "resident_before_bytes": self.before - self.base,
                "step_cpu_s": round(time.process_time() - self.t_cpu, 3),
                "step_wall_s": round(time.perf_counter() - self.t_wall, 3)}


def measure_recipe(a, row: str, frames: int) -> dict:
    """One GRPO step of the recipe on a `frames`-frame clip after a warm-up step; this rank."""
    import torch

    from longrl.parallel import dist
    from longrl.policy.video import VideoPolicy, load_video_policy
    from longrl.recipes.grpo import grpo_step, init_state
    from longrl.rollout import make_backend
    from longrl.utils import pick_device

    cfg = bench_config(a, row, frames)
    torch.set_num_threads(1)
    device = pick_device(cfg.model.device)
    H, W = FRAME_SIZES[a.tokens_per_frame]
    warm = build_task(cfg, synthetic_clip(WARMUP_FRAMES, H, W, a.scene_frames, seed=1), "warmup")

    def build():
        torch.manual_seed(cfg.train.seed)
        model, tok = load_video_policy(cfg.model, device)
        backend = make_backend(cfg, model, tok)
        state = init_state(model, cfg, 1, backend)
        grpo_step(VideoPolicy(model, tok, warm, cfg), backend, warm, cfg, state)  # AdamW moments exist from here on
        return model, tok, backend, state

    build()  # a throwaway run first (its objects freed on return): lazy imports and kernel caches are not the step's memory
    meter = Meter(device)  # the baseline: nothing of the run built
    clip = synthetic_clip(frames, H, W, a.scene_frames)
    model, tok, backend, state = build()
    task = build_task(cfg, clip, f"clip{frames}")
    policy = VideoPolicy(model, tok, task, cfg)
    meter.start()
    metrics = grpo_step(policy, backend, task, cfg, state)
    out = meter.stop()
    out["video_tokens_kept_frac"] = policy.step_metrics().get("video/tokens_kept_frac")
    out["updated"] = "loss/policy" in metrics  # the step made an update (KL keeps it from being skipped)
    out["loss_finite"] = out["updated"] and bool(torch.isfinite(torch.tensor(metrics["loss/policy"])))
    out["rank"] = dist.rank()
    return out


def measure_uncached(a, frames: int) -> dict:
    """`bench.video_cache`'s uncached step (pixels in every pass) on the same model and clip."""
    import torch

    from longrl.bench import video_cache
    from longrl.config import rl_lr
    from longrl.policy.video import load_video_policy
    from longrl.utils import pick_device

    cfg = bench_config(a, "uncached", frames)
    torch.set_num_threads(1)
    device = pick_device(cfg.model.device)
    H, W = FRAME_SIZES[a.tokens_per_frame]
    ns = argparse.Namespace(group=a.group, response_len=a.response_len, train_vision=False)
    gen = torch.Generator().manual_seed(1)
    warm = synthetic_clip(WARMUP_FRAMES, H, W, a.scene_frames, seed=1)

    def build():
        torch.manual_seed(cfg.train.seed)
        model, _ = load_video_policy(cfg.model, device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rl_lr(cfg))  # rl.lr=0: by the model
        video_cache.grpo_step(model, opt, warm, 1.0, QUESTION, "uncached", ns, video_cache.Phases(device), gen)
        return model, opt

    build()  # a throwaway run first (see measure_recipe)
    meter = Meter(device)
    clip = synthetic_clip(frames, H, W, a.scene_frames)
    model, opt = build()
    meter.start()
    video_cache.grpo_step(model, opt, clip, 1.0, QUESTION, "uncached", ns, video_cache.Phases(device), gen)
    out = meter.stop()
    out["rank"] = 0
    return out


def _sp_rank(rank: int, world: int, argv: list[str], frames: int, out_dir: str) -> None:
    from longrl.parallel import dist

    dist.setup_layout(world)
    res = measure_recipe(parse(argv), "cached_sp2", frames)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def measure_sp(argv: list[str], frames: int, world: int = 2) -> dict:
    """Two gloo processes (forked: torch is imported once) run the SP row; the rank with
    the larger peak is reported, with both ranks' peaks."""
    from longrl.parallel.local_spawn import spawn_local

    with tempfile.TemporaryDirectory() as d:
        spawn_local(_sp_rank, world, argv, frames, d, start_method="fork")
        ranks = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(world)]
    top = max(ranks, key=lambda r: r["peak_bytes"])
    return {**top, "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
            "step_cpu_s": max(r["step_cpu_s"] for r in ranks)}


def child(argv: list[str], job: str) -> dict:
    a = parse(argv)
    row, frames = job.split(",")
    if row == "uncached":
        return measure_uncached(a, int(frames))
    if row == "cached_sp2":
        return measure_sp(argv, int(frames))
    return measure_recipe(a, row, int(frames))


def _run_child(argv: list[str], job: str) -> dict:
    cmd = [sys.executable, "-m", "longrl.bench.long_video", *argv, "--child", job]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------
# Driver: measured rows next to the planner's estimates
# ----------------------------------------------------------------------------------------


def estimate(a, row: str, frames: int, keep: float = 1.0) -> dict:
    """The planner's peak per rank for the row's config (`keep`: fraction of video tokens kept)."""
    from longrl import plan

    cfg = bench_config(a, row, frames)
    world = 2 if row == "cached_sp2" else 1
    return plan.estimate(cfg, _model_shape(tuple(a.set)), world_size=world, video_keep=keep, uncached=row == "uncached")


@functools.lru_cache(maxsize=None)
def _model_shape(extra: tuple[str, ...]):
    """The planner's view of the bench model (the same for every row and frame count)."""
    from longrl import plan

    return plan.describe_model(bench_config(argparse.Namespace(set=list(extra), tokens_per_frame=64, group=2,
                                                               response_len=1), "cached", 2))


def largest_fitting(a, row: str, budget: float, keep: float, limit: int = 1 << 20) -> int:
    """The largest frame count (a multiple of 2) whose estimated peak fits `budget` bytes."""
    lo, hi = 0, 2
    while hi <= limit and estimate(a, row, hi, keep)["peak_bytes"] <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 2:
        mid = (lo + hi) // 4 * 2
        lo, hi = (mid, hi) if estimate(a, row, mid, keep)["peak_bytes"] <= budget else (lo, mid)
    return lo


def run(args: list[str] | None = None) -> dict:
    import platform

    import numpy
    import torch
    import transformers

    argv = [x for x in (args or []) if x != "--json"]
    a = parse(argv)
    rows_wanted = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows_wanted if r not in ROWS]
    if bad:
        from longrl.errors import UserError

        raise UserError(f"--rows: unknown row {bad[0]!r}; choose from {', '.join(ROWS)}")
    frame_counts = [int(x) for x in a.frames.split(",") if x.strip()]
    results, keep_by_frames = [], {}
    for frames in frame_counts:
        for row in rows_wanted:
            if row == "uncached" and frames > a.uncached_max_frames:  # G encodes a pass: the planner's figure only
                est = estimate(a, row, frames)
                results.append({"row": row, "frames": frames, "video_tokens": _video_tokens(a, frames),
                                "estimated_peak_mib": round(est["peak_bytes"] / 2**20, 1), "measured": "not run"})
                continue
            print(f"long-video: {row} at {frames} frames ...", file=sys.stderr, flush=True)
            m = _run_child(argv, f"{row},{frames}")
            video_tokens = _video_tokens(a, frames)
            keep = (m.get("video_tokens_kept_frac") or 1.0) if _reduced(row) else 1.0
            kept = round(keep * video_tokens)
            if _reduced(row) and "error" not in m:
                keep_by_frames[frames] = keep
            est = estimate(a, row, frames, keep)
            entry = {"row": row, "frames": frames, "video_tokens": video_tokens,
                     "video_tokens_kept": kept,
                     "estimated_peak_mib": round(est["peak_bytes"] / 2**20, 1), **_measured(m)}
            if "peak_mib" in entry:
                entry["estimate_over_measured"] = round(est["peak_bytes"] / m["peak_bytes"], 3)
            results.append(entry)
            print(f"  {json.dumps(entry)}", file=sys.stderr, flush=True)
    budget = a.budget_gib * 2**30
    keep_reduced = min(keep_by_frames.values()) if keep_by_frames else 1.0
    largest = {}
    for row in rows_wanted:
        keep = keep_reduced if _reduced(row) else 1.0
        n = largest_fitting(a, row, budget, keep)
        ran = [r["frames"] for r in results if r["row"] == row and r.get("peak_mib") is not None
               and r["peak_mib"] * 2**20 <= budget]
        largest[row] = {"frames": n, "how": "estimated (planner)", "largest_measured_within_budget": max(ran, default=None),
                        **({"video_keep_assumed": round(keep, 4)} if _reduced(row) else {})}
    ratios = [r["estimate_over_measured"] for r in results if "estimate_over_measured" in r]
    return {
        "bench": "long_video",
        "command": "longrl bench long-video --json " + " ".join(argv),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__},
        "memory": "peak resident growth per rank (VmHWM over pre-model RSS; MALLOC_MMAP_THRESHOLD_=65536)",
        "clock": "process CPU seconds, 1 torch thread (per rank)",
        "group_size": a.group, "response_len": a.response_len, "tokens_per_frame": a.tokens_per_frame,
        "frame_size": list(FRAME_SIZES[a.tokens_per_frame]), "scene_frames": a.scene_frames,
        "model": MODEL + a.set,
        "results": results,
        "largest_frames_within_budget": {"budget_gib": a.budget_gib, **largest},
        "planner_worst_error": round(max((abs(r - 1) for r in ratios), default=0.0), 3),
    }


def _reduced(row: str) -> bool:
    return row.endswith("_reduced")


def _video_tokens(a, frames: int) -> int:
    H, W = FRAME_SIZES[a.tokens_per_frame]
    return -(-frames // 2) * (H // 28) * (W // 28)


def _measured(m: dict) -> dict:
    if "error" in m:
        return {"error": m["error"]}
    out = {"peak_mib": round(m["peak_bytes"] / 2**20, 1), "step_cpu_s": m["step_cpu_s"], "step_wall_s": m["step_wall_s"]}
    if "peak_bytes_per_rank" in m:
        out["peak_mib_per_rank"] = [round(b / 2**20, 1) for b in m["peak_bytes_per_rank"]]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.child:
        i = argv.index("--child")
        print(json.dumps(child(argv[:i] + argv[i + 2 :], a.child)))
        return 0
    print(json.dumps(run(argv), indent=None if a.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
