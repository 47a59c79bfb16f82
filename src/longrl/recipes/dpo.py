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

Multi-round DPO with LoRA (`rl.dpo_rounds=K`, `model.lora.r > 0`; as in video-SALMONN 2):
the RL steps form K rounds of equal length. Each round trains a fresh adapter
(fresh AdamW, warm-up again) on pairs sampled from the current policy, against that round's
starting model (the base with the adapter disabled); at the round's end the adapter is
merged into the base, so the next round samples from, and is anchored to, the merged model.
The merge runs at the start of the next round's first step, so a checkpoint at a round's
last step still holds that round's adapter and resumes exactly.

Offline DPO (`rl.dpo_source=data`): the pairs are the training lines' own "chosen" and
"rejected" responses (JSONL fields next to "prompt" and "answer"), `rl.prompts_per_step`
of them per step in the shared prompt order; nothing is sampled.
"""

from __future__ import annotations

import time

import torch

from longrl.config import Config, dpo_pairs_per_micro, phase_lr
from longrl.data.registry import TaskData
from longrl.errors import UserError
from longrl.parallel import dist
from longrl.policy.base import Policy
from longrl.models.lora import new_adapter
from longrl.recipes.common import clip_and_step, make_optimizer, make_scheduler, no_signal_steps, skipped_steps
from longrl.recipes.grpo import GRPOState, collect, no_update, reduce_metrics, reference_logprobs
from longrl.rollout.base import RolloutBackend
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


def check_preference_data(task: TaskData) -> None:
    """`rl.dpo_source=data` needs "chosen" and "rejected" responses on every training example."""
    for ex in task.train:
        if not all(isinstance(ex.meta.get(k), str) and ex.meta[k] for k in ("chosen", "rejected")):
            raise UserError(f'example {ex.id!r}: rl.dpo_source=data needs "chosen" and "rejected" response strings '
                            'on every training line (e.g. "<answer>7</answer>"); or use rl.dpo_source=online')


def data_pairs(policy: Policy, task: TaskData, cfg: Config, state: GRPOState):
    """This replica's share of the step's `rl.prompts_per_step` preference examples, in the
    shared prompt order: (examples, prompt ids, response ids, pairs) with rows
    [chosen..., rejected...]."""
    lay = dist.layout()
    step = state.cursor.take(cfg.rl.prompts_per_step)
    examples = [task.train[step[j]] for j in dist.shard_indices(len(step), lay.dp_rank, lay.dp_size)]
    tokenizer = policy.tokenizer
    prompts = policy.encode_prompts(examples)
    tokens = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]  # noqa: E731
    n = len(examples)
    responses = [tokens(ex.meta["chosen"]) for ex in examples] + [tokens(ex.meta["rejected"]) for ex in examples]
    return examples + examples, prompts + prompts, responses, [(i, n + i) for i in range(n)]


def round_length(cfg: Config) -> int:
    """RL steps per DPO round (all of them with rl.dpo_rounds=1)."""
    return cfg.rl.steps // cfg.rl.dpo_rounds


def start_round(model, cfg: Config, state: GRPOState) -> None:
    """Merge the finished round's adapter into the base and begin the next round: a fresh
    adapter, AdamW and warm-up (the skipped-step count carries on). The reference needs no
    change: it is this model with its (new) adapter disabled, i.e. the merged model."""
    skipped = skipped_steps(state.optimizer)
    new_adapter(model, cfg.model.lora, base_moved=True)
    state.optimizer = make_optimizer(model, phase_lr(cfg, cfg.rl.lr, adapters=True), cfg.train.weight_decay,
                                     shard=cfg.parallel.zero_optimizer)
    state.optimizer.param_groups[0]["skipped_steps"] = skipped
    state.scheduler = make_scheduler(state.optimizer, cfg.rl.warmup_steps, round_length(cfg), decay=False)


def dpo_step(policy: Policy, backend: RolloutBackend, task: TaskData, cfg: Config, state: GRPOState) -> dict:
    """One DPO step; returns its metrics. Pairs come from the policy's own samples labelled
    by the verifier (`rl.dpo_source=online`, the same rollout metrics as `grpo_step`) or
    from the data's "chosen"/"rejected" responses (`rl.dpo_source=data`)."""
    rcfg, G, model = cfg.rl, cfg.rl.group_size, policy.model
    t0 = time.time()
    if rcfg.dpo_rounds > 1 and state.step > 0 and state.step % round_length(cfg) == 0:
        start_round(model, cfg, state)
        if backend is not None:
            backend.sync_weights(model, state.step)
    if rcfg.dpo_source == "data":
        examples, prompt_ids, response_ids, pairs = data_pairs(policy, task, cfg, state)
        metrics = {}
    else:
        roll, metrics = collect(policy, backend, task, cfg, state)
        if backend is not None:  # the engine's memory is the update's until the weight sync
            backend.release_memory()
        pairs = pick_pairs(roll.rewards, G)
        examples, prompt_ids, response_ids = roll.examples, roll.prompt_ids, roll.response_ids
        metrics["rollout/groups"] = len(roll.examples) // G
    t_rollout = time.time() - t0
    n_total = dist.all_reduce_sum(float(len(pairs)), dist.layout().dp_group)  # the step's normaliser
    metrics["dpo/pairs"] = n_total  # the whole step's, over every data-parallel rank
    if n_total == 0:  # no group's rewards differ: nothing to learn, and AdamW must not drift on its momentum
        metrics["dpo/round"] = state.step // round_length(cfg) + 1
        return no_update(model, backend, cfg, state, metrics, t0, t_rollout)
    device = next(model.parameters()).device
    per_micro = dpo_pairs_per_micro(cfg)  # a micro-batch holds whole pairs
    sums = {"loss/dpo": 0.0, "dpo/margin": 0.0, "dpo/accuracy": 0.0}
    t1 = time.time()
    for s in range(0, len(pairs), per_micro):
        part = pairs[s : s + per_micro]
        rows = [c for c, _ in part] + [r for _, r in part]  # chosen rows, then rejected rows
        mb = make_batch([prompt_ids[i] for i in rows], [response_ids[i] for i in rows],
                        policy.tokenizer.pad_token_id).to(device)
        mb_examples = [examples[i] for i in rows]
        n = len(part)
        ref = (reference_logprobs(policy, state.reference, mb, mb_examples) * mb.mask).sum(-1)  # [2n]

        def loss_fn(logp, mb=mb, ref=ref, n=n):
            seq = (torch.where(mb.mask != 0, logp, torch.zeros_like(logp))).sum(-1)  # [2n]
            loss, margin = dpo_loss(seq[:n], seq[n:], ref[:n], ref[n:], rcfg.dpo_beta, max(n_total, 1.0))
            return loss, {"dpo/margin_sum": float(margin.sum()), "dpo/correct": float((margin > 0).sum())}

        loss, m, _ = policy.loss_and_backward(mb, mb_examples, loss_fn)
        sums["loss/dpo"] += float(loss)
        sums["dpo/margin"] += m["dpo/margin_sum"]
        sums["dpo/accuracy"] += m["dpo/correct"]
    # Every rank steps, also one without pairs: gradients are summed over the world.
    dist.all_reduce_gradients(model)
    lr = state.scheduler.get_last_lr()[0]  # the rate this update uses
    grad_norm = clip_and_step(model, state.optimizer, state.scheduler, cfg.train.grad_clip, loss=sums["loss/dpo"],
                              where=f"RL step {state.step + 1}")
    state.step += 1
    if backend is not None:  # offline DPO samples nothing and may run without one
        backend.sync_weights(model, state.step)
    metrics.update({
        "loss/dpo": sums["loss/dpo"],
        "dpo/margin": sums["dpo/margin"] / max(1, len(pairs)),
        "dpo/accuracy": sums["dpo/accuracy"] / max(1, len(pairs)),
        "dpo/round": (state.step - 1) // round_length(cfg) + 1,
        "grad/norm": grad_norm, "lr": lr,
        "train/skipped_steps": skipped_steps(state.optimizer), "train/no_signal_steps": no_signal_steps(state.optimizer),
        "time/rollout": t_rollout, "time/train": time.time() - t1, "time/step": time.time() - t0,
    })
    return reduce_metrics(metrics)
