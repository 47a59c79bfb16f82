"""Video decoding with PyAV: probe a file, then decode only the frames asked for.

"Scaling RL to Long Videos" (LongVILA-R1, arXiv 2507.07966) feeds the model a fixed budget
of frames sampled across hours-long videos. Decoding every frame of such a video is the
slow part, so decoding works in two passes:

1. `probe` demuxes packets without decoding them, giving the presentation time of every
   frame and which frames are keyframes (cheap: no pixels are touched).
2. `iter_frames` / `decode_frames` seek to the keyframe before each wanted frame whenever
   that keyframe lies beyond what has been decoded already, so only the frames between a
   wanted frame and its keyframe are decoded (at most one GOP per wanted frame, however
   long the video), and convert only the wanted frames to RGB. Memory holds the wanted
   frames, or with `iter_frames` one at a time, never the video.

Departures from the paper's pipeline (which uses decord/PyAV through LLaVA's loaders):
- Frames are chosen by their real presentation timestamps, not by an index computed from
  a nominal fps, so variable-frame-rate files sample correctly.
- Any failure (missing, corrupt, truncated, no video stream, zero frames) is a `UserError`
  naming the file; `frames.iter_clips` turns those into skips for dataset iteration.

PyAV is an optional extra (`longrl[video]`) and is imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from longrl.errors import UserError

INSTALL_HINT = "pip install 'longrl[video]'"
SEEK_GAP_S = 8.0
"""Seek instead of decoding forward when the next wanted frame is this far ahead.
Keyframes in real videos are usually 2-10 s apart; a shorter gap would often seek
backwards to the keyframe we are already past."""


def import_av():
    """Import PyAV or explain how to install it."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is in the dev environment
        raise UserError(f"reading videos needs PyAV, which is not installed: {INSTALL_HINT}") from e
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns from the container without decoding pixels."""

    path: str
    frame_pts: np.ndarray
    """Presentation timestamps of all frames in stream time-base units, sorted. [F] int64"""
    time_base: Fraction
    """Seconds per pts unit."""
    fps: float
    """Average frame rate (frames per second)."""
    width: int
    height: int
    key_pts: np.ndarray | None = None
    """Presentation timestamps of the keyframes, sorted (None: unknown). [K] int64"""

    @property
    def n_frames(self) -> int:
        return len(self.frame_pts)

    @property
    def frame_times(self) -> np.ndarray:
        """Frame start times in seconds, relative to the first frame. [F] float64"""
        return (self.frame_pts - self.frame_pts[0]) * float(self.time_base)

    @property
    def duration_s(self) -> float:
        """Time from the first frame's start to the last frame's end."""
        return float(self.frame_times[-1]) + 1.0 / self.fps


def _open(path: str | Path):
    av = import_av()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"video not found: {path} (check the path; the file must be a local mp4/webm/mkv)")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise UserError(f"cannot open video {path}: {e} (the file is corrupt or not a video)") from e
    if not container.streams.video:
        container.close()
        raise UserError(f"no video stream in {path} (is it an audio-only or non-video file?)")
    return container


def probe(path: str | Path) -> VideoInfo:
    """Demux `path` and list its frames' presentation timestamps; decode nothing."""
    av = import_av()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.pts is not None and p.size > 0]
        pts = [pt for pt, _ in packets]
        keys = [pt for pt, key in packets if key]
        width, height = stream.codec_context.width, stream.codec_context.height
        time_base = stream.time_base
        rate = stream.average_rate or stream.guessed_rate
    except av.FFmpegError as e:
        raise UserError(f"cannot read video {path}: {e} (the file is corrupt)") from e
    finally:
        container.close()
    if not pts:
        raise UserError(f"video {path} has no frames (empty or corrupt file)")
    frame_pts = np.unique(np.asarray(pts, dtype=np.int64))  # sorted; B-frames demux out of order
    if rate:
        fps = float(rate)
    elif len(frame_pts) > 1:
        fps = 1.0 / float(np.median(np.diff(frame_pts)) * time_base)
    else:
        fps = 1.0
    key_pts = np.unique(np.asarray(keys, dtype=np.int64)) if keys else None
    return VideoInfo(str(path), frame_pts, Fraction(time_base), fps, int(width), int(height), key_pts)


