"""What a tool call comes back as (`tools.call_tool`); its own module so that a tool that
returns one (`tools/video_frames.py`) need not import the package that loads it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ToolOutput:
    text: str
    """What the model is shown (a result, or an error message)."""
    error: bool = False
    truncated: bool = False
    media: tuple[str, ...] = ()
    """Media the result adds to the conversation (e.g. `media.segments` specs), in order."""
