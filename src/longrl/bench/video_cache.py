"""Benchmark: one GRPO step on a long video with and without cached video embeddings.

MR-SP stage 1 of "Scaling RL to Long Videos" (arXiv 2507.07966) encodes each video once
per step and reuses the embeddings for all G rollouts and every training pass. This
program times one GRPO-like step at several frame counts, three ways:

- `uncached`: what a pipeline that hands pixels to every forward does (the baseline of
  the paper and of the issue). The vision tower runs on every sequence of every pass (G
  times for the rollouts, G for the behaviour log-probs, G for the reference log-probs, G
  in the update) and each rollout and each training row runs the whole prompt.
- `cached_no_shared_prompt`: the vision tower runs once per step; every row still runs
  the whole prompt (video tokens + question) in every pass. Isolates the encode saving at
  equal text compute: `speedup_cache_only`.
- `cached`: the recipe's own code: `policy.video.VideoPolicy` (a fresh one each step, so the
  tower runs once per step as with a trainable tower; a frozen tower in a real run is
  encoded once per run) and the `hf` rollout backend, called as `recipes/grpo.py` calls
  them. The prompt's rotary positions are computed once; in the rollouts and in every
  training pass the G rows share one run of the prompt (its KV cache repeated to the rows;
  `vlm.shared_prompt_hidden`, exact values and gradients): `speedup`.
- `uncached_shared_prompt`: the prompt sharing of `cached`, but pixels in every pass, so
  the tower runs once per pass (rollout prefill, old, reference, update) instead of once
  per step. `speedup_vs_shared_uncached` = this / `cached` is the saving of encoding
  once when the text side is already as lean as it gets.

The step: rollouts (G samples, `--response-len` tokens each, no early stop), behaviour
log-probs, reference log-probs (the policy stands in for the frozen reference: same
cost), PPO-clip update with `rl.losses.policy_loss` and AdamW. The vision tower is
frozen unless `--train-vision`. For each frame count one process times the three
variants interleaved (A B C A B C ...), so load from other processes hits them alike,
after a warm-up round; the headline is each variant's fastest step (the median is also
reported). On GPU a step is timed in wall seconds; on CPU in this process's CPU seconds
with torch single-threaded, which other jobs on a shared machine do not inflate. Peak memory: CUDA peak allocated during a step on GPU; on CPU the growth of
peak RSS during one step, in a fresh process per variant.

The default model has Qwen2.5-VL-7B's proportions shrunk (vision width / text width ~
0.36, vision depth ~ text depth, MLP ratios kept). In FLOPs its vision tower costs about
0.3x a text-model forward per video token (0.4x in the real model); measured on one CPU thread
it costs about 2x (its matmuls are tiny and the windowed attention loops in Python), so
`speedup_cache_only` here is higher than a 7B model's would be. A heavier vision tower
(`--vision-depth`) or `--train-vision` saves more.

    python -m longrl.bench.video_cache --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

VARIANTS = ("uncached", "cached_no_shared_prompt", "cached", "uncached_shared_prompt")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="longrl bench video-cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", default="16,64,256", help="comma-separated frame counts")
    p.add_argument("--frame-size", type=int, default=56, help="frame side in pixels (multiple of 28)")
    p.add_argument("--group", type=int, default=8, help="G rollouts per prompt")
    p.add_argument("--response-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs time process CPU seconds)")
    p.add_argument("--train-vision", action="store_true", help="the update also trains the vision tower")
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # "time,F" or "mem,F,variant"
    return p.parse_args(argv)


def shape_from(a):
    from longrl.models.vlm import TinyVLMShape

    return TinyVLMShape(
        hidden_size=a.hidden, num_layers=a.layers, num_heads=4, num_kv_heads=2, intermediate_size=a.hidden * 37 // 7,
        vision_hidden_size=a.vision_hidden, vision_depth=a.vision_depth, vision_heads=4,
        vision_intermediate_size=a.vision_hidden * 8 // 3,
    )


# ----------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------


def clock(device) -> float:
    """Wall time on GPU; this process's CPU time on CPU, which other processes on a shared
    machine do not inflate (the bench runs torch single-threaded there, see --threads)."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


