"""`video_frames(start, end)`: look again at seconds start-end of the episode's video, at a
higher frame rate than the prompt's uniform sampling.

The long-video agents of the issue's seeds (VideoChat-A1's chain-of-shot, agentic video
analytics) ask for more frames of a segment instead of reading every frame up front. Here
the call decodes that segment (`media.segments`: at `tools.video_fps`, at most
`tools.video_max_frames` frames, at the task's frame size) and answers with a short caption
and a video mark whose pad tokens stand for the segment:

    <call>video_frames: 3, 5</call>
    <result>frames 3-5 s: <|vision_start|><|video_pad|> x Nv <|vision_end|></result>

The tool itself never runs the vision tower (it runs in a worker thread under a timeout):
the policy encodes the segment once per step, through the same embedding cache as whole
videos (MR-SP: the next turn's rollout, the old/reference passes and the update reuse it),
when the episode's next turn is requested (`policy.video.VideoPrompt.continued`).

Arguments: two numbers, start and end seconds ("3, 5", "3-5", "3 to 5", or JSON
{"start": 3, "end": 5} from a Hermes call). Anything else, a reversed range, or a range
outside the video is an error result (counted in agent/tool_errors), never a crash.
"""

from __future__ import annotations

import functools
import json
import math
import re

from longrl.media.frames import FrameSampling
from longrl.tools.output import ToolOutput

USAGE = "video_frames takes start and end seconds, e.g. 'video_frames: 3, 5'"
# A number; a minus sign only at the start or after a comma ("3-5" is a range, "-1, 2" a negative start).
_NUMBER = re.compile(r"(?:^|(?<=,)|(?<=, ))-\d+(?:\.\d+)?|\d+(?:\.\d+)?")


class VideoFramesTool:
    name = "video_frames"
    description = "video_frames(start, end): frames of seconds start-end of the video, at a higher frame rate"

    def __init__(self, sampling: FrameSampling):
        from longrl.models.vlm import VIDEO_PAD

        self.sampling = sampling
        self.media_token = VIDEO_PAD  # the token whose run stands for a segment (`rollout.episodes.Observation`)

    def with_media(self, media: list[str]) -> "_OnVideo":
        """The tool for one episode: segments of its video (`media[0]`)."""
        return _OnVideo(self, media[0])

    def call(self, args: str, path: str) -> ToolOutput:
        from longrl.media.segments import Segment, decode_segment

        start, end = parse_range(args)
        duration = _duration(path)
        if start >= duration or end > duration + 0.5:  # half a second of slack for a rounded end
            raise ValueError(f"{start:g}-{end:g} s is outside the video (0-{duration:.1f} s)")
        seg = Segment.of(path, start, min(end, duration), self.sampling)
        if seg.end <= seg.start:
            raise ValueError(f"{start:g}-{end:g} s is shorter than a tenth of a second")
        clip = decode_segment(seg.spec())
        mark = _video_mark(video_tokens(tuple(clip.frames.shape)))
        return ToolOutput(f"frames {seg.start:g}-{seg.end:g} s: {mark}", media=(seg.spec(),))


class _OnVideo:
    """`VideoFramesTool` bound to one episode's video: the plain `Tool` that `call_tool` runs."""

    def __init__(self, tool: VideoFramesTool, path: str):
        self.tool, self.path = tool, path
        self.name, self.description = tool.name, tool.description

    def __call__(self, args: str) -> ToolOutput:
        return self.tool.call(args, self.path)


def parse_range(args: str) -> tuple[float, float]:
    """(start, end) seconds from the call's arguments; ValueError naming the problem."""
    text = args.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(USAGE) from None
        if not isinstance(d, dict) or not {"start", "end"} <= set(d):
            raise ValueError(USAGE)
        values = [d["start"], d["end"]]
    else:
        values = _NUMBER.findall(text)
        if len(values) != 2:
            raise ValueError(USAGE)
    try:
        start, end = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(USAGE) from None
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0:
        raise ValueError(f"start={start:g} and end={end:g} must be seconds >= 0")
    if end <= start:
        raise ValueError(f"end={end:g} must come after start={start:g}")
    return start, end


def video_tokens(frames_shape: tuple[int, ...]) -> int:
    """Video tokens of frames [N, H, W, 3] in Qwen2.5-VL: temporal pairs x merged patches."""
    from longrl.models.vlm import MERGE, PATCH, TEMPORAL_PATCH

    N, H, W, _ = frames_shape
    return -(-N // TEMPORAL_PATCH) * (H // PATCH) * (W // PATCH) // (MERGE * MERGE)


def _video_mark(n_tokens: int) -> str:
    from longrl.models.vlm import VIDEO_PAD, VISION_END, VISION_START

    return VISION_START + VIDEO_PAD * n_tokens + VISION_END


@functools.lru_cache(maxsize=256)
def _duration(path: str) -> float:
    from longrl.media.decode import probe

    return probe(path).duration_s
