"""Segments of a video: a time range decoded at its own frame rate (the `video_frames` tool).

An agent that looks again at part of a video (VideoChat-A1's chain-of-shot, the issue's
`video_frames(start, end)`) needs those seconds at a higher frame rate than the uniform
sampling of the whole clip. A segment is named by one self-describing string, its *spec*,

    "<path>#t=<start>,<end>&fps=<fps>&frames=<max frames>&px=<min pixels>,<max pixels>"

(the time part is the W3C media-fragment syntax), so that it travels as an ordinary media
entry of an example (`Example.media[1:]` of an episode's row, `rollout/episodes.py`), keys
the embedding cache (with the file's content hash, like a whole video) and can be decoded
again from nothing but the string (a later step, another process). Decoding is remembered
per spec (LRU): the tool decodes the segment, the policy encodes it from the same frames.

Departures: times are rounded to 0.1 s (so near-identical calls share one cache entry);
frames are sampled at slot centres inside the segment as `frames.sample_times` does for a
whole video, falling back to `max_frames` uniform slots when the segment is long.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from longrl.media.frames import Clip, FrameSampling, frames_at, resize_frames, sample_times, target_size

SEGMENT_MARK = "#t="
"""What separates a segment spec's file path from its range and sampling."""
TIME_STEP = 0.1
"""Segment bounds are rounded to this many seconds."""


@dataclass(frozen=True)
class Segment:
    path: str
    start: float
    """Seconds from the first frame (rounded to TIME_STEP)."""
    end: float
    fps: float
    max_frames: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def of(cls, path: str, start: float, end: float, sampling: FrameSampling) -> "Segment":
        """`[start, end)` of `path` sampled at `sampling.fps` (capped at `sampling.max_frames`)
        with its pixel budget."""
        return cls(str(path), _round(start), _round(end), float(sampling.fps), int(sampling.max_frames),
                   int(sampling.min_pixels), int(sampling.max_pixels))

    def spec(self) -> str:
        return (f"{self.path}{SEGMENT_MARK}{self.start:g},{self.end:g}&fps={self.fps:g}&frames={self.max_frames}"
                f"&px={self.min_pixels},{self.max_pixels}")

    @classmethod
    def parse(cls, spec: str) -> "Segment":
        path, _, rest = spec.rpartition(SEGMENT_MARK)
        if not path:
            raise ValueError(f"{spec!r} is not a segment spec (no {SEGMENT_MARK!r})")
        parts = dict(p.split("=", 1) for p in ("t=" + rest).split("&"))
        start, end = (float(x) for x in parts["t"].split(","))
        lo, hi = (int(x) for x in parts["px"].split(","))
        return cls(path, start, end, float(parts["fps"]), int(parts["frames"]), lo, hi)

    def sampling(self) -> FrameSampling:
        return FrameSampling(fps=self.fps, max_frames=self.max_frames, min_pixels=self.min_pixels,
                             max_pixels=self.max_pixels)

    def cache_sampling(self) -> dict:
        """The embedding-cache key's sampling part (the file's hash is added by the cache)."""
        return {**self.sampling().key(), "segment": [self.start, self.end]}


def is_segment(media: str) -> bool:
    return SEGMENT_MARK in media


def _round(t: float) -> float:
    return round(round(float(t) / TIME_STEP) * TIME_STEP, 6)


def segment_times(duration_s: float, start: float, end: float, fps: float, max_frames: int) -> np.ndarray:
    """Sampling times (s) inside `[start, end)`, clipped to the video. -> [N]"""
    end = min(end, duration_s)
    return start + sample_times(max(end - start, 1e-6), fps, max_frames)


@functools.lru_cache(maxsize=64)
def decode_segment(spec: str) -> Clip:
    """The segment's frames, sampled and resized (memory: at most 64 segments remembered).
    Raises `UserError` for a file that cannot be read (from `decode.probe`)."""
    from longrl.media.decode import decode_frames, probe

    seg = Segment.parse(spec)
    info = probe(seg.path)
    if not 0 <= seg.start < min(seg.end, info.duration_s):
        raise ValueError(f"segment {seg.start:g}-{seg.end:g} s is outside the video (0-{info.duration_s:g} s)")
    idx = frames_at(info.frame_times, segment_times(info.duration_s, seg.start, seg.end, seg.fps, seg.max_frames))
    frames = torch.from_numpy(decode_frames(info, idx))  # [N, H, W, 3] uint8
    frames = resize_frames(frames, target_size(info, len(idx), seg.sampling()))
    return Clip(spec, frames, info.frame_times[idx], info.duration_s, info.fps)
