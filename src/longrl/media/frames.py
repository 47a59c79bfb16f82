"""Frame sampling and resizing: which frames a video model sees, and at what size.

LongVILA-R1 ("Scaling RL to Long Videos", arXiv 2507.07966) samples a fixed budget of
frames uniformly over the whole video (up to 512 in RL, more at inference); Qwen2.5-VL's
own pipeline samples at a fixed fps (default 2) capped by a frame budget, and resizes each
frame to a multiple of 28 pixels (14-pixel patches merged 2x2) within a pixel budget.
`FrameSampling` covers both: `fps=None` means "uniform over the video", otherwise sample at
`fps` and fall back to uniform when that would exceed `max_frames`.

Departures:
- Sampling times are the centres of equal time slots, mapped to the frame shown at that
  time; two slots landing on the same frame (sampling faster than the video's frame rate)
  give that frame once, so a clip can have fewer frames than asked for.
- Resizing uses torch's bicubic interpolation with antialiasing, not PIL/torchvision, so
  pixel values differ slightly from the Qwen2-VL processor's (torchvision is not a
  dependency). The target size rule is the same idea but written independently.
- The pixel budget is per frame (`max_pixels`), optionally further limited by a budget
  for the whole clip (`total_pixels`), as Qwen2.5-VL does for long videos.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from longrl.errors import UserError
from longrl.media.decode import VideoInfo, iter_frames, probe

log = logging.getLogger(__name__)

PATCH_FACTOR = 28
"""Frame sides are multiples of this: 14-pixel ViT patches merged 2x2 (Qwen2-VL)."""
MAX_ASPECT = 200.0
"""Frames more elongated than this cannot be patchified sensibly."""


@dataclass(frozen=True)
class FrameSampling:
    """How to turn a video file into model frames. Part of the embedding-cache key."""

    fps: float | None = 1.0
    """Frames per second to sample; None samples `max_frames` uniformly over the video."""
    max_frames: int = 64
    """Most frames per clip; sampling at `fps` falls back to uniform beyond this."""
    min_pixels: int = 4 * PATCH_FACTOR * PATCH_FACTOR
    """Smallest frame area after resizing (upscales tiny videos)."""
    max_pixels: int = 64 * PATCH_FACTOR * PATCH_FACTOR
    """Largest frame area after resizing."""
    total_pixels: int | None = None
    """Optional budget for the whole clip: per-frame area <= total_pixels / n_frames."""
    factor: int = PATCH_FACTOR
    """Frame sides are rounded to multiples of this (0 or 1: no resize at all)."""

    def key(self) -> dict:
        return asdict(self)


@dataclass
class Clip:
    """Frames sampled from one video, with the times they were taken at."""

    path: str
    frames: torch.Tensor
    """RGB frames. [N, H, W, 3] uint8"""
    timestamps: np.ndarray
    """Seconds from the video's first frame to each sampled frame. [N] float64"""
    duration_s: float
    source_fps: float


# ----------------------------------------------------------------------------------------
# Which frames
# ----------------------------------------------------------------------------------------


def sample_times(duration_s: float, fps: float | None, max_frames: int) -> np.ndarray:
    """Times (s) to sample: slot centres at `fps`, or `max_frames` uniform slots. -> [N]"""
    if max_frames < 1:
        raise ValueError(f"max_frames={max_frames} must be at least 1")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps={fps} must be positive (or None for uniform sampling)")
    if fps is not None:
        n = max(1, math.floor(duration_s * fps + 1e-9))
        if n <= max_frames:
            return (np.arange(n) + 0.5) / fps
    n = max_frames
    return (np.arange(n) + 0.5) * (duration_s / n)


