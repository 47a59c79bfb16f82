"""Rollout backends behind one interface (`rollout/base.py`) and the factory that picks one.

`make_backend` lives here, not in base.py, because it imports every implementation and
each implementation imports base.py: the factory sits above both, so no module imports a
module that imports it back. Implementations are imported when asked for (vLLM is an extra).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from longrl.rollout.base import RolloutBackend


def make_backend(cfg, model, tokenizer) -> RolloutBackend:
    """The backend `rollout.backend` names, for this process's share of the step.

    `rollout.partial=true` (APRIL) needs submit/step/abort: with `rollout.backend=hf` it runs
    on the continuous engine (`config.rollout_backend_name`)."""
    from longrl.config import rollout_backend_name, rollout_slots
    from longrl.parallel import dist

    name = rollout_backend_name(cfg)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seed = cfg.train.seed + dist.layout().dp_rank  # data-parallel ranks sample their own streams
    if name == "hf":
        from longrl.rollout.hf import HFBackend

        return HFBackend(model, eos_id=eos, pad_id=pad)
    if name == "continuous":
        from longrl.rollout.continuous import ContinuousBackend

        return ContinuousBackend(model, rollout_slots(cfg), eos_token_id=eos, temperature=cfg.rollout.temperature,
                                 top_p=cfg.rollout.top_p, seed=seed, pad_token_id=pad)
    from longrl.rollout.vllm import VLLMBackend

    return VLLMBackend(model, tokenizer, cfg, seed=seed)
