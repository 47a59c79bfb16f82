"""Agent tools behind one interface, and the one function that calls them safely.

A tool is any object with a `name`, a one-line `description` (shown to the model in the
system prompt of a chat model) and `__call__(args: str) -> str`. The episode loop
(`rollout/episodes.py`) never calls a tool directly: it goes through `call_tool`, which turns
every way a tool can fail into a result the model sees and a counter the trainer logs:

- it raises            -> "error: <Type>: <message>"               (error)
- it hangs             -> "error: timed out after <t> s"           (error; the call is left
                          running in a daemon thread: Python cannot kill a thread, so a tool
                          that can hang for good should run its work in a subprocess, as
                          `tools.python` does)
- it returns 10 MB     -> the first `max_chars` characters + " ...[truncated]" (truncated)
- it returns a non-str -> "error: tool returned <type>, not text"  (error)

A tool may also return a `ToolOutput` with `media`: its text then holds one run of the
tool's `media_token` per medium (`video_frames`' video tokens) and is not cut to
`max_chars` (the tool bounds it itself). A tool that reads the episode's own media (its
video) has `with_media(media) -> Tool`, which the environment calls per episode.

Tools here: `search` (BM25 over a local JSONL corpus, `tools/search.py`), `python` (the
sandboxed runner of `rewards/sandbox.py`, `tools/python.py`) and `video_frames` (a segment of
the episode's video at a higher frame rate, `tools/video_frames.py`).
"""

from __future__ import annotations

import threading
from typing import Protocol

from longrl.tools.output import ToolOutput


class Tool(Protocol):
    name: str
    description: str

    def __call__(self, args: str) -> str: ...


TRUNCATION_MARK = " ...[truncated]"


def call_tool(tool: Tool, args: str, *, timeout_s: float, max_chars: int) -> ToolOutput:
    """`tool(args)` in a daemon thread, at most `timeout_s` seconds, its text capped."""
    box: dict = {}

    def work():
        try:
            box["out"] = tool(args)
        except BaseException as e:  # a tool's bug (or its SystemExit) must not end the run
            box["exc"] = e

    t = threading.Thread(target=work, name=f"longrl-tool-{tool.name}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        return ToolOutput(f"error: timed out after {timeout_s:g} s", error=True)
    if "exc" in box:
        e = box["exc"]
        return ToolOutput(f"error: {type(e).__name__}: {str(e)[:200]}", error=True)
    out = box.get("out")
    if isinstance(out, ToolOutput) and out.media:  # text + media marks, bounded by the tool itself
        return out
    if not isinstance(out, str):
        return ToolOutput(f"error: tool returned {type(out).__name__}, not text", error=True)
    if len(out) > max_chars:
        return ToolOutput(out[:max_chars] + TRUNCATION_MARK, truncated=True)
    return ToolOutput(out)


def make_tools(names: list[str], *, corpus=None, top_k: int = 1, python_timeout_s: float = 5.0,
               video_sampling=None) -> dict[str, Tool]:
    """The tools `tools.enabled` names: {name: tool}. `corpus`: the search tool's documents
    (a list of strings) or a JSONL path; `video_sampling`: the `media.frames.FrameSampling`
    of `video_frames`' segments (tools.video_fps, tools.video_max_frames, the task's pixels)."""
    from longrl.errors import UserError

    out: dict[str, Tool] = {}
    for name in names:
        if name == "search":
            from longrl.tools.search import BM25Search

            if corpus is None:
                raise UserError("tools.enabled has 'search' but there is no corpus: set tools.search_corpus to a JSONL "
                                "file of {\"text\": ...} documents (the built-in 'facts' task brings its own)")
            out[name] = BM25Search.from_jsonl(corpus, top_k) if isinstance(corpus, str) else BM25Search(corpus, top_k)
        elif name == "python":
            from longrl.tools.python import PythonTool

            out[name] = PythonTool(timeout_s=python_timeout_s)
        elif name == "video_frames":
            from longrl.tools.video_frames import VideoFramesTool

            if video_sampling is None:
                raise UserError("tools.enabled has 'video_frames' but the task has no videos (task.name=videos)")
            out[name] = VideoFramesTool(video_sampling)
        elif ":" in name:  # your own tool: "path/to/file.py:Class" or "package.module:Class"
            tool = load_object(name)()
            out[tool.name] = tool
        else:
            raise UserError(f"tools.enabled: unknown tool {name!r}; the tools are 'search', 'python', 'video_frames' "
                            "and your own as 'file.py:Class' or 'module:Class'")
    return out


def load_object(spec: str):
    """'file.py:Name' or 'package.module:Name' -> the object (a user's tool class). The file
    is the user's own code, imported like any module they name."""
    import importlib
    import importlib.util
    from pathlib import Path

    from longrl.errors import UserError

    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise UserError(f"tools.enabled: {where} is not a file")
            module_spec = importlib.util.spec_from_file_location(f"longrl_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        return getattr(module, attr)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  a user's module that fails to import: one line, the cause named
        raise UserError(f"tools.enabled: cannot load {spec!r} ({type(e).__name__}: {e})") from None
