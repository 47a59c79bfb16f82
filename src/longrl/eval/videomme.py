"""Video question answering in the Video-MME format: accuracy overall and by category.

Video-MME (arXiv 2405.21075) is the long-video benchmark "Scaling RL to Long Videos"
(arXiv 2507.07966) reports: 900 videos, 2,700 four-option questions, split by video length
(`duration`: short < 2 min, medium 4-15 min, long 30-60 min), `domain`, `sub_category` and
`task_type`. This module reads its annotation file (JSON list, JSONL, or the parquet the
benchmark is distributed as, one question per record, fields as released; parquet needs the
`videomme` extra, pyarrow) plus a folder of local videos, asks a `predict` callable each
question, and writes per-question results and a breakdown.

Records without `options` are open-ended questions (the spirit of VideoEval-Pro,
arXiv 2505.14640): the reference is a short text answer, scored by normalised string or
number match.

`predict(frames, timestamps, question_text) -> response` receives the sampled frames
([N, H, W, 3] uint8), their times in seconds and the full question text (question,
options and answer instruction). A video's frames are decoded once for all its questions.

Departures from the official Video-MME evaluation:
- Subtitles are not used (the "w/o subs" setting).
- A question whose video is missing or unreadable is never dropped silently: it is listed
  in the results with its status, counted, and `accuracy_all` scores it as wrong;
  `accuracy` is over the questions that were actually asked.
- The answer letter is read with `rewards.answer.extract_choice_letter`, which refuses
  hedged answers ("A or B"); the official script takes the first capital letter.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from longrl.errors import UserError
from longrl.media.frames import FrameSampling, load_clip
from longrl.rewards.answer import extract_answer, extract_choice_letter
from longrl.rewards.verifiers import normalized_match
from longrl.utils import atomic_write_json, atomic_write_text

Predict = Callable[[np.ndarray, np.ndarray, str], str]
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
BREAKDOWNS = ("duration", "domain", "sub_category", "task_type")
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question with a short phrase."
_OPTION = re.compile(r"^\s*\(?([A-Z])[.)]\s*")
PARQUET_MAGIC = b"PAR1"
"""A parquet file's first four bytes: the format is read from the content, not the name."""
log = logging.getLogger(__name__)


@dataclass
class VideoQuestion:
    """One annotation record."""

    question_id: str
    video_id: str
    question: str
    answer: str
    options: list[str] = field(default_factory=list)
    """"A. ..." strings; empty for an open-ended question."""
    video_names: list[str] = field(default_factory=list)
    """File stems to look for, in order (Video-MME's `videoID`, then `video_id`)."""
    duration: str = "unknown"
    domain: str = "unknown"
    sub_category: str = "unknown"
    task_type: str = "unknown"

    @property
    def letters(self) -> str:
        return "".join(_OPTION.match(o).group(1) for o in self.options)


# ----------------------------------------------------------------------------------------
# Reading the annotation file
# ----------------------------------------------------------------------------------------


def load_annotations(path: str | Path) -> list[VideoQuestion]:
    """Read a JSON list, JSONL or parquet of Video-MME records; `UserError` names any bad record."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotation file not found: {path} (give a Video-MME JSON, JSONL or parquet file)")
    with path.open("rb") as f:
        parquet = f.read(4) == PARQUET_MAGIC
    records, where = (_read_parquet(path), "row") if parquet else _read_json(path)
    items: list[VideoQuestion] = []
    for n, rec in records:
        for q in _flatten(rec):
            items.append(_parse(q, f"{path} {where} {n}"))
    if not items:
        raise UserError(f"{path}: no questions found")
    seen: set[str] = set()
    for it in items:
        if it.question_id in seen:
            raise UserError(f"{path}: question_id {it.question_id!r} appears twice; ids must be unique")
        seen.add(it.question_id)
    return items


def _read_json(path: Path) -> tuple[list[tuple[int, object]], str]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); give the annotations as UTF-8 JSON or parquet") from None
    try:
        if text.lstrip().startswith("["):
            return list(enumerate(json.loads(text), start=1)), "record"
        return [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), start=1) if line.strip()], "line"
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON/JSONL ({e.msg}, line {e.lineno}); export the annotations as JSON") from None


def _read_parquet(path: Path) -> list[tuple[int, object]]:
    """Rows of a parquet table as plain dicts (list columns such as `options` as lists)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path} is parquet, which needs pyarrow: pip install -e \".[videomme]\" (or export it as JSON)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable parquet file ({(str(e).splitlines() or ['?'])[0]}); copy it again") from None
    return list(enumerate(rows, start=1))