def frames_at(frame_times: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Indices of the frames shown at `times` (last frame starting at or before), unique. -> [N']"""
    idx = np.searchsorted(frame_times, times, side="right") - 1
    return np.unique(np.clip(idx, 0, len(frame_times) - 1))


# ----------------------------------------------------------------------------------------
# What size
# ----------------------------------------------------------------------------------------


def fit_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, aspect kept, area in [min_pixels, max_pixels].

    The maximum wins when rounding to whole patches cannot meet both bounds.
    """
    if height < 1 or width < 1:
        raise ValueError(f"frame size {height}x{width} is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise UserError(f"frame size {height}x{width} is more elongated than {MAX_ASPECT:.0f}:1")
    if factor * factor > max_pixels:
        raise UserError(f"max_pixels={max_pixels} is smaller than one {factor}x{factor} patch")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:  # shrink: floor so the budget holds
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:  # grow: ceil so the minimum holds, unless that breaks the maximum
        scale = math.sqrt(min_pixels / (height * width))
        for rounding in (math.ceil, round, math.floor):
            h = max(factor, rounding(height * scale / factor) * factor)
            w = max(factor, rounding(width * scale / factor) * factor)
            if h * w <= max_pixels:
                break
    return h, w


def resize_frames(frames: torch.Tensor, size: tuple[int, int], chunk: int = 32) -> torch.Tensor:
    """Bicubic, antialiased resize of uint8 frames [N, H, W, 3] -> [N, h, w, 3] uint8.

    Works `chunk` frames at a time so a long clip never holds all frames in float32.
    """
    if tuple(frames.shape[1:3]) == tuple(size):
        return frames
    out = []
    for part in frames.split(chunk):
        x = part.permute(0, 3, 1, 2).float()  # [n, 3, H, W]
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)  # [n, 3, h, w]
        out.append(x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1))  # [n, h, w, 3]
    return torch.cat(out).contiguous()


def target_size(info: VideoInfo, n_frames: int, s: FrameSampling) -> tuple[int, int]:
    """The frame size `s` asks for, given how many frames the clip has."""
    max_pixels = s.max_pixels
    if s.total_pixels is not None:
        per_frame = s.total_pixels // max(1, n_frames)
        max_pixels = max(s.factor * s.factor, min(max_pixels, per_frame))
    return fit_size(info.height, info.width, s.factor, min(s.min_pixels, max_pixels), max_pixels)


# ----------------------------------------------------------------------------------------
# Whole clips
# ----------------------------------------------------------------------------------------


def load_clip(path: str | Path, sampling: FrameSampling = FrameSampling(), seek: bool = True,
              stats: dict | None = None, chunk: int = 32) -> Clip:
    """Decode, sample and resize one video. Raises `UserError` naming a bad file.

    Frames are resized `chunk` at a time as they are decoded, so memory holds the clip at
    its model size plus one chunk at the file's size (a long high-resolution video never
    sits in memory whole). `stats` counts the frames decoded (`decode.iter_frames`)."""
    info = probe(path)
    times = sample_times(info.duration_s, sampling.fps, sampling.max_frames)
    idx = frames_at(info.frame_times, times)
    size = target_size(info, len(idx), sampling) if sampling.factor > 1 else None
    parts, pending = [], []

    def flush():
        part = torch.from_numpy(np.stack(pending))  # [n, H, W, 3] uint8
        parts.append(part if size is None else resize_frames(part, size, chunk))
        pending.clear()

    for rgb in iter_frames(info, idx, seek=seek, stats=stats):
        pending.append(rgb)
        if len(pending) == chunk:
            flush()
    if pending:
        flush()
    frames = parts[0] if len(parts) == 1 else torch.cat(parts)  # [N, h, w, 3] uint8
    return Clip(str(path), frames, info.frame_times[idx], info.duration_s, info.fps)


@dataclass
class SkipLog:
    """Videos `iter_clips` could not read: (path, reason) in the order met."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    seen: int = 0


def iter_clips(
    paths: Iterable[str | Path], sampling: FrameSampling = FrameSampling(), skips: SkipLog | None = None
) -> Iterator[Clip]:
    """Load each video in turn, skipping unreadable ones with a warning.

    Every skip is logged and recorded in `skips`; when the iteration finishes a summary
    warning gives the count, so a dataset with broken files is never silently smaller.
    """
    skips = skips if skips is not None else SkipLog()
    for path in paths:
        skips.seen += 1
        try:
            clip = load_clip(path, sampling)
        except UserError as e:
            skips.skipped.append((str(path), str(e)))
            log.warning("skipping video: %s", e)
            continue
        yield clip
    if skips.skipped:
        log.warning("skipped %d of %d videos that could not be read", len(skips.skipped), skips.seen)
