"""Examples from a JSONL file: one JSON object per line.

Each non-blank line is an object with

    "prompt"   (string, required)         the question shown to the model
    "answer"   (string or number, required) the reference answer; numbers become strings
    "id"       (string or number)         unique per file; default "<file name>:<line>"
    "solution" (string)                   a demonstration response for CoT-SFT
    "media"    (string or list of strings) local video/image paths; relative paths are
                                          resolved against the JSONL file's directory
    anything else                         kept in `Example.meta`

Any problem raises `UserError` naming the file, the 1-based line and the fix. Lines are
read one at a time with a size cap (`MAX_LINE_BYTES`), so a runaway line is refused before
it is held in memory or reaches the tokenizer (a 200 MB line used to abort the process).
"""

from __future__ import annotations

import json
from pathlib import Path

from longrl.data.example import Example
from longrl.errors import UserError

_RESERVED = ("prompt", "answer", "id", "solution", "media")
_SHAPE = '{"prompt": "...", "answer": "..."}'
MAX_LINE_BYTES = 4 << 20
"""Longest line read (4 MiB): about a million tokens of text, past every context window a
model here has; a prompt that long could only be truncated, and tokenising it takes seconds."""


def load_jsonl_examples(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> list[Example]:
    """Read every example of `path`; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"{path}: {what}; give the path of a JSONL file with one {_SHAPE} object per line")
    examples: list[Example] = []
    first_line_of: dict[str, int] = {}
    with path.open("rb") as f:
        # + 2: room for the line's own "\r\n", so a line at the cap is read whole, never split
        for lineno, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 2), b""), start=1):
            if len(raw.rstrip(b"\r\n")) > max_line_bytes:
                limit = f"{max_line_bytes >> 20} MiB" if max_line_bytes >= 1 << 20 else f"{max_line_bytes} bytes"
                raise UserError(f"{path}:{lineno}: line longer than {limit}; "
                                "split or shorten it (media go in \"media\" as file paths, not inline)")
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            ex = _parse_line(line, path, lineno)
            if ex.id in first_line_of:
                raise UserError(
                    f"{path}:{lineno}: id {ex.id!r} already used on line {first_line_of[ex.id]}; "
                    "give every example a unique \"id\" (or drop the field to number lines)"
                )
            first_line_of[ex.id] = lineno
            examples.append(ex)
    if not examples:
        raise UserError(f"{path}: no examples (the file is empty or blank); add one {_SHAPE} object per line")
    return examples


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None


def _parse_line(line: str, path: Path, lineno: int) -> Example:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one object like {_SHAPE}"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object like {_SHAPE}, got {type(obj).__name__}")

    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problem = "missing" if prompt is None else "not a non-empty string"
        raise UserError(f'{where}: "prompt" is {problem}; every line needs "prompt": "<question text>"')

    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        problem = "missing" if answer is None else f"a {type(answer).__name__}"
        raise UserError(f'{where}: "answer" is {problem}; every line needs "answer": "<reference>" (a string or number)')

    ex_id = obj.get("id", f"{path.name}:{lineno}")
    if isinstance(ex_id, bool) or not isinstance(ex_id, (str, int)):
        raise UserError(f'{where}: "id" must be a string or integer, got {type(ex_id).__name__}')

    solution = obj.get("solution", "")
    if not isinstance(solution, str):
        raise UserError(f'{where}: "solution" must be a string (a demonstration response), got {type(solution).__name__}')

    return Example(
        id=str(ex_id),
        prompt=prompt,
        answer=str(answer),
        solution=solution,
        media=_media_paths(obj.get("media", []), path, where),
        meta={k: v for k, v in obj.items() if k not in _RESERVED},
    )


def _media_paths(media: object, path: Path, where: str) -> list[str]:
    items = [media] if isinstance(media, str) else media
    if not isinstance(items, list) or not all(isinstance(m, str) and m for m in items):
        raise UserError(f'{where}: "media" must be a path or a list of paths (strings)')
    resolved = []
    for m in items:
        p = Path(m).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.exists():
            raise UserError(f'{where}: media file {m!r} not found (looked at {p}); fix the path or drop "media"')
        resolved.append(str(p))
    return resolved
