"""The record every task produces and every recipe consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    """One prompt with its reference answer.

    `solution` is a demonstration response for CoT-SFT in the model's response format
    (`<think>...</think><answer>...</answer>`); empty means "build one from `answer`".
    `media` holds local paths (videos) the prompt refers to. `meta` carries what a task's
    own verifier needs (e.g. the reasoning-gym entry). `messages` is a chat-format prompt
    ({"role", "content"} dicts, `data/hf_datasets.py`), given to chat-template tokenizers in
    place of `prompt`, which then holds the messages' text for everything else.
    """

    id: str
    prompt: str
    answer: str
    solution: str = ""
    media: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)