def _flatten(rec) -> Iterable[dict]:
    """The early Video-MME JSON nests questions under each video; flatten it."""
    if isinstance(rec, dict) and isinstance(rec.get("questions"), list):
        video = {k: v for k, v in rec.items() if k != "questions"}
        video.setdefault("duration", video.get("duration_category", "unknown"))
        video.setdefault("domain", video.get("video_category", "unknown"))
        for q in rec["questions"]:
            yield {**video, **q}
    else:
        yield rec


def _parse(rec, where: str) -> VideoQuestion:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected an object with video_id, question, answer")
    missing = [k for k in ("video_id", "question", "answer") if rec.get(k) in (None, "")]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    options = rec.get("options", rec.get("choices")) or []
    if not isinstance(options, list) or not all(isinstance(o, str) and _OPTION.match(o) for o in options):
        raise UserError(f'{where}: "options" must be a list of strings like "A. text"')
    vid = str(rec["video_id"])
    names = [str(rec["videoID"])] if rec.get("videoID") else []
    q = VideoQuestion(
        question_id=str(rec.get("question_id", f"{vid}-{rec['question'][:20]}")),
        video_id=vid,
        question=str(rec["question"]),
        answer=str(rec["answer"]).strip(),
        options=list(options),
        video_names=names + [vid],
        **{k: str(rec.get(k) or "unknown") for k in BREAKDOWNS},
    )
    if options and q.answer not in q.letters:
        raise UserError(f"{where}: answer {q.answer!r} is not one of the option letters {q.letters}")
    return q


def question_text(q: VideoQuestion) -> str:
    """What the model is asked: the question, the options one per line, the instruction."""
    if q.options:
        return "\n".join([q.question, *q.options, MCQ_INSTRUCTION])
    return f"{q.question}\n{OPEN_INSTRUCTION}"


def find_video(videos_dir: Path, q: VideoQuestion) -> Path | None:
    for name in q.video_names:
        for ext in VIDEO_EXTS:
            if (videos_dir / f"{name}{ext}").is_file():
                return videos_dir / f"{name}{ext}"
    return None


# ----------------------------------------------------------------------------------------
# Asking and scoring
# ----------------------------------------------------------------------------------------


def score(q: VideoQuestion, response: str) -> tuple[str | None, bool]:
    """(what the response answered, whether it is right)."""
    if q.options:
        letter = extract_choice_letter(response, q.letters)
        return letter, letter == q.answer
    said = extract_answer(response)
    said = response.strip() if said is None else said
    return said, normalized_match(said, q.answer) == 1.0


def evaluate(
    questions: list[VideoQuestion],
    videos_dir: str | Path,
    predict: Predict,
    sampling: FrameSampling = FrameSampling(fps=None, max_frames=32),
    out_dir: str | Path | None = None,
) -> dict:
    """Ask every question; return the report (and write it plus per-question JSONL to `out_dir`)."""
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise UserError(f"video folder not found: {videos_dir}")
    by_video: dict[str, list[VideoQuestion]] = defaultdict(list)
    for q in questions:
        by_video[q.video_id].append(q)
    rows: list[dict] = []
    problems: dict[str, dict] = {}
    for video_id, qs in by_video.items():
        path = find_video(videos_dir, qs[0])
        clip, status = None, "ok"
        if path is None:
            status = "missing_video"
            problems[video_id] = {"status": status, "looked_for": [f"{n}.*" for n in qs[0].video_names]}
        else:
            try:
                clip = load_clip(path, sampling)
            except UserError as e:
                status = "unreadable_video"
                problems[video_id] = {"status": status, "error": str(e)}
        frames = clip.frames.numpy() if clip is not None else None  # one array per video: predictors may memoise on it
        for q in qs:
            row = {**asdict(q), "status": status, "response": None, "predicted": None, "correct": False}
            del row["video_names"]
            if clip is not None:
                row["response"] = predict(frames, clip.timestamps, question_text(q))
                row["predicted"], row["correct"] = score(q, row["response"])
            rows.append(row)
    report = summarize(rows, problems)
    if problems:
        log.warning(
            "%d of %d questions not asked: %d videos missing, %d unreadable (listed in the report)",
            report["n_not_asked"], len(rows), len(report["missing_videos"]), len(report["unreadable_videos"]),
        )
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / "videomme_results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_json(out_dir / "videomme_summary.json", report)
    return report


