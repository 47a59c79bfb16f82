"""Synthetic long-video QA: real video files plus multiple-choice questions about them.

`longrl data videos --out DIR --n N` writes small videos (64x64 pixels, 2 fps, so a
several-minute video is a few kilobytes) and `DIR/train.jsonl` / `DIR/eval.jsonl` in the
format `data.jsonl` reads. The four question kinds follow LongVideo-Reason, the data set of
"Scaling RL to Long Videos" (LongVILA-R1, arXiv 2507.07966), which spans temporal, goal and
purpose, spatial, and plot/narrative reasoning:

- temporal: four objects appear one after another; which appeared first / last?
- counting: how many times did a target object appear (distractors appear in between)?
- spatial:  where in the frame was the red square: left, right, top or bottom?
- goal:     a dot drifts toward one box, then turns; which box is it heading to at the end?

plus an easy perception kind, `colour` (what colour was the one shape? options always
red/green/blue/yellow in that order), for a first training run on a CPU (`--kinds colour`).

Every line: {"id", "prompt" (question + "A. ..." options), "answer" (letter), "solution"
(a `<think>...</think><answer>X</answer>` trace for CoT-SFT), "media" (the video path,
relative to DIR), "kind", "duration_s", "options"}.

Departures from LongVideo-Reason (52K real videos with Gemini-written reasoning): the
scenes are drawn shapes, questions are templated and the reasoning traces are generated
from the scene description. Events occupy whole twelfths of the video, so any sampling of
at least 12-16 frames spread over the video sees every event: a tiny model can learn the
task from frames alone, and longer videos test the frame pipeline, not the eye.

Output is deterministic in --seed (item i depends only on the seed and i) and written
atomically: a temporary directory renamed to DIR at the end.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from longrl.errors import UserError
from longrl.utils import atomic_dir

SIZE = 64
"""Frame side in pixels."""
SEGMENTS = 12
"""The timeline is cut into this many equal segments; every event fills whole segments."""
LETTERS = "ABCD"
KINDS = ("temporal", "counting", "spatial", "goal")
NATURAL_ORDER = ("counting", "spatial", "colour")
"""Kinds whose options keep their natural order instead of being shuffled."""
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 60, 220),
    "cyan": (40, 220, 230),
}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = 24
PLACES = {"left": (12, 32), "right": (52, 32), "top": (32, 12), "bottom": (32, 52)}
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE] + 0.5  # pixel centres, [H, W] each


# ----------------------------------------------------------------------------------------
# Scenes: what is on screen when
# ----------------------------------------------------------------------------------------


@dataclass
class Sprite:
    """One object on screen from segment `first` to `last` (inclusive)."""

    shape: str
    colour: str
    first: int
    last: int
    where: Callable[[float], tuple[float, float]]
    """Centre (x, y) in pixels as a function of time in [0, 1] over the whole video."""
    size: int = 12

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def _still(x: float, y: float) -> Callable[[float], tuple[float, float]]:
    return lambda u: (x, y)


def _draw(frame: np.ndarray, sprite: Sprite, u: float) -> None:
    """Draw `sprite` at time fraction `u` into `frame` [H, W, 3] uint8 (in place)."""
    cx, cy = sprite.where(u)
    r = sprite.size / 2
    dx, dy = _XX - cx, _YY - cy  # [H, W] each
    if sprite.shape == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif sprite.shape == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif sprite.shape == "triangle":  # apex up: narrower towards the top
        mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    else:  # "dot"
        mask = dx * dx + dy * dy <= (r / 2) ** 2
    frame[mask] = COLOURS.get(sprite.colour, (255, 255, 255))


def render(sprites: list[Sprite], n_frames: int) -> Iterator[np.ndarray]:
    """Frames [SIZE, SIZE, 3] uint8 of the scene; segment boundaries fall on whole frames."""
    bounds = [round(k * n_frames / SEGMENTS) for k in range(SEGMENTS + 1)]
    for i in range(n_frames):
        seg = int(np.searchsorted(bounds, i, side="right")) - 1
        frame = np.full((SIZE, SIZE, 3), BACKGROUND, np.uint8)
        for s in sprites:
            if s.first <= seg <= s.last:
                _draw(frame, s, i / max(1, n_frames - 1))
        yield frame


# ----------------------------------------------------------------------------------------
# Question kinds: each returns (sprites, question, options, answer_index, reasoning)
# ----------------------------------------------------------------------------------------


def _objects(rng: np.random.Generator, k: int) -> list[tuple[str, str]]:
    """k (shape, colour) pairs with distinct colours."""
    colours = rng.permutation(list(COLOURS))[:k]
    return [(str(rng.choice(SHAPES)), str(c)) for c in colours]


def _at(seg: int, duration_s: float) -> str:
    return f"{seg * duration_s / SEGMENTS:.0f}s"


def make_temporal(rng, duration_s):
    objs = _objects(rng, 4)
    segs = sorted(rng.choice(np.arange(0, SEGMENTS, 2), size=4, replace=False).tolist())  # order of appearance
    sprites = [
        Sprite(shape, colour, s, s + 1, _still(*rng.uniform(18, 46, size=2)))
        for (shape, colour), s in zip(objs, segs)
    ]
    last = bool(rng.integers(2))
    question = f"Which object appeared {'last' if last else 'first'} in the video?"
    target = sprites[-1] if last else sprites[0]
    options = [s.name for s in sprites]
    seen = ", then ".join(f"the {s.name} at {_at(s.first, duration_s)}" for s in sprites)
    think = f"I see {seen}. So the {'last' if last else 'first'} one is the {target.name}."
    return sprites, question, options, options.index(target.name), think


def make_counting(rng, duration_s):
    (t_shape, t_colour), (d_shape, d_colour) = _objects(rng, 2)
    # Letter first, then a count it allows: the options are four ascending numbers from
    # count - letter (possibly 0), so every letter is equally likely to be right.
    letter = int(rng.integers(4))
    count = int(rng.integers(max(1, letter), 6))
    # Target appearances in even segments and distractors in odd ones, so no two
    # appearances of the target touch and each is seen as a separate event.
    target_segs = sorted(rng.choice(np.arange(0, SEGMENTS, 2), size=count, replace=False).tolist())
    free = [s for s in range(1, SEGMENTS, 2)]
    distractor_segs = rng.choice(free, size=int(rng.integers(1, 4)), replace=False).tolist()
    pos = rng.uniform(20, 44, size=2)
    sprites = [Sprite(t_shape, t_colour, s, s, _still(*pos)) for s in target_segs]
    sprites += [Sprite(d_shape, d_colour, s, s, _still(*rng.uniform(18, 46, size=2))) for s in distractor_segs]
    name = f"{t_colour} {t_shape}"
    question = f"How many times did the {name} appear?"
    options = [str(n) for n in range(count - letter, count - letter + 4)]
    times = ", ".join(_at(s, duration_s) for s in target_segs)
    think = f"The {name} appears at {times}. That is {count} time{'s' if count > 1 else ''}."
    return sprites, question, options, options.index(str(count)), think


def make_spatial(rng, duration_s):
    places = [str(p) for p in rng.permutation(list(PLACES))]
    start = int(rng.integers(0, SEGMENTS - 2))
    sprites = [Sprite("square", "red", start, start + 2, _still(*PLACES[places[0]]))]
    # Distractors at the other places, some overlapping in time with the red square.
    for (shape, colour), place in zip(_objects_without(rng, "red", 2), places[1:3]):
        s = int(rng.integers(0, SEGMENTS - 2))
        sprites.append(Sprite(shape, colour, s, s + 2, _still(*PLACES[place])))
    options = ["left", "right", "top", "bottom"]
    question = "Where in the frame did the red square appear?"
    think = f"The red square shows up at {_at(start, duration_s)} on the {places[0]} side of the frame."
    return sprites, question, options, options.index(places[0]), think


def _objects_without(rng, colour: str, k: int) -> list[tuple[str, str]]:
    colours = [c for c in rng.permutation(list(COLOURS)) if c != colour][:k]
    return [(str(rng.choice(SHAPES)), str(c)) for c in colours]


CORNERS = ((10, 10), (54, 10), (10, 54), (54, 54))


def make_goal(rng, duration_s):
    colours = [str(c) for c in rng.permutation(list(COLOURS))[:4]]
    goal, decoy = (int(i) for i in rng.choice(4, size=2, replace=False))
    centre = np.array([32.0, 32.0])
    turn = centre + 0.45 * (np.array(CORNERS[decoy]) - centre)  # drifts toward the decoy first
    end = turn + 0.75 * (np.array(CORNERS[goal]) - turn)  # then most of the way to the goal

    def path(u: float) -> tuple[float, float]:
        p = centre + (turn - centre) * (u / 0.5) if u < 0.5 else turn + (end - turn) * ((u - 0.5) / 0.5)
        return float(p[0]), float(p[1])

    sprites = [Sprite("square", c, 0, SEGMENTS - 1, _still(*xy), size=8) for c, xy in zip(colours, CORNERS)]
    sprites.append(Sprite("dot", "white", 0, SEGMENTS - 1, path, size=10))
    question = "The white dot moves during the video. Which box is it heading to at the end?"
    options = [f"the {c} box" for c in colours]
    think = (
        f"The white dot first drifts toward the {colours[decoy]} box, then around "
        f"{duration_s / 2:.0f}s turns and moves toward the {colours[goal]} box."
    )
    return sprites, question, options, goal, think


PALETTE = ("red", "green", "blue", "yellow")


def make_colour(rng, duration_s):
    """Perception warm-up (not a LongVideo-Reason kind): one shape, what colour was it?
    The options are always the palette in the same order, so the answer letter is a
    function of the pixels alone; a tiny model learns it in minutes (`examples/video_grpo.yaml`)."""
    colour, shape = PALETTE[int(rng.integers(len(PALETTE)))], str(rng.choice(SHAPES))
    first = int(rng.integers(0, SEGMENTS // 2 + 1))
    sprites = [Sprite(shape, colour, first, first + SEGMENTS // 2 - 1, _still(*rng.uniform(26, 38, size=2)), size=40)]
    question = f"What colour was the {shape}?"
    think = f"It is {colour}."
    return sprites, question, list(PALETTE), PALETTE.index(colour), think


MAKERS = {"temporal": make_temporal, "counting": make_counting, "spatial": make_spatial, "goal": make_goal,
          "colour": make_colour}
"""The four LongVideo-Reason-style kinds (`KINDS`, the default) plus the easy `colour` kind."""


# ----------------------------------------------------------------------------------------
# Items and the command
# ----------------------------------------------------------------------------------------


CONFUSED = {"blue": "green", "yellow": "red"}
"""The imperfect teacher of the `colour` kind (`slip`) names these colours wrongly."""


def make_item(seed: int, i: int, min_s: float, max_s: float, fps: int, kinds=KINDS,
              slip: float = 0.0) -> tuple[dict, list[Sprite], int]:
    """Item `i`: its JSONL record (media path not yet set), scene and frame count.

    `slip`: with this probability a `colour` item's demonstration (not its answer) comes from
    a teacher that takes blue for green and yellow for red, so SFT converges to a policy
    that is wrong on those colours and RL has something to fix whatever the SFT length."""
    rng = np.random.default_rng([seed, i])
    kind = kinds[i % len(kinds)]
    duration_s = float(np.exp(rng.uniform(math.log(min_s), math.log(max_s))))
    # Short videos get a higher frame rate so every segment has at least one frame.
    video_fps = max(fps, math.ceil(SEGMENTS / duration_s))
    n_frames = max(SEGMENTS, round(duration_s * video_fps))
    sprites, question, options, answer_idx, think = MAKERS[kind](rng, n_frames / video_fps)
    # Options naming objects are shuffled; numbers and places keep their natural order
    # (ascending; left, right, top, bottom), as real multiple-choice sets list them.
    order = list(range(len(options))) if kind in NATURAL_ORDER else rng.permutation(len(options)).tolist()
    options = [options[j] for j in order]
    letter = LETTERS[order.index(answer_idx)]
    prompt = question + "\n" + "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(options))
    prompt += "\nAnswer with the option's letter."
    record = {
        "id": f"vid-{i:06d}",
        "prompt": prompt,
        "answer": letter,
        "solution": f"<think>{think}</think><answer>{letter}</answer>",
        "kind": kind,
        "duration_s": round(n_frames / video_fps, 3),
        "options": options,
        "fps": video_fps,
    }
    wrong = CONFUSED.get(options[order.index(answer_idx)]) if kind == "colour" else None
    if wrong and np.random.default_rng([seed, i, 1]).random() < slip:  # own stream: the scene is unchanged
        record["solution"] = f"<think>It is {wrong}.</think><answer>{LETTERS[options.index(wrong)]}</answer>"
    return record, sprites, n_frames


GENERATOR = "longrl data videos"
"""The `generator` field of the summary.json written into every generated directory: the
mark that lets a later run replace the directory."""


def generate(out: str | Path, n: int, seed: int = 0, min_s: float = 8.0, max_s: float = 180.0,
             fps: int = 2, eval_frac: float = 0.2, kinds=KINDS, slip: float = 0.0, overwrite: bool = False,
             made_by: str = GENERATOR) -> dict:
    """Write `n` videos and their questions to `out` (replaced atomically). -> summary

    An existing non-empty `out` is replaced only when this generator made it (its
    summary.json names GENERATOR) or `overwrite` is set: `--out ~/data` must not delete
    someone's directory. summary.json also records the settings the videos were made with
    and `made_by` (this command, or a training run that generated its data), so a later run
    can tell whether the directory still matches its config (`data/video_task.py`)."""
    from longrl.media.encode import write_video

    _check(n, min_s, max_s, fps, eval_frac, kinds)
    _refuse_foreign(Path(out), overwrite)
    if not 0 <= slip <= 1:
        raise UserError(f"--slip {slip}: use a probability in [0, 1]")
    n_eval = round(n * eval_frac) if n > 1 else 0
    split = {"train": [], "eval": []}
    with atomic_dir(out) as tmp:
        (tmp / "videos").mkdir()
        for i in range(n):
            record, sprites, n_frames = make_item(seed, i, min_s, max_s, fps, kinds, slip)
            rel = f"videos/{record['id']}.mp4"
            write_video(tmp / rel, render(sprites, n_frames), fps=record["fps"], gop=4 * record["fps"])
            record["media"] = [rel]
            split["eval" if i >= n - n_eval else "train"].append(record)
        for name, records in split.items():
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = {
            "n": n, "seed": seed, "train": len(split["train"]), "eval": len(split["eval"]),
            "kinds": {k: sum(r["kind"] == k for r in split["train"] + split["eval"]) for k in kinds},
            "total_duration_s": round(sum(r["duration_s"] for r in split["train"] + split["eval"]), 1),
            "settings": {"seed": seed, "min_seconds": float(min_s), "max_seconds": float(max_s), "fps": int(fps),
                         "kinds": list(kinds), "slip": float(slip)},
        }
        (tmp / "summary.json").write_text(json.dumps({**summary, "generator": GENERATOR, "made_by": made_by},
                                                     indent=2) + "\n")
    return summary


def _refuse_foreign(out: Path, overwrite: bool) -> None:
    if overwrite or not out.exists() or _made_here(out):
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if any(out.iterdir()):
        raise UserError(f"--out {out} is a non-empty directory that `longrl data videos` did not make; give a new "
                        f"or empty directory, or add --overwrite to replace it and everything in it")


def _made_here(out: Path) -> bool:
    try:
        return json.loads((out / "summary.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _check(n, min_s, max_s, fps, eval_frac, kinds) -> None:
    if n < 1:
        raise UserError(f"--n {n}: need at least one video")
    if not 0 < min_s <= max_s:
        raise UserError(f"--min-seconds {min_s} / --max-seconds {max_s}: need 0 < min <= max")
    if max_s > 3 * 3600:
        raise UserError(f"--max-seconds {max_s}: at most 3 hours per synthetic video")
    if not 1 <= fps <= 30:
        raise UserError(f"--fps {fps}: use 1 to 30 frames per second")
    if not 0 <= eval_frac < 1:
        raise UserError(f"--eval-frac {eval_frac}: use a fraction in [0, 1)")
    bad = [k for k in kinds if k not in MAKERS]
    if bad or not kinds:
        raise UserError(f"--kinds {','.join(kinds)}: choose from {','.join(MAKERS)}")


def main(args: list[str]) -> int:
    """`longrl data videos`: parse `args`, generate, print the summary. -> exit status"""
    p = argparse.ArgumentParser(prog="longrl data videos", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (one this generator made is replaced)")
    p.add_argument("--overwrite", action="store_true", help="also replace a non-empty --out it did not make")
    p.add_argument("--n", type=int, default=100, help="number of videos / questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-seconds", type=float, default=8.0, help="shortest video")
    p.add_argument("--max-seconds", type=float, default=180.0, help="longest video (log-uniform in between)")
    p.add_argument("--fps", type=int, default=2, help="frame rate of the written videos")
    p.add_argument("--eval-frac", type=float, default=0.2, help="fraction of items in eval.jsonl")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(MAKERS))
    p.add_argument("--slip", type=float, default=0.0,
                   help="colour kind: fraction of blue/yellow demonstrations that name green/red instead")
    a = p.parse_args(args)
    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    summary = generate(a.out, a.n, a.seed, a.min_seconds, a.max_seconds, a.fps, a.eval_frac, kinds, a.slip,
                       overwrite=a.overwrite)
    print(json.dumps({"out": str(a.out), **summary}))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
