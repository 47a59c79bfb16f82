"""Checkpoints: Hugging Face weights + tokenizer, and the trainer state for exact resume.

`checkpoints/step_<N>/` holds `model.safetensors`, `config.json`, the tokenizer files
(plain `transformers` loads the directory as it is) and `trainer_state.pt` (optimizer,
scheduler, RNG states, data position, step, phase results). Each is written into a temp
directory and renamed, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from longrl.models.load import save_policy
from longrl.utils import atomic_dir, rng_state

STATE_FILE = "trainer_state.pt"


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict, keep: int) -> Path:
    final = run_dir / "checkpoints" / f"step_{step}"
    with atomic_dir(final) as tmp:
        save_policy(model, tokenizer, tmp)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / STATE_FILE)
    _prune(run_dir / "checkpoints", keep)
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep step_0 (the post-SFT policy, also the KL reference) and the newest `keep`."""
    steps = sorted(list_steps(ckpt_dir))
    for s in steps[:-keep] if keep > 0 else []:
        if s != 0:
            shutil.rmtree(ckpt_dir / f"step_{s}", ignore_errors=True)


def list_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return [int(m.group(1)) for p in ckpt_dir.iterdir()
            if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / STATE_FILE).is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = list_steps(run_dir / "checkpoints")
    return run_dir / "checkpoints" / f"step_{max(steps)}" if steps else None


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, weights_only=False)