def summarize(rows: list[dict], problems: dict[str, dict]) -> dict:
    """Accuracy overall and per breakdown value, over asked questions; counts of the rest."""
    asked = [r for r in rows if r["status"] == "ok"]
    report = {
        "n_questions": len(rows),
        "n_asked": len(asked),
        "n_not_asked": len(rows) - len(asked),
        "accuracy": _acc(asked),
        "accuracy_all": sum(r["correct"] for r in rows) / len(rows) if rows else None,
        "missing_videos": sorted(v for v, p in problems.items() if p["status"] == "missing_video"),
        "unreadable_videos": sorted(v for v, p in problems.items() if p["status"] == "unreadable_video"),
        "video_problems": problems,
    }
    for key in BREAKDOWNS:
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in asked:
            groups[r[key]].append(r)
        report[f"by_{key}"] = {k: {"n": len(g), "correct": sum(r["correct"] for r in g), "accuracy": _acc(g)}
                               for k, g in sorted(groups.items())}
    return report


def _acc(rows: list[dict]) -> float | None:
    return sum(r["correct"] for r in rows) / len(rows) if rows else None


# ----------------------------------------------------------------------------------------
# `longrl eval --videomme`
# ----------------------------------------------------------------------------------------

TINY_MODEL = "tiny"
"""`model=tiny`: the untrained tiny VLM, asked for by name (a smoke test of the pipeline; its
answers are chance), so that a forgotten `model=` is an error, not a random model's score."""
OPTIONS = {"model.path": ("model_path", str), "eval.max_new_tokens": ("max_new_tokens", int),
           "video.fps": ("fps", float), "video.max_pixels": ("max_pixels", int)}
"""The keys `--videomme` takes -> (run_videomme argument, type); `model` means model.path."""
NEEDS_MODEL = ("longrl eval --videomme needs model=PATH (a local Qwen2.5-VL directory, or a hub id in the local "
               "Hugging Face cache), or model=tiny for the untrained tiny VLM (a smoke test: its answers are chance)")


def videomme_options(overrides: list[str]) -> dict:
    """`key=value` items of `longrl eval --videomme` -> run_videomme keyword arguments. A key
    it does not use is refused, as the task eval refuses unknown keys (a missing model= is
    refused by run_videomme, after the files are checked)."""
    import difflib

    kwargs = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = "model.path" if key.strip() == "model" else key.strip()
        if not sep:
            raise UserError(f"'{item}' is not key=value; longrl eval --videomme takes model=PATH and {', '.join(list(OPTIONS)[1:])}")
        if key not in OPTIONS:
            near = difflib.get_close_matches(key, list(OPTIONS), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise UserError(f"unknown key '{key}' for longrl eval --videomme{hint}; it takes model=PATH, "
                            f"{', '.join(list(OPTIONS)[1:])} and --max-frames N")
        name, kind = OPTIONS[key]
        try:
            kwargs[name] = kind(value.strip())
        except ValueError:
            raise UserError(f"{key}={value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kwargs.get("fps") == 0:  # video.fps=0 means "spread max_frames", as in training
        kwargs["fps"] = None
    return kwargs


def run_videomme(annotations: str | Path, videos_dir: str | Path, model_path: str = "",
                 out_dir: str | Path | None = None, max_frames: int = 32, fps: float | None = None,
                 max_pixels: int = 64 * 28 * 28, max_new_tokens: int = 64) -> dict:
    """`longrl eval --videomme ANNOT --videos DIR model=...`: a Qwen2.5-VL (a local directory,
    a cached hub id, or `TINY_MODEL` for the untrained tiny one) answers every question
    greedily; an empty `model_path` is a UserError. -> {"model": ..., **report}"""
    import torch

    from longrl.models.vlm import load_vlm, vlm_predictor

    # Everything a user can get wrong is refused before the model loads and the videos decode.
    if max_new_tokens < 1:
        raise UserError(f"eval.max_new_tokens={max_new_tokens}: generate at least 1 token per answer")
    if max_pixels < 1:
        raise UserError(f"video.max_pixels={max_pixels} must be positive")
    if max_frames < 1:
        raise UserError(f"--max-frames {max_frames}: sample at least 1 frame per video")
    if fps is not None and not fps > 0:
        raise UserError(f"fps={fps} must be positive (or None: max_frames spread over the video)")
    if not Path(videos_dir).is_dir():
        raise UserError(f"video folder not found: {videos_dir} (give --videos DIR holding <video_id>.mp4 files)")
    questions = load_annotations(annotations)
    if not model_path:
        raise UserError(NEEDS_MODEL)
    model, tokenizer = load_vlm("" if model_path == TINY_MODEL else model_path)
    model.eval()
    with torch.no_grad():
        report = evaluate(questions, videos_dir, vlm_predictor(model, tokenizer, max_new_tokens),
                          FrameSampling(fps=fps, max_frames=max_frames, max_pixels=max_pixels), out_dir)
    return {"model": model_path, **report}
