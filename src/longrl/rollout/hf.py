"""The `hf` rollout backend: batched decoding with a KV cache over the trainer's own model.

Token-only requests run through `rollout/engine.generate` (every row of the call in one
batch); requests that carry a video's cached embeddings (`RolloutRequest.media`, a
`policy.video.VideoPrompt`) run through `models/vlm.sample_prompts`, which prefills each
prompt once and decodes its n samples from copies of that cache. Requests with the same
n are decoded together. A multi-turn video episode's later turns are requests whose media
holds several videos (`models.vlm_segments.VideoSequence`); a turn ends at EOS or a stop
id. The backend shares the trainer's parameters, so a weight sync is only a new version
number.
"""

from __future__ import annotations

import torch

from longrl.rollout.base import RolloutRequest, SamplingParams
from longrl.rollout.engine import Generation, generate


class HFBackend:
    name = "hf"
    supports_partial = False

    def __init__(self, model, *, eos_id: int, pad_id: int):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.policy_version = 0

    def sync_weights(self, model, version: int) -> None:
        """The engine runs the trainer's model in place: nothing to copy."""
        self.model, self.policy_version = model, version

    def release_memory(self) -> None:
        """Nothing held between calls (the KV cache lives only inside `generate`)."""

    def generate(self, requests: list[RolloutRequest], sampling: SamplingParams,
                 generator: torch.Generator | None = None) -> list[Generation]:
        if not requests:
            return []
        with_media = [r.media is not None for r in requests]
        if any(with_media) and not all(with_media):
            raise ValueError("one generate() call takes token-only requests or requests with embeddings, not both")
        if all(with_media):
            return self._generate_media(requests, sampling, generator)
        prompts = [r.prompt_ids for r in requests for _ in range(r.n)]  # a request's samples contiguous
        return generate(self.model, prompts, max_new_tokens=sampling.max_new_tokens, eos_id=self.eos_id,
                        pad_id=self.pad_id, temperature=sampling.temperature, top_p=sampling.top_p,
                        generator=generator, stop_ids=sampling.stop_ids)

    def _generate_media(self, requests, sampling, generator) -> list[Generation]:
        """Requests with the same n decoded together (one size, except at the edge of an SP
        share), each prompt prefilled once."""
        from longrl.models.vlm import sample_prompts

        out: dict[int, list[Generation]] = {}
        for n in sorted({r.n for r in requests}):
            ks = [k for k, r in enumerate(requests) if r.n == n]
            resp, lp = sample_prompts(self.model, [requests[k].media.video for k in ks],
                                      [requests[k].prompt_ids for k in ks], [requests[k].media.positions for k in ks],
                                      n, sampling.max_new_tokens, self.eos_id, sampling.temperature, generator,
                                      top_p=sampling.top_p, stop_ids=sampling.stop_ids)
            ends = {self.eos_id, *sampling.stop_ids}
            for t, k in enumerate(ks):
                out[k] = [Generation(r, l, "stop" if r and r[-1] in ends else "length")
                          for r, l in zip(resp[t * n : (t + 1) * n], lp[t * n : (t + 1) * n])]
        return [g for k in range(len(requests)) for g in out[k]]
