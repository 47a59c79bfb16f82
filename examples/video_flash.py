"""Data for `examples/video_agent_flash.yaml`: a question about a short segment that the
default frame sampling misses, answerable by looking again with `video_frames`.

Each video is 8 s of a dark screen at 4 fps (64x64); a coloured square flashes for half a
second inside a one-second window the question names. The prompt's video is sampled as 4
uniform frames (slot centres 1, 3, 5, 7 s), and the flash never covers those times, so the
prompt alone leaves the colour to chance (1 in 4); `video_frames: W, W+1` decodes the
window at 4 fps and sees it.

SFT demonstrations come from an imperfect teacher: on `skip` of the questions it answers
at once (its favourite, red) instead of calling the tool; otherwise it calls
`video_frames` on the window and answers right. A demonstration that calls holds the
tool's result verbatim (its video tokens too); `meta["demo_media"]` names the segment
behind them so that SFT trains on the segment's embeddings
(`rollout.episodes.demonstration_example`). Figures: BENCHMARKS.md, "A video agent".

    python examples/video_flash.py --out data/video_flash --n 400 --eval 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
LETTERS = "ABCD"
SECONDS, FPS, SIZE = 8, 4, 64
FLASHES = (1.5, 2.0, 3.5, 4.0, 5.5, 6.0)
"""Flash starts (s): half a second each, never at the uniform sampling's 1, 3, 5, 7 s."""


def frames(flash_at: float, colour: str) -> list[np.ndarray]:
    out = []
    for i in range(SECONDS * FPS):
        f = np.full((SIZE, SIZE, 3), 24, dtype=np.uint8)
        if flash_at <= i / FPS < flash_at + 0.5:
            f[16:48, 16:48] = COLOURS[colour]
        out.append(f)
    return out


def question(window: int) -> str:
    opts = "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, COLOURS))
    return (f"A square flashes between {window} and {window + 1} s. What colour is it?\n{opts}\n"
            "Answer with the option's letter.")


def demonstration(path: str, window: int, answer: str, call: bool, sampling) -> tuple[str, list[str]]:
    """The teacher's response text and the media behind it ([] when it does not call)."""
    if not call:
        return "<answer>A</answer>", []
    from longrl.tools.video_frames import VideoFramesTool

    out = VideoFramesTool(sampling).with_media([path])(f"{window}, {window + 1}")
    return f"<call>video_frames: {window}, {window + 1}</call><result>{out.text}</result><answer>{answer}</answer>", \
        list(out.media)


def generate(out: str | Path, n_train: int, n_eval: int, seed: int = 0, skip: float = 0.5,
             video_fps: float = 4.0, video_max_frames: int = 8, max_pixels: int = 3136) -> None:
    from longrl.media.encode import write_video
    from longrl.media.frames import PATCH_FACTOR, FrameSampling

    sampling = FrameSampling(fps=video_fps, max_frames=video_max_frames,
                             min_pixels=min(4 * PATCH_FACTOR * PATCH_FACTOR, max_pixels), max_pixels=max_pixels)
    out = Path(out).resolve()
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("eval", n_eval)):
        lines = []
        for i in range(n):
            flash_at = float(rng.choice(FLASHES))
            colour = str(rng.choice(list(COLOURS)))
            path = out / "videos" / f"{split}-{i:05d}.mp4"
            write_video(path, frames(flash_at, colour), FPS)
            answer = LETTERS[list(COLOURS).index(colour)]
            window = int(flash_at)
            text, media = demonstration(str(path), window, answer, bool(rng.random() >= skip), sampling)
            lines.append({"id": f"{split}-{i:05d}", "prompt": question(window), "answer": answer, "solution": text,
                          "media": [str(path)], "demo_media": media, "demo_media_token": "<|video_pad|>",
                          "eval_group": "flash"})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=float, default=0.5)
    a = p.parse_args()
    generate(a.out, a.n, a.eval, a.seed, a.skip)
