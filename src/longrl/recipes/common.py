"""Plumbing shared by the recipes: optimizer, LR schedule, the guarded optimizer step, progress bar."""

from __future__ import annotations

import math
import warnings

import torch
from tqdm.auto import tqdm

from longrl.errors import UserError
from longrl.parallel import dist, fsdp


def make_optimizer(model, lr: float, weight_decay: float, shard: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters. `shard` (parallel.zero_optimizer, under torchrun):
    ZeRO stage 1 with torch's `ZeroRedundancyOptimizer`: each rank keeps the moments of
    about 1/world of the parameters, updates that slice and broadcasts it, so every rank
    ends the step with the same weights as an unsharded AdamW (tested bit-equal). Under
    FSDP2 (`parallel.fsdp`) the optimizer holds the sharded parameters (parallel/fsdp.py)."""
    params = fsdp.trainable_parameters(model)
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


MAX_NONFINITE_STEPS = 3
"""Optimizer steps in a row whose loss or gradient norm is NaN/inf before the run stops.
One such step is skipped and the run goes on (one bad batch, a transient overflow); three
in a row mean the weights or the data are broken and more steps will not mend them. A
constant, not a config key: no run is better off with another value."""


def clip_and_step(model, optimizer, scheduler, grad_clip: float, loss=None, where: str = "") -> float:
    """Clip the global grad norm, step, zero grads; returns the pre-clip norm.

    A non-finite norm, or a non-finite `loss` (a float or tensor, this rank's; optional),
    skips the update: the weights and the optimizer moments stay as they were, the grads
    are zeroed, and the skip is counted (`skipped_steps(optimizer)`, logged as
    `train/skipped_steps`). The LR schedule still advances, so it stays aligned with the
    loop's steps. `MAX_NONFINITE_STEPS` skips in a row raise a UserError naming `where`
    (e.g. "RL step 7"; default: the optimizer step count) and the likely cause.

    Under FSDP2 the norm and the step run on the shards (their DTensor grads, summed by
    `dist.all_reduce_gradients`), and the full weights are gathered again afterwards for
    the next step's rollouts and passes.
    """
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    if fsdp.is_sharded(model):
        fsdp.shard_grads(model)  # a no-op after dist.all_reduce_gradients
        norm = fsdp.grad_norm_and_clip(model, max_norm)
    else:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if _finite_everywhere(norm, loss):
        optimizer.step()
        _count_skip(optimizer, skipped=False)
        scheduler.step()
    else:
        in_a_row = _count_skip(optimizer, skipped=True)
        skip_update(optimizer, scheduler)
        if in_a_row >= MAX_NONFINITE_STEPS:
            raise UserError(f"{where or f'optimizer step {scheduler.last_epoch}'}: the loss or gradient norm was NaN "
                            f"or inf for {in_a_row} steps in a row (those updates were skipped; weights are as after "
                            f"the last finite step). Likely cause: a learning rate too high (sft.lr / rl.lr) or a NaN "
                            f"reward weight: lower it and start again")
    optimizer.zero_grad(set_to_none=True)
    if fsdp.is_sharded(model):
        fsdp.gather(model)
    return norm


def skip_update(optimizer, scheduler) -> None:
    """An optimizer step not taken: no weight or moment moves and the grads are dropped; the
    LR schedule still advances, so it stays aligned with the loop's steps."""
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # torch warns when the schedule steps before any optimizer step
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def no_signal_steps(optimizer) -> int:
    """RL steps that made no update for want of a learning signal (kept in the optimizer's
    param groups, so a resumed run keeps counting)."""
    return int(optimizer.param_groups[0].get("no_signal_steps", 0))


def count_no_signal(optimizer) -> None:
    for group in optimizer.param_groups:
        group["no_signal_steps"] = group.get("no_signal_steps", 0) + 1


def skipped_steps(optimizer) -> int:
    """Updates `clip_and_step` skipped for this optimizer, since it was made (or saved)."""
    return int(optimizer.param_groups[0].get("skipped_steps", 0))


def _finite_everywhere(norm: float, loss) -> bool:
    """The norm comes from all-reduced grads, so every rank sees the same one; a loss is
    per rank, so under torchrun the ranks agree (one rank's NaN skips the step on all).
    The vote runs on every call under torchrun, loss or not, so that call sites passing a
    loss and ones that do not (a rank without rows) issue the same collectives."""
    bad = not math.isfinite(norm) or (loss is not None and not math.isfinite(float(loss)))
    if dist.world() > 1:
        bad = dist.all_reduce_sum(float(bad)) > 0
    return not bad


def _count_skip(optimizer, skipped: bool) -> int:
    """Keep the counts in the optimizer's first param group, so they are saved and restored
    with its state_dict and a resumed run counts on where it stopped."""
    group = optimizer.param_groups[0]
    group["skipped_steps"] = group.get("skipped_steps", 0) + int(skipped)
    group["skipped_in_a_row"] = group.get("skipped_in_a_row", 0) + 1 if skipped else 0
    return group["skipped_in_a_row"]


def progress(total: int, desc: str, enabled: bool, initial: int = 0):
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True, leave=True)


def on_positions(rows: list[list], mask: torch.Tensor, fill) -> torch.Tensor:
    """Per-response-token values -> [B, T] laid out like `make_batch`'s mask (fill elsewhere)."""
    dtype = torch.long if isinstance(fill, int) else torch.float32
    out = torch.full(mask.shape, fill, dtype=dtype, device=mask.device)
    for i, vals in enumerate(rows):
        pos = (mask[i] != 0).nonzero().squeeze(-1)
        out[i, pos] = torch.tensor(vals, dtype=dtype, device=mask.device)
    return out


def reward_plateau(rewards: list[float], held_out: dict[int, float], window: int, delta: float) -> str | None:
    """rl.stop_when_flat: has RL stopped improving? `rewards` holds reward/mean of every RL step
    so far, `held_out` the held-out accuracy by RL step (0: after SFT). Decided only at the end
    of a `window`-step window, from the second on, and only when neither signal still rises:
    - training reward: each window's score is the mean of its last `window // 2` steps (its
      first half still climbs from the previous window's level); rising = the newest score at
      least `delta` above the best earlier one;
    - held-out accuracy, when there is one at this step: rising = at least `delta` above the
      best earlier one. Both are needed: sampled (temperature 1) rewards can stay flat while
      greedy accuracy climbs, and 200 held-out problems move by +-0.03 on their own.
    Returns the one-line reason to stop, or None."""
    n, half = len(rewards), max(1, window // 2)
    if n < 2 * window or n % window:
        return None
    scores = [sum(rewards[end - half:end]) / half for end in range(window, n + 1, window)]
    best = max(scores[:-1])
    if scores[-1] >= best + delta:
        return None
    reason = f"training reward flat: {scores[-1]:.3f} over steps {n - half + 1}-{n}, best earlier window {best:.3f}"
    earlier = [acc for step, acc in held_out.items() if step < n]
    if n in held_out and earlier:
        if held_out[n] >= max(earlier) + delta:
            return None
        reason += f"; held-out accuracy {held_out[n]:.3f}, best earlier {max(earlier):.3f}"
    return f"{reason} (each needs +{delta:g})"
