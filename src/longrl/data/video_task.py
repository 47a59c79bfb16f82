"""Video question sets for training: JSONL of questions about video files, every clip
decoded once up front (generated with `data/videos.py` when the data directory does not
exist yet).

    load_video_task(cfg, score)  train and held-out examples + their decoded clips

Departures: clips are held in memory as uint8 frames (fine for the small generated sets; a
large set would stream them, or cache embeddings on disk with video.embed_cache_dir).
The scorer is the caller's (`recipes/train.py` picks it from reward.correctness), so data/
imports no reward code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from longrl.config import Config
from longrl.data.example import Example
from longrl.errors import UserError
from longrl.parallel import dist

log = logging.getLogger(__name__)

TASK_NAME = "videos"
"""`task.name` that selects this recipe."""
GENERATOR_KWARGS = ("kinds", "min_seconds", "max_seconds", "fps", "slip")
"""`task.kwargs` passed to the video generator when the data directory does not exist."""


# ----------------------------------------------------------------------------------------
# Data: JSONL of video questions, clips decoded once
# ----------------------------------------------------------------------------------------


@dataclass
class VideoClip:
    frames: torch.Tensor
    """Sampled, resized RGB frames. [N, H, W, 3] uint8"""
    second_per_grid: float
    """Seconds per temporal grid step (Qwen2.5-VL's second_per_grid_ts)."""


@dataclass
class VideoTask:
    """What `train.py` needs of a task (name, train, eval, score) plus the decoded clips."""

    name: str
    train: list[Example]
    eval: list[Example]
    score: object
    clips: dict[str, VideoClip]
    """Video path -> clip; examples name theirs in `media[0]`."""
    sampling: object
    """The `media.frames.FrameSampling` the clips were taken with (part of the cache key)."""
    environment: object | None = None
    """No multi-turn tool environment for video questions (the field `data.registry.Task` has)."""


def frame_sampling(cfg: Config):
    from longrl.media.frames import PATCH_FACTOR, FrameSampling

    return FrameSampling(fps=cfg.video.fps or None, max_frames=cfg.video.max_frames,
                         min_pixels=min(4 * PATCH_FACTOR * PATCH_FACTOR, cfg.video.max_pixels),
                         max_pixels=cfg.video.max_pixels)


def check_config(cfg: Config) -> None:
    """Settings the video recipe does not support, refused before anything runs."""
    if not cfg.task.train_file:
        raise UserError("task.name=videos needs task.train_file=DIR/train.jsonl (generated there if DIR does not exist)")
    if cfg.rollout.partial:
        raise UserError("rollout.partial=true (APRIL) is not supported for video yet; set rollout.partial=false")
    if cfg.train.backprop not in ("chunked", "streambp"):
        raise UserError(f"train.backprop={cfg.train.backprop}: the video recipe runs train.backprop=chunked or streambp")
    if cfg.train.backprop == "streambp" and cfg.parallel.sp_size > 1:
        raise UserError("train.backprop=streambp with parallel.sp_size>1 is not supported for video; use train.backprop=chunked")
    if cfg.video.train_vision and cfg.rl.ppo_epochs > 1:
        raise UserError("video.train_vision=true needs rl.ppo_epochs=1 (the step's single encode is stale after the first update)")
    if cfg.video.train_vision and cfg.rl.kl_coef > 0:
        raise UserError("video.train_vision=true with rl.kl_coef>0 is not supported (the reference would need its own vision tower)")
    bad = sorted(set(cfg.task.kwargs) - set(GENERATOR_KWARGS))
    if bad:
        raise UserError(f"task.kwargs.{bad[0]}: the video task takes only {', '.join(GENERATOR_KWARGS)} (for generating data)")


MADE_BY_RUN = "longrl train (task.train_file)"
"""summary.json's `made_by` for data a run generated itself: such a directory is the run's to
regenerate when the config changes; one made with `longrl data videos` is the user's."""
MAX_GENERATED = 2000


def generator_settings(cfg: Config) -> dict:
    """The `data.videos.generate` settings the config describes (task.kwargs, else defaults)."""
    kw = dict(cfg.task.kwargs)
    kinds = kw.get("kinds", "colour")
    kinds = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else list(kinds)
    return {"seed": cfg.task.seed, "min_seconds": float(kw.get("min_seconds", 8.0)),
            "max_seconds": float(kw.get("max_seconds", 30.0)), "fps": int(kw.get("fps", 2)),
            "kinds": kinds, "slip": float(kw.get("slip", 0.0))}


def data_mismatch(cfg: Config, summary: dict, own: bool) -> str | None:
    """What a generated directory (its summary.json) lacks for this config, or None. Counts
    must cover task.n_train / task.n_eval (more is fine: the first ones are used). A run's own
    data must also match every generator setting; data made with `longrl data videos` only
    the settings task.kwargs names (its other settings are the user's choice)."""
    problems = []
    uses_its_eval = not cfg.task.eval_file or Path(cfg.task.eval_file) == Path(cfg.task.train_file).parent / "eval.jsonl"
    for split, want in (("train", cfg.task.n_train), ("eval", cfg.task.n_eval if uses_its_eval else 0)):
        have = summary.get(split)
        if not isinstance(have, int) or have < want:
            problems.append(f"{have} {split} videos where task.n_{split} = {want}")
    made = summary.get("settings")
    if not isinstance(made, dict):  # written before the settings were recorded: the counts are all we know
        made = {}
    wanted = generator_settings(cfg)
    keys = [k for k in wanted if own or k in cfg.task.kwargs] if made else []
    for key in keys:
        if made.get(key) != wanted[key]:
            problems.append(f"{key}={made.get(key)!r} where the config says {wanted[key]!r}")
    return "; ".join(problems) or None


def _generate_if_missing(cfg: Config, train_file: Path) -> None:
    """A fresh clone has no data: write the videos the config describes (small by design).
    A directory generated earlier is reused only while it matches the config: a run's own is
    regenerated when the config changed; one made with `longrl data videos` is refused with
    what differs (it is the user's to remake); a directory that is not generated is used as is."""
    from longrl.data.videos import GENERATOR, generate

    out = train_file.parent
    if out.exists():
        if not train_file.is_file():
            raise UserError(f"task.train_file '{train_file}' does not exist (its directory does, so nothing was generated); "
                            "give an existing JSONL or a directory that does not exist yet")
        summary = _generated_summary(out, GENERATOR)
        if summary is None:
            return
        own = summary.get("made_by") == MADE_BY_RUN
        problem = data_mismatch(cfg, summary, own)
        if problem is None:
            return
        if not own:
            raise UserError(f"{out} was generated with `longrl data videos` but does not match the config ({problem}): "
                            f"remake it with `longrl data videos --out {out} ...` to match, delete it so that this run "
                            "generates what the config says, or change task.n_train / task.n_eval / task.kwargs")
        log.warning("%s no longer matches the config (%s): generating it again", out, problem)
    settings = generator_settings(cfg)
    n = cfg.task.n_train + cfg.task.n_eval
    if n > MAX_GENERATED:
        raise UserError(f"task.n_train + task.n_eval = {n}: generating more than {MAX_GENERATED} videos in a training run is not "
                        "intended; generate them first with `longrl data videos`")
    log.warning("generating %d videos into %s", n, out)
    generate(out, n, seed=settings["seed"], min_s=settings["min_seconds"], max_s=settings["max_seconds"],
             fps=settings["fps"], eval_frac=cfg.task.n_eval / n, kinds=tuple(settings["kinds"]),
             slip=settings["slip"], made_by=MADE_BY_RUN)


def _generated_summary(out: Path, generator: str) -> dict | None:
    """The summary.json `data/videos.py` wrote into `out`, or None for data it did not make."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("generator") == generator else None


def _decode_all(examples: list[Example], sampling, split: str, clips: dict) -> list[Example]:
    """Decode every example's video once; examples whose video cannot be read are dropped
    with a warning and a count (never a crash mid-run)."""
    from longrl.media.frames import load_clip
    from longrl.models.vlm import seconds_per_grid

    kept, bad = [], []
    for ex in examples:
        if len(ex.media) != 1:
            raise UserError(f"{split} example {ex.id!r} has {len(ex.media)} media paths; a video question needs exactly one")
        path = ex.media[0]
        if path not in clips:
            try:
                clip = load_clip(path, sampling)
            except UserError as e:
                bad.append(str(e))
                clips[path] = None
                continue
            clips[path] = VideoClip(clip.frames, seconds_per_grid(clip.timestamps))
        if clips[path] is not None:
            kept.append(ex)
    if bad:
        log.warning("skipped %d of %d %s examples whose video could not be read (first: %s)",
                    len(examples) - len(kept), len(examples), split, bad[0])
    if not kept:
        raise UserError(f"no {split} example has a readable video ({bad[0] if bad else 'no examples'}); check the data directory")
    return kept


def load_video_task(cfg: Config, score) -> VideoTask:
    """Train and held-out video questions with their clips decoded, scored by `score`
    (text, example) -> float. Bad input -> UserError."""
    from longrl.data.jsonl import load_jsonl_examples

    check_config(cfg)
    from longrl.media.decode import import_av

    import_av()  # before generating anything: without PyAV, one clear error and nothing written
    train_file = Path(cfg.task.train_file)
    # Under torchrun one rank generates missing data while the others wait for it (and for
    # its error, so that every rank stops with the same message rather than hanging).
    error = None
    if dist.is_main():
        try:
            _generate_if_missing(cfg, train_file)
        except UserError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)
    eval_file = Path(cfg.task.eval_file) if cfg.task.eval_file else train_file.parent / "eval.jsonl"
    train = load_jsonl_examples(train_file)[: cfg.task.n_train]
    held = load_jsonl_examples(eval_file)[: cfg.task.n_eval]
    sampling = frame_sampling(cfg)
    clips: dict = {}
    train, held = _decode_all(train, sampling, "train", clips), _decode_all(held, sampling, "held-out", clips)
    return VideoTask(f"videos:{train_file.parent.name}", train, held, score,
                     {p: c for p, c in clips.items() if c is not None}, sampling)
