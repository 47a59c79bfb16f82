"""Video decoding with PyAV: probe a file, then decode only the frames asked for.

"Scaling RL to Long Videos" (LongVILA-R1, arXiv 2507.07966) feeds the model a fixed budget
of frames sampled across hours-long videos. Decoding every frame of such a video is the
slow part, so decoding works in two passes:

1. `probe` demuxes packets without decoding them, giving the presentation time of every
   frame (cheap: no pixels are touched).
2. `decode_frames` decodes only up to the frames wanted, seeking to the nearest keyframe
   when the next wanted frame is far ahead, and converts only those frames to RGB.

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
        pts = [p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0]
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
    return VideoInfo(str(path), frame_pts, Fraction(time_base), fps, int(width), int(height))


def decode_frames(info: VideoInfo, indices: np.ndarray, seek: bool = True) -> np.ndarray:
    """Decode frames `indices` (sorted, unique, into `info.frame_pts`) as RGB. -> [N, H, W, 3] uint8

    With `seek`, a jump of more than `SEEK_GAP_S` to the next wanted frame seeks to the
    keyframe before it instead of decoding everything in between; the pixels are the same.
    """
    av = import_av()
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise ValueError("decode_frames needs at least one frame index")
    if np.any(np.diff(indices) <= 0) or indices[0] < 0 or indices[-1] >= info.n_frames:
        raise ValueError(f"frame indices must be sorted, unique and in [0, {info.n_frames})")
    targets = info.frame_pts[indices]  # [N]
    gap = int(SEEK_GAP_S / float(info.time_base)) if seek else None
    out: list[np.ndarray] = []
    container = _open(info.path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        while len(out) < len(targets):
            want = int(targets[len(out)])
            if gap is not None and (not out or want - int(targets[len(out) - 1]) > gap):
                container.seek(want, stream=stream, backward=True)
            _decode_run(container, stream, targets, out, gap)
    except av.FFmpegError as e:
        raise UserError(f"cannot decode video {info.path}: {e} (the file is corrupt or truncated)") from e
    finally:
        container.close()
    return np.stack(out)


def _decode_run(container, stream, targets: np.ndarray, out: list, gap: int | None) -> None:
    """Decode forward from the current position, appending wanted frames to `out`.

    Stops when all targets are found, when the next target is more than `gap` ahead (so
    the caller seeks), or at end of stream (a `UserError`: the file promised more frames).
    """
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        # A frame at or past the wanted pts is the frame shown at that time. ('past' only
        # happens when a packet's pts does not survive decoding, e.g. a damaged frame.)
        if frame.pts >= targets[len(out)]:
            rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
            while len(out) < len(targets) and frame.pts >= targets[len(out)]:
                out.append(rgb)
            if len(out) == len(targets):
                return
            if gap is not None and targets[len(out)] - frame.pts > gap:
                return
    raise UserError(
        f"video {container.name} ended after {len(out)} of {len(targets)} wanted frames (truncated or corrupt file)"
    )