class Phases:
    def __init__(self, device):
        self.device, self.times = device, {}

    @contextmanager
    def __call__(self, name):
        self.sync()
        t0 = clock(self.device)
        yield
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + clock(self.device) - t0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def encode(model, pv, grid, spg, copies: int, grad: bool):
    """The vision tower on `copies` sequences' pixels in one batch, as a model forward given
    G rows of pixels does; the copies are identical, so the first one is kept."""
    from longrl.models.vlm import VideoEmbeds, encode_video

    with torch.set_grad_enabled(grad):
        if copies == 1:
            return encode_video(model, pv, grid, spg)
        out = model.model.visual(pv.repeat(copies, 1), grid_thw=grid.view(1, 3).repeat(copies, 1))
        return VideoEmbeds(out.pooler_output[: out.pooler_output.shape[0] // copies], grid, spg)


def grpo_step(model, opt, clip, spg, question: str, variant: str, a, phases: Phases, gen) -> None:
    """One GRPO-like step on one video (`clip`: uint8 frames [N, H, W, 3]) and question."""
    from longrl.models.vlm import (VideoEmbeds, as_leaf, build_vlm_tokenizer, patchify, prompt_positions,
                                   sample_prompts, sample_with_video, video_prompt_ids)
    from longrl.rl.losses import loss_normalizer, policy_loss
    from longrl.streambp.logprobs import make_batch

    if variant == "cached":
        return _recipe_step(model, opt, clip, spg, question, a, phases, gen)
    device = next(model.parameters()).device
    pv, grid = patchify(clip)
    pv = pv.to(device=device, dtype=next(model.model.visual.parameters()).dtype)
    prompt = video_prompt_ids(build_vlm_tokenizer(), int(grid.prod()) // 4, question)
    G = a.group
    shared = variant in ("cached", "uncached_shared_prompt")  # one prompt run shared by the G rows
    once = variant in ("cached", "cached_no_shared_prompt")  # one encode per step

    def video_for_pass(grad=False):
        """This pass's embeddings: the step's single encode, or a fresh one (G copies when
        every row carries its own pixels, one when the rows share the prompt run)."""
        if once and not grad:
            return video
        return encode(model, pv, grid, spg, 1 if (shared or once) else G, grad)

    if once:
        with phases("encode"):  # the step's one encode, keeping its graph when the tower trains
            step_video = encode(model, pv, grid, spg, 1, grad=a.train_vision)
            video = VideoEmbeds(step_video.embeds.detach(), step_video.grid_thw, step_video.second_per_grid)
            positions = prompt_positions(model, prompt, video) if shared else None  # once per step
    with phases("rollout"):
        v = video_for_pass()
        if shared:
            pos = positions if once else prompt_positions(model, prompt, v)
            responses, _ = sample_prompts(model, [v], [prompt], [pos], G, a.response_len, eos_id=-1,
                                          temperature=1.0, generator=gen)
        else:
            responses, _ = sample_with_video(model, v, prompt, G, a.response_len, eos_id=-1, temperature=1.0,
                                             generator=gen, share_prefill=False)
    batch = make_batch([prompt] * G, responses, pad_id=0).to(pv.device)

    def pass_positions(v):
        return positions if once else prompt_positions(model, prompt, v)

    with phases("old_logprobs"):
        old = _logprobs(model, video_for_pass(), batch, prompt, shared, pass_positions)
    with phases("ref_logprobs"):
        ref = _logprobs(model, video_for_pass(), batch, prompt, shared, pass_positions)
    advantages = torch.randn(G, generator=gen).to(pv.device)
    norm = loss_normalizer(batch.mask, "token-mean")

    def loss_fn(logp):
        return policy_loss(logp, old, advantages, batch.mask, normalizer=norm, ref_logprobs=ref, kl_coef=0.01)

    with phases("update"):
        if a.train_vision:
            full = step_video if once else encode(model, pv, grid, spg, 1 if shared else G, grad=True)
            leaf = as_leaf(full)
            _backward(model, leaf, batch, prompt, shared, pass_positions, loss_fn)
            full.embeds.backward(leaf.embeds.grad)  # uncached: back through all G copies' graph
        else:
            _backward(model, video_for_pass(), batch, prompt, shared, pass_positions, loss_fn)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _recipe_step(model, opt, clip, spg, question: str, a, phases: Phases, gen) -> None:
    """The `cached` variant: the video policy and the hf backend, as the GRPO recipe runs them."""
    from longrl.config import Config
    from longrl.data.example import Example
    from longrl.data.video_task import VideoClip, VideoTask, frame_sampling
    from longrl.models.vlm import build_vlm_tokenizer
    from longrl.policy.video import VideoPolicy
    from longrl.rl.losses import loss_normalizer, policy_loss
    from longrl.rollout.base import SamplingParams
    from longrl.rollout.hf import HFBackend
    from longrl.streambp.logprobs import make_batch

    G, tok, cfg = a.group, build_vlm_tokenizer(), Config()
    cfg.video.train_vision = a.train_vision
    path = _clip_file(clip)  # the embedding cache keys on a file's identity
    ex = Example(id="v", prompt=question, answer="A", media=[path])
    task = VideoTask("bench", [ex], [], None, {path: VideoClip(clip, spg)}, frame_sampling(cfg))
    with phases("encode"):  # the step's one encode (the policy keeps its graph when the tower trains)
        policy = VideoPolicy(model, tok, task, cfg)
        policy.start_step(0)
        (request,) = policy.requests([ex], G)
    with phases("rollout"):
        backend = HFBackend(model, eos_id=-1, pad_id=0)  # no early stop: every response is a.response_len long
        responses = [g.response_ids for g in backend.generate([request], SamplingParams(a.response_len, 1.0), gen)]
    batch = make_batch([request.prompt_ids] * G, responses, pad_id=0).to(next(model.parameters()).device)
    rows = [ex] * G
    with phases("old_logprobs"):
        old = policy.logprobs(batch, rows)
    with phases("ref_logprobs"):
        ref = policy.logprobs(batch, rows)  # the policy stands in for the frozen reference: same cost
    advantages = torch.randn(G, generator=gen).to(batch.input_ids.device)
    norm = loss_normalizer(batch.mask, "token-mean")

    def loss_fn(logp):
        return policy_loss(logp, old, advantages, batch.mask, normalizer=norm, ref_logprobs=ref, kl_coef=0.01)

    with phases("update"):
        policy.loss_and_backward(batch, rows, loss_fn)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _clip_file(clip: torch.Tensor) -> str:
    """A file standing for the clip (its raw frames), made once per clip and process."""
    import hashlib
    import tempfile

    data = clip.numpy().tobytes()
    path = os.path.join(tempfile.gettempdir(), f"longrl-bench-{hashlib.sha1(data).hexdigest()[:16]}.frames")
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return path


def _hidden(model, v, batch, prompt, pass_positions):
    from longrl.models.vlm import shared_prompt_hidden

    P = len(prompt)
    h_p, h_r = shared_prompt_hidden(model, v, prompt, pass_positions(v), batch.input_ids[:, P:])
    return torch.cat([h_p.expand(h_r.shape[0], -1, -1), h_r], 1)  # [G, T, D]


def _logprobs(model, v, batch, prompt, shared, pass_positions):
    from longrl.models.vlm import video_logprobs
    from longrl.streambp.logprobs import chunked_logprobs

    if not shared:
        return video_logprobs(model, v, batch)
    with torch.no_grad():
        head = model.get_output_embeddings()
        return chunked_logprobs(_hidden(model, v, batch, prompt, pass_positions), head.weight, head.bias,
                                batch.targets, batch.mask, 256)


def _backward(model, v, batch, prompt, shared, pass_positions, loss_fn):
    from longrl.models.vlm import video_loss_and_backward
    from longrl.streambp.logprobs import backward_chunked_head

    if not shared:
        return video_loss_and_backward(model, v, batch, loss_fn)
    hidden = _hidden(model, v, batch, prompt, pass_positions)
    head = model.get_output_embeddings()
    _, _, grad_h, _ = backward_chunked_head(hidden, head.weight, head.bias, batch.targets, batch.mask, loss_fn, 256)
    hidden.backward(grad_h)


QUESTION = "Which object appeared first?\nA. red\nB. blue\nC. green\nD. cyan"


def setup(a, frames: int):
    from longrl.models.vlm import build_tiny_vlm, build_vlm_tokenizer
    from longrl.utils import pick_device

    device = pick_device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = build_vlm_tokenizer()
    model = build_tiny_vlm(tok, shape_from(a)).to(device)
    model.model.visual.requires_grad_(a.train_vision)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    clip = torch.randint(0, 256, (frames, a.frame_size, a.frame_size, 3), dtype=torch.uint8, generator=g)
    return device, model, opt, clip, QUESTION


def time_variants(a, frames: int) -> dict:
    """All variants in one process, interleaved (A B C A B C ...) so that load from other
    processes hits them alike; per variant the fastest and the median step."""
    device, model, opt, clip, question = setup(a, frames)
    gen = torch.Generator().manual_seed(1)
    runs: dict[str, list] = {v: [] for v in VARIANTS}
    peaks: dict[str, float] = {}
    for r in range(a.repeats + 1):  # round 0 warms up
        for v in VARIANTS:
            phases = Phases(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = clock(device)
            grpo_step(model, opt, clip, 1.0, question, v, a, phases, gen)
            phases.sync()
            if r > 0:
                runs[v].append((clock(device) - t0, phases.times))
                if device.type == "cuda":
                    peaks[v] = max(peaks.get(v, 0.0), (torch.cuda.max_memory_allocated() - base) / 2**20)
    from longrl.models.vlm import build_vlm_tokenizer, patchify, video_prompt_ids

    grid = patchify(clip)[1]
    prompt = video_prompt_ids(build_vlm_tokenizer(), int(grid.prod()) // 4, question)
    out = {"video_tokens": int(grid.prod()) // 4, "seq_len": len(prompt) + a.response_len}
    for v, rs in runs.items():
        rs.sort(key=lambda x: x[0])
        out[v] = {
            "step_s": round(rs[0][0], 4),
            "step_s_median": round(statistics.median(x[0] for x in rs), 4),
            "phases_s": {k: round(t, 4) for k, t in rs[0][1].items()},
        }
        if v in peaks:
            out[v]["peak_mem_mb"] = round(peaks[v], 1)
    return out


def cpu_peak_memory(a, frames: int, variant: str) -> float:
    """Peak growth of resident memory (MiB) during one step, after a warm-up step.

    Run in a fresh process started with MALLOC_MMAP_THRESHOLD_ set (see `run`), so large
    tensors are mapped and unmapped one by one and resident memory follows live tensors;
    a thread samples it every half millisecond.
    """
    import threading

    device, model, opt, clip, question = setup(a, frames)
    gen = torch.Generator().manual_seed(1)
    grpo_step(model, opt, clip, 1.0, question, variant, a, Phases(device), gen)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    grpo_step(model, opt, clip, 1.0, question, variant, a, Phases(device), gen)
    done.set()
    t.join()
    return round(max(0, max(peak[0], rss()) - start) / 2**20, 1)


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------


def _child(argv: list[str], job: str):
    cmd = [sys.executable, "-m", "longrl.bench.video_cache", *argv, "--child", job]
    # glibc: allocations above 64 KiB are mmapped and returned on free, so RSS tracks tensors
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {job} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: list[str] | None = None) -> dict:
    """Measure every frame count and variant; -> the JSON-able result."""
    from longrl.utils import pick_device

    argv = [x for x in (args or []) if x != "--json"]
    a = parse(argv)
    device = pick_device(a.device)
    rows = []
    for f in (int(x) for x in a.frames.split(",") if x.strip()):
        res = _child(argv, f"time,{f}")
        if device.type != "cuda":  # CPU peak RSS only resets with a fresh process
            for v in VARIANTS:
                res[v]["peak_mem_mb"] = _child(argv, f"mem,{f},{v}")
        rows.append({
            "frames": f,
            **res,
            "speedup": round(res["uncached"]["step_s"] / res["cached"]["step_s"], 3),
            "speedup_cache_only": round(res["uncached"]["step_s"] / res["cached_no_shared_prompt"]["step_s"], 3),
            "speedup_vs_shared_uncached": round(res["uncached_shared_prompt"]["step_s"] / res["cached"]["step_s"], 3),
        })
    return {
        "bench": "video_cache",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "clock": "wall seconds" if device.type == "cuda" else f"process CPU seconds, {a.threads} torch thread(s)",
        "group_size": a.group,
        "response_len": a.response_len,
        "frame_size": a.frame_size,
        "train_vision": a.train_vision,
        "repeats": a.repeats,
        "model": vars(shape_from(a)),
        "results": rows,
        "speedup": {str(r["frames"]): r["speedup"] for r in rows},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.child:
        kind, frames, *variant = a.child.split(",")
        result = time_variants(a, int(frames)) if kind == "time" else cpu_peak_memory(a, int(frames), variant[0])
        print(json.dumps(result))
        return 0
    result = run(argv)
    if not a.json:
        for r in result["results"]:
            print(f"frames={r['frames']:4d} video_tokens={r['video_tokens']:5d} "
                  f"uncached={r['uncached']['step_s']:.3f}s cached={r['cached']['step_s']:.3f}s "
                  f"speedup={r['speedup']:.2f}x (cache only {r['speedup_cache_only']:.2f}x, "
                  f"vs shared-prompt uncached {r['speedup_vs_shared_uncached']:.2f}x)", file=sys.stderr)
    print(json.dumps(result, indent=None if a.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
