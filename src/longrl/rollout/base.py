"""The rollout backend interface: the one seam between the recipes and a generation engine.

A backend turns requests (prompt token ids, optionally with precomputed embeddings to
splice into the prompt, e.g. a video's) into samples (response ids, behaviour log-probs,
finish reason). It knows nothing about losses, rewards or model families' training code.

    generate(requests, sampling, generator)  batched, synchronous: n samples per request
    sync_weights(model, version)             the one place new weights reach the engine
    release_memory()                         after the rollout: free the engine's memory for
                                             the update (restored by the next sync_weights)
    submit / step / abort_all / has_work     APRIL's engine protocol (`rollout/april.py`),
                                             on backends with `supports_partial`

Backends (`rollout.backend`; `longrl.rollout.make_backend` builds one): `hf` (`rollout/hf.py`:
the batched KV-cache loop over a Hugging Face model, text or video), `continuous`
(`rollout/continuous.py`'s fixed-slot continuous-batching engine, which APRIL drives), `vllm`
(`rollout/vllm.py`, the `vllm` extra). The native backends hold a reference to the trainer's
model, so `sync_weights` only records the version; vLLM keeps its own copy and reloads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from longrl.rollout.continuous import Request, Result
from longrl.rollout.engine import Generation


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: the same meaning on every backend."""

    max_new_tokens: int
    temperature: float = 1.0
    """0 = greedy. Behaviour log-probs are under logits / temperature (plain logits at 0)."""
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    """Token ids that end a sample like EOS does (finish reason 'stop', the id kept as the last
    token): the end of a tool call in a multi-turn episode (`rollout/episodes.py`)."""


@dataclass
class RolloutRequest:
    """`n` samples of one prompt."""

    prompt_ids: list[int]
    n: int = 1
    media: object | None = None
    """Precomputed embeddings the backend splices into the prompt (video: `policy.video.VideoPrompt`);
    None for a token-only prompt."""


class RolloutBackend(Protocol):
    name: str
    policy_version: int
    supports_partial: bool
    """True when submit/step/abort_all work (APRIL)."""

    def generate(self, requests: list[RolloutRequest], sampling: SamplingParams,
                 generator: torch.Generator | None = None) -> list[Generation]:
        """Samples in request order, `request.n` consecutive ones per request."""
        ...

    def sync_weights(self, model, version: int) -> None: ...

    def release_memory(self) -> None:
        """Free what the engine holds while the trainer updates (vLLM on a GPU: its KV cache
        and weights); the next `sync_weights` restores it."""
        ...

    # ---- APRIL (supports_partial) ----
    @property
    def has_work(self) -> bool: ...

    def submit(self, requests: Iterable[Request]) -> None: ...

    def step(self) -> list[Result]: ...

    def abort_all(self) -> list[Result]: ...


def rows_to_requests(rows: list[int], group_size: int) -> list[tuple[int, int]]:
    """Rows of a step (row i answers prompt i // G), e.g. one rank's contiguous share under
    sequence parallelism -> runs of (prompt index, number of rows), in order."""
    runs: list[list[int]] = []
    for i in rows:
        j = i // group_size
        if runs and runs[-1][0] == j:
            runs[-1][1] += 1
        else:
            runs.append([j, 1])
    return [(j, n) for j, n in runs]

