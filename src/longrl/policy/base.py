"""The Policy interface: what the recipes need of a model, whatever its modality.

The recipes (`recipes/sft.py`, `grpo.py`, `dpo.py`) never ask whether a policy reads text
or video. A policy turns examples into prompt ids and rollout requests, and runs the
teacher-forced passes of a micro-batch whose row i answers `examples[i]`:

    encode_prompts(examples)                -> prompt token ids
    requests(examples, n, eval=False)       -> RolloutRequest per example (a video's request
                                               carries its cached embeddings)
    logprobs(batch, examples, model=None)   -> [B, T] log-probs, no grad (model: e.g. the
                                               frozen reference; default the policy's model)
    loss_and_backward(batch, examples, loss_fn) -> (loss, metrics, logprobs [B, T]);
                                               gradients accumulate in .grad
    (both at the policy's `temperature` unless given one: SFT's likelihood is at 1)
    start_step(version), step_metrics(), summary()   per-step bookkeeping (video: the
                                               step's encodes)

Implementations: `policy/text.py` (token-only causal LMs; Ulysses/All-Scan under sequence
parallelism, every `train.backprop` mode) and `policy/video.py` (Qwen2.5-VL on cached
video embeddings, MR-SP).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from longrl.data.example import Example
from longrl.rollout.base import RolloutRequest
from longrl.streambp.logprobs import LossFn, TokenBatch


class Policy(Protocol):
    model: torch.nn.Module
    tokenizer: object
    backprop: str
    """train.backprop: how loss_and_backward runs the layers."""
    chunk: int
    """train.stream_chunk: positions per chunk of the LM head (and of StreamBP)."""
    temperature: float
    """Temperature of the trainer's log-probs (`config.train_temperature`)."""

    def encode_prompts(self, examples: list[Example]) -> list[list[int]]: ...

    def requests(self, examples: list[Example], n: int | list[int] = 1, *, eval: bool = False) -> list[RolloutRequest]: ...

    def logprobs(self, batch: TokenBatch, examples: list[Example], model=None,
                 temperature: float | None = None) -> torch.Tensor: ...

    def loss_and_backward(self, batch: TokenBatch, examples: list[Example], loss_fn: LossFn,
                          temperature: float | None = None): ...

    def start_step(self, version: int | None = None) -> None: ...

    def step_metrics(self) -> dict: ...

    def summary(self) -> dict: ...


PolicyFactory = Callable[[torch.nn.Module, object], Policy]
"""(model, tokenizer) -> Policy; what `recipes/train.py` builds once the model is loaded."""
