"""Plumbing shared by the recipes: optimizer, LR schedule, progress bar."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def make_optimizer(model, lr: float, weight_decay: float, shard: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters. `shard` (parallel.zero_optimizer, under torchrun):
    ZeRO stage 1 with torch's `ZeroRedundancyOptimizer`: each rank keeps the moments of
    about 1/world of the parameters, updates that slice and broadcasts it, so every rank
    ends the step with the same weights as an unsharded AdamW (tested bit-equal)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": lr, "betas": (0.9, 0.99), "weight_decay": weight_decay}
    if shard and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int, decay: bool):
    """Linear warm-up, then constant (RL) or cosine decay to 10% (SFT)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not decay:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_and_step(model, optimizer, scheduler, grad_clip: float) -> float:
    """Clip the global grad norm, step, zero grads; returns the pre-clip norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def progress(total: int, desc: str, enabled: bool, initial: int = 0):
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True, leave=True)
