"""GRPO (and its relatives: Dr. GRPO, RLOO, DAPO tricks, GSPO), one step read top to bottom.

Letters: N prompts (groups) per step, G samples per prompt, B = N*G sequences, T tokens.

    rollout -> reward -> advantage -> PPO epochs over micro-batches -> new weights

Papers: GRPO (DeepSeekMath, arXiv 2402.03300); DAPO (arXiv 2503.14476) for clip-higher,
dynamic sampling, token-mean loss and overlong shaping; Dr. GRPO (arXiv 2503.20783);
GSPO (arXiv 2507.18071). Departures: KL (off by default) is a loss term against a frozen
copy of the post-SFT policy (with LoRA: the same model with its adapter disabled, no copy); old log-probs are recomputed by the trainer before the update
(not trusted from the engine), and the engine/trainer gap is logged; new weights reach the
rollout backend through `backend.sync_weights` after every step (free for the native
backends, which share the policy's parameters; a copy for vLLM).

The loop takes a `Policy` (`policy/`: text or video, the same code) and a `RolloutBackend`
(`rollout/base.py`: hf, continuous or vllm) and never asks which it holds. Rollouts are
episodes (`rollout/episodes.py`): one turn for a plain task, model turns and tool results
for a task with tools (`task.environment`); tool-result tokens carry loss mask 0, so they
take no policy loss, KL or entropy and do not count in the normaliser.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace

import torch

from longrl.config import Config, phase_lr, rl_lr
from longrl.data.example import Example
from longrl.data.registry import TaskData
from longrl.eval.accuracy import decode_response
from longrl.parallel import dist, fsdp
from longrl.policy.base import Policy
from longrl.metrics import length_stats
from longrl.models.lora import DisabledAdapter, has_lora
from longrl.recipes.common import (clip_and_step, count_no_signal, make_optimizer, make_scheduler, no_signal_steps,
                                   on_positions, skip_update, skipped_steps)
from longrl.rewards.agent import agent_rewards, turn_format
from longrl.rewards.combine import score_responses
from longrl.rl.advantages import constant_groups, group_advantages, overlong_soft_penalty
from longrl.rl.losses import policy_loss
from longrl.rollout.april import AprilScheduler, offpolicy_mask, tis_weights
from longrl.rollout.base import RolloutBackend, SamplingParams, rows_to_requests
from longrl.rollout.episodes import (AprilEpisodes, NoTools, TurnLimits, episode_example, episode_metrics, model_text,
                                     run_episodes)
from longrl.streambp.logprobs import make_batch, row_separable


@dataclass
class DataCursor:
    """Position in the shuffled prompt stream: epoch e uses permutation Random(seed + e)."""

    seed: int
    n: int
    epoch: int = 0
    index: int = 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            perm = list(range(self.n))
            random.Random(self.seed + self.epoch).shuffle(perm)
            out.append(perm[self.index])
            self.index += 1
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return out


@dataclass
class GRPOState:
    """Everything a resumed run needs besides the weights."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: torch.Generator
    cursor: DataCursor
    step: int = 0
    reference: "torch.nn.Module | DisabledAdapter | None" = None
    april: "AprilScheduler | None" = None


def needs_reference(cfg: Config) -> bool:
    """The post-SFT policy, frozen: for the KL term, and always for DPO."""
    return cfg.rl.kl_coef > 0 or cfg.rl.algorithm == "dpo"


def make_reference(model) -> "torch.nn.Module | DisabledAdapter":
    """The reference policy: a frozen copy of `model`, or, when `model` trains a LoRA
    adapter, `model` itself with the adapter disabled (its base: no second copy)."""
    if has_lora(model):
        return DisabledAdapter(model)
    return fsdp.replica(model).eval().requires_grad_(False)  # deepcopy, or a plain copy of FSDP2's full weights


