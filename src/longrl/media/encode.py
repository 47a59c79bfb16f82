"""Write RGB frames to a video file with PyAV (for the synthetic data set and for tests).

The codec follows the file extension: .mp4 and .mkv get H.264, .webm gets VP8. The file is
written under a temporary name and renamed, so a crash never leaves a half-written video.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

from longrl.errors import UserError
from longrl.media.decode import import_av

_CODECS = {".mp4": ("mp4", "libx264"), ".mkv": ("matroska", "libx264"), ".webm": ("webm", "libvpx")}


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: int, crf: int = 18, gop: int = 0) -> Path:
    """Encode RGB frames ([H, W, 3] uint8 each, even H and W) at `fps` to `path`.

    `gop` > 0 puts a keyframe every `gop` frames (the codec's default otherwise), which
    makes seeking in long videos cheap.
    """
    av = import_av()
    path = Path(path)
    if path.suffix not in _CODECS:
        raise UserError(f"cannot write {path}: use one of {sorted(_CODECS)}")
    fmt, codec = _CODECS[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format=fmt) as out:
            stream = out.add_stream(codec, rate=Fraction(fps))
            stream.pix_fmt = "yuv420p"
            if gop > 0:
                stream.codec_context.gop_size = gop
            stream.options = {"crf": str(crf)} if codec == "libx264" else {"crf": str(crf), "b:v": "0"}
            started = False
            for rgb in frames:
                if not started:
                    stream.height, stream.width = rgb.shape[:2]
                    started = True
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                out.mux(stream.encode(frame))
            if not started:
                raise ValueError(f"no frames to write to {path}")
            out.mux(stream.encode(None))  # flush the encoder
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a video is an ordinary output
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
