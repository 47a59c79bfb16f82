"""The text policy: a token-only causal LM (Qwen2/2.5/3, Llama, the tiny default, GLA).

The teacher-forced passes are `parallel/sp_train.py`'s, which are StreamBP's chunked
passes on one rank and Ulysses (softmax attention) or All-Scan (GLA) when
`parallel.sp_size` > 1. Rows are independent: `examples` is not needed to run a row.

On one rank the passes run in row groups of at most `train.pass_tokens` positions
(`streambp.logprobs.row_groups`), so that a micro-batch's activations stay bounded and its
padding costs nothing. The policy remembers the log-probs its own model gave each batch
since the last weight change; a training pass over such a batch (GRPO's first PPO epoch
after its old log-prob pass) takes them instead of running its own no-grad pass, which
`train.backprop=chunked` needs when the batch is split into row groups. They are the same
numbers: the same function of the same batch and weights.
"""

from __future__ import annotations

import torch

from longrl.data.example import Example
from longrl.eval.accuracy import encode_prompts
from longrl.parallel import sp_train
from longrl.parallel.dist import layout
from longrl.rollout.base import RolloutRequest
from longrl.streambp import logprobs as streambp


class TextPolicy:
    def __init__(self, model, tokenizer, *, backprop: str = "chunked", chunk: int = 256, temperature: float = 1.0,
                 pass_tokens: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.backprop, self.chunk, self.temperature = backprop, chunk, temperature
        self.pass_tokens = pass_tokens
        self._known: list[tuple] = []  # (weights version, temperature, input_ids, mask, logprobs)

    @classmethod
    def from_config(cls, model, tokenizer, cfg) -> "TextPolicy":
        from longrl.config import train_temperature

        return cls(model, tokenizer, backprop=cfg.train.backprop, chunk=cfg.train.stream_chunk,
                   temperature=train_temperature(cfg), pass_tokens=cfg.train.pass_tokens)

    def encode_prompts(self, examples: list[Example]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, examples)

    def requests(self, examples: list[Example], n: int | list[int] = 1, *, eval: bool = False) -> list[RolloutRequest]:
        counts = n if isinstance(n, list) else [n] * len(examples)
        return [RolloutRequest(p, c) for p, c in zip(self.encode_prompts(examples), counts)]

    def logprobs(self, batch, examples: list[Example], model=None, temperature: float | None = None) -> torch.Tensor:
        t = self.temperature if temperature is None else temperature
        m = model if model is not None else self.model
        if layout().sp_size > 1:
            return sp_train.sequence_logprobs(m, batch, self.chunk, t)  # [B, T]
        logp = streambp.sequence_logprobs(m, batch, self.chunk, t, self.pass_tokens)  # [B, T]
        if model is None:  # the policy's own weights (a reference may share the module: LoRA disabled)
            self._remember(batch, t, logp)
        return logp

    def loss_and_backward(self, batch, examples: list[Example], loss_fn, temperature: float | None = None):
        t = self.temperature if temperature is None else temperature
        if layout().sp_size > 1:
            return sp_train.loss_and_backward(self.model, batch, loss_fn, mode=self.backprop, chunk=self.chunk,
                                              temperature=t)
        return streambp.loss_and_backward(self.model, batch, loss_fn, mode=self.backprop, chunk=self.chunk,
                                          temperature=t, max_tokens=self.pass_tokens, logprobs=self._recall(batch, t))

    def start_step(self, version: int | None = None) -> None:
        self._known.clear()

    def step_metrics(self) -> dict:
        return {}

    def summary(self) -> dict:
        return {}

    # ------------------------------------------------------------------------------------
    # Log-probs already computed under the current weights
    # ------------------------------------------------------------------------------------

    def _weights_version(self) -> tuple:
        """Changes whenever a parameter is written in place (an optimizer step, a load) or replaced."""
        return tuple((id(p), p._version) for p in self.model.parameters())

    def _remember(self, batch, temperature: float, logp: torch.Tensor) -> None:
        version = self._weights_version()
        self._known = [k for k in self._known if k[0] == version]  # older weights: stale
        self._known.append((version, temperature, batch.input_ids.clone(), batch.mask.clone(), logp))

    def _recall(self, batch, temperature: float) -> torch.Tensor | None:
        if not self._known:
            return None
        version = self._weights_version()
        for v, t, ids, mask, logp in self._known:
            if (v == version and t == temperature and ids.shape == batch.input_ids.shape
                    and torch.equal(ids, batch.input_ids) and torch.equal(mask, batch.mask)):
                return logp
        return None
