"""The text policy: a token-only causal LM (Qwen2/2.5/3, Llama, the tiny default, GLA).

The teacher-forced passes are `parallel/sp_train.py`'s, which are StreamBP's chunked
passes on one rank and Ulysses (softmax attention) or All-Scan (GLA) when
`parallel.sp_size` > 1. Rows are independent: `examples` is not needed to run a row.
"""

from __future__ import annotations

import torch

from longrl.data.example import Example
from longrl.eval.accuracy import encode_prompts
from longrl.parallel import sp_train
from longrl.rollout.base import RolloutRequest


class TextPolicy:
    def __init__(self, model, tokenizer, *, backprop: str = "chunked", chunk: int = 256, temperature: float = 1.0):
        self.model, self.tokenizer = model, tokenizer
        self.backprop, self.chunk, self.temperature = backprop, chunk, temperature

    @classmethod
    def from_config(cls, model, tokenizer, cfg) -> "TextPolicy":
        from longrl.config import train_temperature

        return cls(model, tokenizer, backprop=cfg.train.backprop, chunk=cfg.train.stream_chunk,
                   temperature=train_temperature(cfg))

    def encode_prompts(self, examples: list[Example]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, examples)

    def requests(self, examples: list[Example], n: int | list[int] = 1, *, eval: bool = False) -> list[RolloutRequest]:
        counts = n if isinstance(n, list) else [n] * len(examples)
        return [RolloutRequest(p, c) for p, c in zip(self.encode_prompts(examples), counts)]

    def logprobs(self, batch, examples: list[Example], model=None, temperature: float | None = None) -> torch.Tensor:
        t = self.temperature if temperature is None else temperature
        return sp_train.sequence_logprobs(model if model is not None else self.model, batch, self.chunk, t)  # [B, T]

    def loss_and_backward(self, batch, examples: list[Example], loss_fn, temperature: float | None = None):
        t = self.temperature if temperature is None else temperature
        return sp_train.loss_and_backward(self.model, batch, loss_fn, mode=self.backprop, chunk=self.chunk,
                                          temperature=t)

    def start_step(self, version: int | None = None) -> None:
        pass

    def step_metrics(self) -> dict:
        return {}

    def summary(self) -> dict:
        return {}