def decode_frames(info: VideoInfo, indices: np.ndarray, seek: bool = True, stats: dict | None = None) -> np.ndarray:
    """Decode frames `indices` (sorted, unique, into `info.frame_pts`) as RGB. -> [N, H, W, 3] uint8

    With `seek` (see `iter_frames`) only the frames from each wanted frame's keyframe on are
    decoded; the pixels are the same as decoding forward from the start.
    """
    return np.stack(list(iter_frames(info, indices, seek, stats)))


def iter_frames(info: VideoInfo, indices: np.ndarray, seek: bool = True, stats: dict | None = None):
    """Yield the RGB frames `indices` ([H, W, 3] uint8 each, in order), decoding as little as
    possible: before each wanted frame, seek to its keyframe when that keyframe lies past
    the last frame decoded (decoding forward is cheaper otherwise). Without keyframe
    information, seek when the wanted frame is more than `SEEK_GAP_S` ahead. `stats`, if
    given, counts frames "decoded" and "seeks" made.
    """
    av = import_av()
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise ValueError("decode_frames needs at least one frame index")
    if np.any(np.diff(indices) <= 0) or indices[0] < 0 or indices[-1] >= info.n_frames:
        raise ValueError(f"frame indices must be sorted, unique and in [0, {info.n_frames})")
    targets = info.frame_pts[indices]  # [N]
    stats = stats if stats is not None else {}
    stats.setdefault("decoded", 0)
    stats.setdefault("seeks", 0)
    jump = _seek_rule(info) if seek else (lambda last, want: False)
    found = 0
    container = _open(info.path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        last = None  # pts of the last frame decoded
        while found < len(targets):
            if seek and (last is None or jump(last, int(targets[found]))):
                container.seek(int(targets[found]), stream=stream, backward=True)
                stats["seeks"] += 1
            for rgb, last in _decode_run(container, stream, targets[found:], jump, stats):
                found += 1
                yield rgb
    except av.FFmpegError as e:
        raise UserError(f"cannot decode video {info.path}: {e} (the file is corrupt or truncated)") from e
    finally:
        container.close()


def _seek_rule(info: VideoInfo):
    """jump(last, want) -> bool: is seeking cheaper than decoding forward from `last` to `want`?"""
    if info.key_pts is not None and len(info.key_pts):
        keys, pts = info.key_pts, info.frame_pts

        def jump(last: int, want: int) -> bool:  # the keyframe before `want` is past the next frame:
            k = keys[max(0, np.searchsorted(keys, want, side="right") - 1)]  # seeking to it skips frames
            return np.searchsorted(pts, k) - np.searchsorted(pts, last) > 1

        return jump
    gap = int(SEEK_GAP_S / float(info.time_base))
    return lambda last, want: want - last > gap


def _decode_run(container, stream, targets: np.ndarray, jump, stats: dict):
    """Decode forward from the current position, yielding (rgb, pts) for each wanted frame.

    Stops when all `targets` are found, when seeking to the next one is cheaper (`jump`),
    or at end of stream (a `UserError`: the file promised more frames).
    """
    n = 0
    for frame in container.decode(stream):
        stats["decoded"] += 1
        if frame.pts is None:
            continue
        # A frame at or past the wanted pts is the frame shown at that time. ('past' only
        # happens when a packet's pts does not survive decoding, e.g. a damaged frame.)
        if frame.pts >= targets[n]:
            rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
            while n < len(targets) and frame.pts >= targets[n]:
                n += 1
                yield rgb, int(frame.pts)
            if n == len(targets) or jump(int(frame.pts), int(targets[n])):
                return
    raise UserError(f"video {container.name} ended {len(targets) - n} wanted frames early (truncated or corrupt file)")