def reference_logprobs(policy: Policy, reference, batch, examples: list[Example]) -> torch.Tensor:
    """Log-probs of `batch` under the reference policy: [B, T]."""
    if isinstance(reference, DisabledAdapter):
        with reference as base:
            return policy.logprobs(batch, examples, model=base)
    return policy.logprobs(batch, examples, model=reference)


def turn_limits(cfg: Config, eval: bool = False) -> TurnLimits:
    """rollout.max_turns / max_turn_tokens, and the total budget (eval.max_new_tokens for evaluation)."""
    total = cfg.eval.max_new_tokens if eval else cfg.rollout.max_new_tokens
    return TurnLimits(cfg.rollout.max_turns, cfg.rollout.max_turn_tokens, total)


def april_episodes(task: TaskData, cfg: Config, tokenizer) -> AprilEpisodes | None:
    """APRIL's view of the task's episodes (None for a single-turn task)."""
    if task.environment is None:
        return None
    return AprilEpisodes(task.environment, turn_limits(cfg), tokenizer, lambda i: task.train[i])


def init_state(model, cfg: Config, n_train: int, backend: RolloutBackend | None = None,
               episodes: AprilEpisodes | None = None) -> GRPOState:
    """Optimizer, schedule, sampler, data position; with rollout.partial, APRIL's scheduler
    on `backend` (which must support submit/step/abort), running `episodes` (multi-turn)."""
    lr = phase_lr(cfg, rl_lr(cfg), adapters=has_lora(model))  # LoRA: model.lora.lr_scale x rl.lr (0: by the model)
    optimizer = make_optimizer(model, lr, cfg.train.weight_decay, shard=cfg.parallel.zero_optimizer)
    scheduler = make_scheduler(optimizer, cfg.rl.warmup_steps, cfg.rl.steps, decay=False)
    # Data-parallel ranks share the prompt order but sample with their own streams.
    sampler = torch.Generator(device="cpu").manual_seed(cfg.train.seed + 1 + dist.rank())
    reference = make_reference(model) if needs_reference(cfg) else None
    state = GRPOState(optimizer, scheduler, sampler, DataCursor(cfg.train.seed, n_train), reference=reference)
    if cfg.rollout.partial:
        # Data parallel: each rank runs its own engine and scheduler on its share of the
        # step's groups, drawing its own prompts (see `rollout_partial`) with its own seed.
        if backend is None or not backend.supports_partial:
            raise ValueError("rollout.partial=true needs a rollout backend with submit/step/abort (continuous, vllm)")
        state.april = AprilScheduler(backend, cfg.rl.group_size, cfg.rollout.over_provision, cfg.rollout.max_staleness,
                                     partial=True, max_new_tokens=cfg.rollout.max_new_tokens,
                                     seed=cfg.train.seed + dist.layout().dp_rank, episodes=episodes)
    return state


# ----------------------------------------------------------------------------------------
# Rollout and reward
# ----------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    examples: list[Example]  # [B] the example each sample answers (repeated G times)
    prompt_ids: list[list[int]]  # [B]
    response_ids: list[list[int]]  # [B]
    behaviour_logprobs: list[list[float]]  # [B]
    versions: list[list[int]]  # [B] policy version that sampled each response token
    truncated: torch.Tensor  # [B] bool
    rewards: torch.Tensor  # [B]
    components: dict  # name -> [B]
    loss_masks: list[list[int]] | None = None  # [B] per response token: 1 = the model's, 0 = a tool result's (None: all 1)
    agent: dict = field(default_factory=dict)  # agent/* name -> [B] per-episode counts (empty for single-turn)

    def __post_init__(self):
        if self.loss_masks is None:
            self.loss_masks = [[1] * len(r) for r in self.response_ids]


