"""Online DPO on verifier-labelled pairs, one step read top to bottom (`rl.algorithm=dpo`).

    rollout (G samples per prompt, as GRPO) -> reward -> one pair per group: the best
    and the worst sample, when their rewards differ -> reference log-probs (the frozen
    post-SFT policy) -> DPO loss over micro-batches of whole pairs -> one optimizer step

DPO: Rafailov et al., arXiv 2305.18290. Pairs sampled from the current policy and labelled
by a verifier make it online (as in "iterative"/online DPO, e.g. Xu et al. arXiv 2312.16682,
Pang et al. arXiv 2404.19733); the reference stays the post-SFT policy. Departures: one pair
per group (the first best and the first worst sample), groups whose samples all score the
same give no pair; the loss is divided by the number of pairs in the whole step over every
data-parallel rank, so micro-batches and ranks sum to the full-batch gradient (tested).
Rollouts, data parallelism and sequence parallelism are GRPO's (`recipes/grpo.py`).
"""

from __future__ import annotations

import time

import torch

from longrl.config import Config
from longrl.data.registry import TaskData
from longrl.parallel import dist
from longrl.parallel.sp_train import loss_and_backward, sequence_logprobs  # Ulysses when parallel.sp_size > 1
from longrl.recipes.common import clip_and_step
from longrl.recipes.grpo import GRPOState, _reduce_metrics, collect
from longrl.rl.losses import dpo_loss
from longrl.streambp.logprobs import make_batch


def pick_pairs(rewards: torch.Tensor, group_size: int) -> list[tuple[int, int]]:
    """(chosen row, rejected row) per group of `group_size` consecutive rows whose rewards
    differ: the first row with the group's highest reward and the first with its lowest."""
    pairs = []
    for g, r in enumerate(rewards.view(-1, group_size)):
        if r.max() > r.min():
            pairs.append((g * group_size + int(r.argmax()), g * group_size + int(r.argmin())))
    return pairs


def dpo_step(model, tokenizer, task: TaskData, cfg: Config, state: GRPOState, io=None) -> dict:
    """One online-DPO step; returns its metrics (the same rollout metrics as `grpo_step`)."""
    rcfg, G = cfg.rl, cfg.rl.group_size
    t0 = time.time()
    roll, metrics = collect(model, tokenizer, task, cfg, state, io)
    t_rollout = time.time() - t0
    pairs = pick_pairs(roll.rewards, G)
    metrics["rollout/groups"] = len(roll.examples) // G
    n_total = dist.all_reduce_sum(float(len(pairs)), dist.layout().dp_group)  # the step's normaliser
    metrics["dpo/pairs"] = n_total  # the whole step's, over every data-parallel rank
    temperature = cfg.rollout.temperature or 1.0
    chunk = cfg.train.stream_chunk
    device = next(model.parameters()).device
    per_micro = max(1, rcfg.micro_batch_size // 2)  # a micro-batch holds whole pairs
    sums = {"loss/dpo": 0.0, "dpo/margin": 0.0, "dpo/accuracy": 0.0}
    t1 = time.time()
    for s in range(0, len(pairs), per_micro):
        part = pairs[s : s + per_micro]
        rows = [c for c, _ in part] + [r for _, r in part]  # chosen rows, then rejected rows
        mb = make_batch([roll.prompt_ids[i] for i in rows], [roll.response_ids[i] for i in rows],
                        tokenizer.pad_token_id).to(device)
        n = len(part)
        ref = (sequence_logprobs(state.reference, mb, chunk, temperature) * mb.mask).sum(-1)  # [2n]

        def loss_fn(logp, mb=mb, ref=ref, n=n):
            seq = (torch.where(mb.mask != 0, logp, torch.zeros_like(logp))).sum(-1)  # [2n]
            loss, margin = dpo_loss(seq[:n], seq[n:], ref[:n], ref[n:], rcfg.dpo_beta, max(n_total, 1.0))
            return loss, {"dpo/margin_sum": float(margin.sum()), "dpo/correct": float((margin > 0).sum())}

        loss, m, _ = loss_and_backward(model, mb, loss_fn, mode=cfg.train.backprop, chunk=chunk, temperature=temperature)
        sums["loss/dpo"] += float(loss)
        sums["dpo/margin"] += m["dpo/margin_sum"]
        sums["dpo/accuracy"] += m["dpo/correct"]
    # Every rank steps, also one without pairs: gradients are summed over the world.
    dist.all_reduce_gradients(model)
    grad_norm = clip_and_step(model, state.optimizer, state.scheduler, cfg.train.grad_clip)
    state.step += 1
    metrics.update({
        "loss/dpo": sums["loss/dpo"],
        "dpo/margin": sums["dpo/margin"] / max(1, len(pairs)),
        "dpo/accuracy": sums["dpo/accuracy"] / max(1, len(pairs)),
        "grad/norm": grad_norm, "lr": state.scheduler.get_last_lr()[0],
        "time/rollout": t_rollout, "time/train": time.time() - t1, "time/step": time.time() - t0,
    })
    return _reduce_metrics(metrics)