def rollout(policy: Policy, backend: RolloutBackend, examples: list[Example], task: TaskData, cfg: Config,
            sampler: torch.Generator, version: int) -> Rollouts:
    """Synchronous: G samples per prompt, all decoded together until the last one ends.

    Sequence parallel: the P ranks of an SP group train on the same rows. Each generates
    and scores a contiguous 1/P of them (with its own sampler) and the shares are
    all-gathered, so every row is sampled once per group and the ranks agree exactly.
    Every rank builds the requests of all prompts (a video's encode is collective), then
    decodes its own rows' runs.
    """
    G = cfg.rl.group_size
    policy.start_step(version)
    requests = policy.requests(examples, G)  # one per prompt
    lay = dist.layout()
    mine = dist.shard_indices(len(examples) * G, lay.sp_rank, lay.sp_size)  # all rows when sp_size == 1
    part = None
    if mine:
        runs = rows_to_requests(mine, G)  # [(prompt, rows)]
        mine_requests = [replace(requests[j], n=n) for j, n in runs]
        sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p)
        env = task.environment or NoTools()
        eps = run_episodes(backend, mine_requests, env, [examples[j] for j, _ in runs], sampling, sampler,
                           turn_limits(cfg), policy.tokenizer)
        b_examples = [episode_example(examples[i // G], e.media) for i, e in zip(mine, eps)]  # + a tool's media
        b_prompts = [requests[i // G].prompt_ids for i in mine]
        part = _score(task, cfg, b_examples, b_prompts, [e.response_ids for e in eps], [e.logprobs for e in eps],
                      [[version] * len(e.response_ids) for e in eps], [e.finish_reason for e in eps],
                      [e.loss_mask for e in eps], [e.record() for e in eps])
    if lay.sp_size == 1:
        return part
    return _concat([r for r in dist.all_gather_object(part, lay.sp_group) if r is not None])


def rollout_partial(policy: Policy, task: TaskData, cfg: Config, state: GRPOState) -> tuple[Rollouts, dict]:
    """APRIL: over-provisioned groups on the continuous-batching engine; unfinished samples
    are parked in the scheduler's buffer and resumed (from their token ids) next step.

    Data parallel: rank r completes its share of the step's groups from every D-th prompt
    of the shared order (offset r), so the ranks never draw the same prompt; each consumes
    prompts at its own pace, and its cursor and parked samples are its own (checkpointed
    per rank)."""
    lay = dist.layout()

    def prompts():
        while True:
            i = state.cursor.take(lay.dp_size)[lay.dp_rank]
            yield i, policy.encode_prompts([task.train[i]])[0]

    n_local = len(dist.shard_indices(cfg.rl.prompts_per_step, lay.dp_rank, lay.dp_size))
    groups, stats = state.april.next_step(prompts(), n_local)
    samples = [s for g in groups for s in g]  # groups contiguous
    records = None
    if task.environment is not None:
        records = [s.episode for s in samples]
    roll = _score(task, cfg, [task.train[s.prompt_id] for s in samples], [s.prompt_ids for s in samples],
                  [s.response_ids for s in samples], [s.logprobs for s in samples], [s.versions for s in samples],
                  [s.finish_reason for s in samples], [_full_mask(s) for s in samples], records,
                  tokenizer=policy.tokenizer)
    return roll, stats.metrics()


def _full_mask(s) -> list[int]:
    """An APRIL sample's loss mask (parked before masks existed: every token the model's)."""
    return s.loss_mask if len(s.loss_mask) == len(s.response_ids) else [1] * len(s.response_ids)


def _score(task, cfg, b_examples, b_prompts, responses, logprobs, versions, finish, loss_masks, records,
           tokenizer=None) -> Rollouts:
    """Rewards of the rows. `records`: each episode's turns (`Episode.record()`); the rewards
    read the model's turns only. None: single-turn rows of an APRIL step, decoded here."""
    if records is None:
        records = [{"turn_texts": [decode_response(tokenizer, r)], "env": {}, "turns": 1, "truncated_turn": False,
                    "turn_limit": False} for r in responses]
    texts = [model_text(r) for r in records]
    rewards, components = score_responses(texts, b_examples, task.score,
                                          cfg.reward.correctness_weight, cfg.reward.format_weight)
    agent = {}
    if task.environment is not None:
        rewards, components = agent_rewards(
            components["correctness"],
            torch.tensor([turn_format(r["turn_texts"], r["env"].get("well_formed", [])) for r in records]),
            torch.tensor([r["env"].get("calls", {}).get("search", 0) > 0 for r in records]),
            torch.tensor([r["env"].get("errors", 0) for r in records]),
            correctness_weight=cfg.reward.correctness_weight, format_weight=cfg.reward.format_weight,
            search_penalty=cfg.reward.search_penalty, tool_error_penalty=cfg.reward.tool_error_penalty)
        agent = _per_episode(records, tuple(getattr(task.environment, "tools", ())))
    truncated = torch.tensor([f == "length" for f in finish], dtype=torch.bool)
    if cfg.rl.overlong == "soft":
        lengths = torch.tensor([len(r) for r in responses])
        # Truncated responses sit at max_new_tokens: the full -1 penalty.
        penalty = overlong_soft_penalty(lengths, cfg.rollout.max_new_tokens, cfg.rl.overlong_buffer)
        components["overlong"] = penalty
        rewards = rewards + penalty
    return Rollouts(b_examples, b_prompts, responses, logprobs, versions, truncated, rewards, components, loss_masks, agent)


def _per_episode(records: list[dict], tools: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """agent/* per episode ([B] each): what `episode_metrics` averages, kept per row so that
    dynamic sampling's selection and SP's gather keep them aligned with the rows."""
    rows = [episode_metrics([r], tools) for r in records]  # every offered tool, 0 where not called
    keys = sorted({k for m in rows for k in m})
    return {k: torch.tensor([m.get(k, 0.0) for m in rows], dtype=torch.float32) for k in keys}


def _concat(parts: list[Rollouts]) -> Rollouts:
    if len(parts) == 1:
        return parts[0]
    return Rollouts(
        [x for p in parts for x in p.examples], [x for p in parts for x in p.prompt_ids],
        [x for p in parts for x in p.response_ids], [x for p in parts for x in p.behaviour_logprobs],
        [x for p in parts for x in p.versions], torch.cat([p.truncated for p in parts]), torch.cat([p.rewards for p in parts]),
        {k: torch.cat([p.components[k] for p in parts]) for k in parts[0].components},
        [x for p in parts for x in p.loss_masks], _cat_agent([p.agent for p in parts], [len(p.examples) for p in parts]),
    )


def _cat_agent(parts: list[dict], sizes: list[int]) -> dict:
    """Concatenate per-row agent counts; a tool no row of a part called counts 0 there."""
    keys = sorted({k for p in parts for k in p})
    return {k: torch.cat([p.get(k, torch.zeros(n)) for p, n in zip(parts, sizes)]) for k in keys}


def _select_groups(r: Rollouts, keep: torch.Tensor, G: int) -> Rollouts:
    rows = [i for i in range(len(r.examples)) if keep[i // G]]
    idx = torch.tensor(rows, dtype=torch.long)
    return Rollouts([r.examples[i] for i in rows], [r.prompt_ids[i] for i in rows],
                    [r.response_ids[i] for i in rows], [r.behaviour_logprobs[i] for i in rows],
                    [r.versions[i] for i in rows], r.truncated[idx], r.rewards[idx], {k: v[idx] for k, v in r.components.items()},
                    [r.loss_masks[i] for i in rows], {k: v[idx] for k, v in r.agent.items()})


def collect(policy: Policy, backend: RolloutBackend, task: TaskData, cfg: Config,
            state: GRPOState) -> tuple[Rollouts, dict]:
    """Roll out N groups; with dynamic sampling, drop all-equal groups and refill."""
    G = cfg.rl.group_size
    # Data parallel: every rank draws the same N prompts and keeps its replica's contiguous
    # share of the groups (groups never straddle replicas, so advantages need no
    # communication); the ranks of a sequence-parallel group form one replica.
    lay = dist.layout()
    mine = dist.shard_indices(cfg.rl.prompts_per_step, lay.dp_rank, lay.dp_size)
    N = len(mine)

    def one_round() -> tuple[Rollouts, dict]:
        if state.april is not None:
            return rollout_partial(policy, task, cfg, state)
        step_prompts = state.cursor.take(cfg.rl.prompts_per_step)
        return rollout(policy, backend, [task.train[step_prompts[j]] for j in mine], task, cfg,
                       state.sampler, state.step), {}

    first, april_stats = one_round()
    stats = {**april_stats,"reward/mean": float(first.rewards.mean()),
             **{f"reward/{k}": float(v.mean()) for k, v in first.components.items()},
             "rollout/truncated_frac": float(first.truncated.float().mean()),
             **{k: float(v.mean()) for k, v in first.agent.items()},
             **length_stats([len(r) for r in first.response_ids])}  # rollout/response_len and its spread
    if not cfg.rl.dynamic_sampling:
        return first, stats
    kept, n_kept, dropped = [], 0, 0
    batch = first
    for round_ in range(cfg.rl.max_refill_rounds + 1):
        if round_ > 0:
            batch, _ = one_round()
        keep = ~constant_groups(batch.rewards, G)  # [N]
        dropped += int((~keep).sum())
        if keep.any():
            kept.append(_select_groups(batch, keep, G))
            n_kept += int(keep.sum())
        if n_kept >= N:
            break
    stats["rollout/groups_dropped"] = dropped
    if not kept:  # every group constant: nothing to learn from this step
        return _select_groups(first, torch.zeros(N, dtype=torch.bool), G), stats
    out = _concat(kept)
    return _select_groups(out, torch.arange(n_kept) < N, G), stats


# ----------------------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------------------


def grpo_step(policy: Policy, backend: RolloutBackend, task: TaskData, cfg: Config, state: GRPOState) -> dict:
    """One RL step; returns its metrics."""
    rcfg, G, model = cfg.rl, cfg.rl.group_size, policy.model
    t0 = time.time()
    roll, metrics = collect(policy, backend, task, cfg, state)
    backend.release_memory()  # the engine's memory is the update's until the weight sync
    t_rollout = time.time() - t0
    B = len(roll.examples)
    metrics["rollout/groups"] = B // G
    b_adv = group_advantages(roll.rewards, G, rcfg.advantage) if B else torch.zeros(0)  # [B]
    # No learning signal anywhere (every group's rewards equal, no KL term): the gradient is
    # zero, but AdamW would still move the weights on its momentum and weight decay. Skip the
    # update on every rank (the decision is global), count it, keep the schedule in step.
    if rcfg.kl_coef == 0 and dist.all_reduce_sum(float(b_adv.abs().sum()), dist.layout().dp_group) == 0:
        return no_update(model, backend, cfg, state, metrics, t0, t_rollout)
    if B == 0:  # nothing to train on here; other data-parallel ranks may have data
        if dist.world() > 1:  # join their collectives
            dist.global_loss_normalizer(torch.zeros(0, 1), rcfg.loss_agg, dist.layout().dp_group)
            for _epoch in range(rcfg.ppo_epochs):
                dist.all_reduce_gradients(model)
                clip_and_step(model, state.optimizer, state.scheduler, cfg.train.grad_clip,
                              where=f"RL step {state.step + 1}")
        state.step += 1
        backend.sync_weights(model, state.step)
        return reduce_metrics({**metrics, "time/rollout": t_rollout, "time/step": time.time() - t0})

    device = next(model.parameters()).device
    b_batch = make_batch(roll.prompt_ids, roll.response_ids, policy.tokenizer.pad_token_id).to(device)
    b_behaviour = on_positions(roll.behaviour_logprobs, b_batch.mask, 0.0)  # [B, T]
    b_versions = on_positions(roll.versions, b_batch.mask, -1)  # [B, T]
    # Tool-result tokens: no loss, no KL, not in the normaliser (all of which read the mask).
    b_batch.mask *= on_positions(roll.loss_masks, b_batch.mask, 0.0)  # [B, T]
    if rcfg.overlong == "filter":  # truncated responses carry no gradient
        b_batch.mask[roll.truncated.to(device)] = 0.0
    if cfg.rollout.offpolicy == "mask":  # APRIL: drop tokens sampled by older policies
        b_batch.mask *= offpolicy_mask(b_versions, state.step).to(b_batch.mask.dtype)
    # Micro-batches of similar length (sorted), so padding stays small.
    order = sorted(range(B), key=lambda i: len(roll.prompt_ids[i]) + len(roll.response_ids[i]))
    micro = [torch.tensor(order[s : s + rcfg.micro_batch_size]) for s in range(0, B, rcfg.micro_batch_size)]
    # Once per optimizer step, over the whole step batch of every data-parallel rank.
    normalizer = dist.global_loss_normalizer(b_batch.mask, rcfg.loss_agg, dist.layout().dp_group)

    # Old (and reference) log-probs from the trainer, before any update; the engine's own
    # log-probs are only compared (and used for TIS weights), never trusted as "old".
    # Exactly on-policy, the old log-probs are the update pass's own, detached: no pass here.
    skip_old = on_policy_update(cfg)
    old, ref, is_w, gap_sum, gap_n, n_dropped = {}, {}, {}, 0.0, 0, 0
    mb_examples = [[roll.examples[i] for i in rows.tolist()] for rows in micro]  # a video row needs its example
    for k, rows in enumerate(micro):
        mb = b_batch[rows]
        width = mb.input_ids.shape[1]
        if state.reference is not None:
            ref[k] = reference_logprobs(policy, state.reference, mb, mb_examples[k])
        if skip_old:
            continue
        old[k] = policy.logprobs(mb, mb_examples[k])  # [b, T]
        behaviour = b_behaviour[rows, :width]  # [b, T]
        if cfg.rollout.offpolicy == "tis":
            is_w[k] = tis_weights(old[k], behaviour, cfg.rollout.tis_clip)
        on = mb.mask != 0
        gap = (behaviour - old[k]).abs() * on  # [b, T]
        gap_sum += float(gap.sum())
        gap_n += int(on.sum())
        if cfg.rollout.mismatch_threshold > 0:  # whole responses the engine sampled from another policy
            drop = gap.sum(-1) / on.sum(-1).clamp(min=1) > cfg.rollout.mismatch_threshold  # [b]
            b_batch.mask[rows[drop.cpu()]] = 0.0
            n_dropped += int(drop.sum())
    t1 = time.time()
    sums: dict[str, float] = {}
    for _epoch in range(rcfg.ppo_epochs):
        for k, rows in enumerate(micro):
            mb = b_batch[rows]
            adv = b_adv[rows].to(device)

            behaviour = b_behaviour[rows, : mb.input_ids.shape[1]]  # [b, T]

            @row_separable  # every term is one row's, the normaliser fixed for the step
            def loss_fn(logp, mb=mb, adv=adv, k=k, behaviour=behaviour):
                o = old[k] if k in old else logp.detach()  # [b, T]; on-policy: ratio exactly 1
                w = is_w.get(k)
                if k not in old and cfg.rollout.offpolicy == "tis":
                    w = tis_weights(o, behaviour, cfg.rollout.tis_clip)
                loss, m = policy_loss(logp, o, adv, mb.mask, normalizer=normalizer, loss_agg=rcfg.loss_agg,
                                      kind=rcfg.loss, clip_low=rcfg.clip_low, clip_high=rcfg.clip_high,
                                      ref_logprobs=ref.get(k), kl_coef=rcfg.kl_coef, kl_estimator=rcfg.kl_estimator,
                                      is_weights=w)
                if k not in old:  # the engine/trainer gap, per valid token (token-weighted below)
                    on = mb.mask != 0
                    m["logprob/engine_trainer_gap"] = float(((behaviour - o).abs() * on).sum()) / max(1, int(on.sum()))
                return loss, m

            _, m, _ = policy.loss_and_backward(mb, mb_examples[k], loss_fn)
            w = m.pop("tokens/valid", 0.0)
            for key, v in m.items():  # loss/* sum over micro-batches; fractions are token-weighted
                sums[key] = sums.get(key, 0.0) + (v if key.startswith("loss/") else v * w)
            sums["_tokens"] = sums.get("_tokens", 0.0) + w
        # Sum over the world: each replica's loss is already divided by the global normaliser,
        # and each rank of an SP group holds the gradient of its own positions.
        dist.all_reduce_gradients(model)
        lr = state.scheduler.get_last_lr()[0]  # the rate this update uses (the schedule moves on in the step)
        grad_norm = clip_and_step(model, state.optimizer, state.scheduler, cfg.train.grad_clip,
                                  loss=sums.get("loss/policy"), where=f"RL step {state.step + 1}")
    state.step += 1
    backend.sync_weights(model, state.step)  # the one place new weights reach the engine
    n_tok, n_ep = max(1.0, sums.pop("_tokens", 1.0)), rcfg.ppo_epochs
    for key, v in sums.items():
        metrics[key] = v / n_ep if key.startswith("loss/") else v / n_tok
    if not skip_old:
        metrics["logprob/engine_trainer_gap"] = gap_sum / max(1, gap_n)
    metrics.update({
        "advantage/abs_mean": float(b_adv.abs().mean()),
        "rollout/mismatch_masked_frac": n_dropped / B,
        "grad/norm": grad_norm, "lr": lr,
        "train/skipped_steps": skipped_steps(state.optimizer), "train/no_signal_steps": no_signal_steps(state.optimizer),
        "time/rollout": t_rollout, "time/train": time.time() - t1, "time/step": time.time() - t0,
    })
    return reduce_metrics(metrics)


def on_policy_update(cfg: Config) -> bool:
    """Is the update pass's own log-probs, detached, exactly the old log-probs? Then the separate
    no-grad old pass is skipped (as TRL does on-policy): the ratio is exactly 1 and the gradient
    the same. Yes with one PPO epoch (one optimizer step per rollout batch: the weights the pass
    runs are those the old pass would have run) unless something reads the old log-probs
    before the update: engine-mismatch masking (rollout.mismatch_threshold) drops responses
    from the loss by them. APRIL (rollout.partial) keeps the pass too: its samples come from
    older policies, and we keep the proven path there. TIS weights and the engine/trainer gap
    are computed inside the pass from the same numbers."""
    return cfg.rl.ppo_epochs == 1 and cfg.rollout.mismatch_threshold == 0 and not cfg.rollout.partial


def no_update(model, backend, cfg: Config, state: GRPOState, metrics: dict, t0: float, t_rollout: float) -> dict:
    """End a step without touching the weights or the optimizer's moments: the schedule
    advances (it counts RL steps), the count goes up, the engine gets the new version."""
    lr = state.scheduler.get_last_lr()[0]
    count_no_signal(state.optimizer)
    skip_update(state.optimizer, state.scheduler)
    state.step += 1
    if backend is not None:  # offline DPO runs without one
        backend.sync_weights(model, state.step)
    return reduce_metrics({**metrics, "lr": lr, "train/no_signal_steps": no_signal_steps(state.optimizer),
                           "train/skipped_steps": skipped_steps(state.optimizer),
                           "time/rollout": t_rollout, "time/step": time.time() - t0})


def reduce_metrics(metrics: dict) -> dict:
    """Across data-parallel replicas: loss/* are shares of one loss (summed); the rest are
    per-replica means over equal shares (averaged). The ranks of an SP group hold the same
    metrics, so the reduction runs over the DP group."""
    lay = dist.layout()
    if lay.dp_size == 1:
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    summed = dist.all_reduce_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64), lay.dp_group)
    summed_keys = ("loss/", "rollout/groups")  # shares of one total, or counts
    return {**metrics, **{k: float(v) if k.startswith(summed_keys) else float(v) / lay.dp_size
                          for k, v in zip(keys, summed.tolist())}}
