"""The main job: CoT-SFT, then GRPO, with held-out accuracy after each phase.

    load task -> build/load policy -> SFT -> eval -> checkpoint step_0
             -> GRPO steps (eval every rl.eval_every, checkpoint every run.save_every), up to
                rl.steps or, with rl.stop_when_flat, the first window where training reward and
                held-out accuracy are both flat
             -> eval -> final checkpoint -> summary.json, curves.png

`resume=runs/<name>` reloads the newest `checkpoints/step_<N>/` (weights, optimizer,
scheduler, RNG, data position, step) and continues; metrics after step N are discarded,
so a stopped-and-resumed run logs the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from longrl.checkpoint import (DCP_DIR, latest_checkpoint, load_sharded_state, load_trainer_state, save_checkpoint,
                              save_sharded_checkpoint)
from longrl.config import (PLATEAU_DELTA, PLATEAU_WINDOW, Config, config_to_dict, config_to_yaml, eval_cadence, lora_sft,
                           resolve_response_budgets, resolve_rl_lr, response_budget)
from longrl.errors import UserError
from longrl.eval.accuracy import evaluate
from longrl.metrics import MetricsLog, Progress, plot_curves
from longrl.models.load import load_policy
from longrl.parallel import dist, fsdp
from longrl.parallel.sp_train import check_sp_model
from longrl.recipes.common import reward_plateau
from longrl.recipes.dpo import check_preference_data, dpo_step
from longrl.models import lora
from longrl.recipes.grpo import (DataCursor, GRPOState, april_episodes, grpo_step, init_state, make_reference,
                                 needs_reference, turn_limits)
from longrl.recipes.sft import run_sft
from longrl.recipes.tasks import load_task, with_environment
from longrl.rollout import make_backend
from longrl.tracking import eval_samples, make_tracker
from longrl.utils import (library_versions, atomic_write_json, atomic_write_text, pick_device, quiet_libraries, rng_state,
                          seed_everything, set_rng_state)


def prepare_run_dir(cfg: Config) -> Path:
    """A new, empty, locked run directory (see longrl.rundir)."""
    from longrl import rundir

    return rundir.prepare_run_dir(cfg)


def _resume_config(resume: str, overrides: Config) -> tuple[Config, Path, Path]:
    """The saved run's config with the safe overrides applied, its directory (locked) and
    newest verified checkpoint (see longrl.rundir)."""
    from longrl import rundir

    return rundir.resume_config(resume, overrides)


def train(cfg: Config) -> dict:
    t_start = time.time()
    resume_ckpt = None
    if cfg.resume:
        cfg, run_dir, resume_ckpt = _resume_config(cfg.resume, cfg)
    cfg.rl.eval_every = eval_cadence(cfg)  # -1: a third of rl.steps; resolved here, written to config.yaml
    lr_line = resolve_rl_lr(cfg)  # rl.lr=0: by the model; resolved here, written to config.yaml
    ctx = dist.init_from_env()  # torchrun: one process per rank; otherwise a single process
    if cfg.parallel.fsdp:
        fsdp.check_world(ctx.world if ctx.backend else None)
    device = ctx.device if ctx.world > 1 else pick_device(cfg.model.device)
    main = dist.is_main()  # only the main rank writes files and prints
    if cfg.parallel.zero_optimizer and ctx.world == 1:
        raise UserError("parallel.zero_optimizer=true shards the optimizer over torchrun processes; run under "
                        "torchrun --nproc-per-node N, or drop it for one process")
    if cfg.rollout.partial and cfg.parallel.sp_size > 1:
        raise UserError("rollout.partial=true (APRIL) runs with data parallelism but not with sequence parallelism yet: "
                        "use parallel.sp_size=1 or rollout.partial=false")
    dist.setup_layout(cfg.parallel.sp_size)  # SP groups of parallel.sp_size ranks; the rest is data parallel
    if dist.layout().dp_size > cfg.rl.prompts_per_step and cfg.rl.steps > 0:
        raise UserError(f"rl.prompts_per_step={cfg.rl.prompts_per_step} is fewer than the {dist.layout().dp_size} "
                        "data-parallel replicas: every replica needs at least one group per step; raise "
                        "rl.prompts_per_step or use fewer processes")
    quiet_libraries()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    # Everything that can fail on bad input happens before the run directory is touched.
    task, load, as_policy = load_task_and_policy(cfg, device)
    if cfg.rl.algorithm == "dpo" and cfg.rl.dpo_source == "data":
        check_preference_data(task)
    policy = backend = None  # made here for a new run, from the checkpoint for a resumed one (`_run`)
    if resume_ckpt is None:
        model, tokenizer = load(cfg.model, device)
        model = shard(model, cfg)
        task = with_environment(task, cfg, tokenizer)  # tools: their environment (needs the tokenizer's tags)
        policy, backend = as_policy(model, tokenizer), make_backend(cfg, model, tokenizer)
        budgets = derive_response_budgets(cfg, task, tokenizer)  # before config.yaml: it holds the numbers
        for line in (budgets, lr_line, rl_length_line(cfg)):
            if line and main:
                print(line)
        warning = demonstration_length_warning(task, tokenizer, cfg) if main else None
        if warning:
            print(warning, file=sys.stderr)
        check_sp_model(model, cfg.parallel.sp_size, cfg.train.backprop)
        run_dir = prepare_run_dir(cfg) if main else None
        if main:
            atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
            for stale in ("metrics.jsonl", "summary.json"):
                (run_dir / stale).unlink(missing_ok=True)
        run_dir = Path(dist.broadcast_object(str(run_dir) if main else None))
    tracker = make_tracker(cfg.run.report_to, run_dir, config_to_dict(cfg))  # a no-op off the main rank
    log = MetricsLog(run_dir / "metrics.jsonl", tracker=tracker) if main else (lambda record: None)
    try:
        return _run(cfg, task, load, as_policy, policy, backend, run_dir, resume_ckpt, device, log, tracker, t_start)
    finally:
        tracker.close()
        if main:
            from longrl import rundir

            rundir.release_run_dir(run_dir)


def _run(cfg, task, load, as_policy, policy, backend, run_dir, resume_ckpt, device, log, tracker, t_start) -> dict:
    """SFT (or the restored state), then the RL loop, then the summary."""
    main = dist.is_main()
    say = print if cfg.run.progress and main else (lambda *a, **k: None)
    say(f"longrl: task {task.name} ({len(task.train)} train / {len(task.eval)} held-out), run dir {run_dir}")

    def held_out(step: int | None = None) -> dict:
        """Held-out greedy accuracy; at an RL step, a few of its responses go to the trackers."""
        out = evaluate(policy, backend, task.eval, task.score, max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=cfg.eval.batch_size, return_items=True, environment=task.environment,
                       limits=turn_limits(cfg, eval=True))
        items = out.pop("items")
        if step is not None:
            tracker.log_samples(step, eval_samples(items))
        return out

    def redraw() -> None:  # curves at every eval, so a crashed run has them too
        if main:
            plot_curves(log.records, run_dir / "curves.png")

    if resume_ckpt is None:
        model, tokenizer = policy.model, policy.tokenizer
        initial = held_out(step=0 if cfg.sft.steps == 0 else None)
        results = {"accuracy_initial": initial["eval/accuracy"]}
        t_sft = time.time()
        if lora.has_lora(model) and not lora_sft(cfg) and cfg.sft.steps > 0:
            lora.merge_adapter(model)  # full SFT (model.lora.sft false, or auto on the tiny model): the fresh B = 0 merges exactly
        run_sft(policy, task.train, cfg, device, log)
        if cfg.model.lora.r > 0 and cfg.sft.steps > 0:  # SFT's adapter into the base; RL trains a fresh one
            lora.new_adapter(model, cfg.model.lora, base_moved=False)  # step_0 below holds this base
        backend.sync_weights(model, 0)  # the post-SFT policy is version 0 of RL
        results["sft_seconds"] = time.time() - t_sft
        after_sft = held_out(step=0) if cfg.sft.steps > 0 else initial  # no SFT: the same weights, evaluated once
        results["accuracy_after_sft"] = after_sft["eval/accuracy"]
        results["eval_after_sft"] = _split_metrics(after_sft)
        log({"phase": "rl", "step": 0, **after_sft})
        redraw()
        say(f"held-out accuracy: initial {results['accuracy_initial']:.3f}, after SFT {results['accuracy_after_sft']:.3f}")
        state = init_state(model, cfg, len(task.train), backend, april_episodes(task, cfg, tokenizer))
        wall0 = 0.0
        results["wall_seconds"] = time.time() - t_start
        checkpoint(run_dir, 0, model, tokenizer, state, results, cfg)
    else:
        policy, backend, state, results, task = _restore(cfg, resume_ckpt, device, task, load, as_policy)
        model, tokenizer = policy.model, policy.tokenizer
        check_sp_model(model, cfg.parallel.sp_size, cfg.train.backprop)
        if main:
            log.truncate_after(state.step)
        wall0 = results.get("wall_seconds", 0.0)  # the time the run had spent when its checkpoint was written
        say(f"resumed from {resume_ckpt} at RL step {state.step}")

    step_fn = dpo_step if cfg.rl.algorithm == "dpo" else grpo_step
    bar = Progress(cfg.rl.steps, cfg.rl.algorithm, cfg.run.progress, cfg.run.log_every, enabled=main,
                   initial=state.step)
    t_rl, zero_rewards = time.time(), 0
    # The plateau rule's input, checkpointed: reward/mean of every RL step, held-out accuracy by step.
    history = results.setdefault("rl_history", {"reward": [], "held_out": {0: results["accuracy_after_sft"]}})
    stop = results.get("rl_stop") if cfg.rl.stop_when_flat else None  # a resumed run that had stopped stays stopped
    while state.step < cfg.rl.steps and not stop:
        metrics = step_fn(policy, backend, task, cfg, state)
        metrics.update(policy.step_metrics())  # e.g. video encodes run / saved this step
        zero_rewards = zero_rewards + 1 if metrics.get("reward/mean", 1.0) == 0 else 0
        if zero_rewards == ZERO_REWARD_STEPS and main:
            print(zero_reward_warning(state.step, zero_rewards), file=sys.stderr)
        step = state.step
        if (cfg.rl.eval_every and step % cfg.rl.eval_every == 0) or step == cfg.rl.steps:
            metrics.update(held_out(step))
        flat = plateau(cfg, history, metrics, step)
        last = step == cfg.rl.steps or flat is not None
        if flat:
            stop = results["rl_stop"] = f"stopped at RL step {step} of at most {cfg.rl.steps}: {flat}"
            if main:
                print(f"longrl: {stop}")
        if last:
            if "eval/accuracy" not in metrics:  # stopped between held-out points (rl.eval_every set by hand)
                metrics.update(held_out(step))
            results["accuracy_after_rl"] = metrics["eval/accuracy"]
            results["eval_after_rl"] = _split_metrics(metrics)
        log({"phase": "rl", "step": step, **metrics})
        if "eval/accuracy" in metrics:
            redraw()
        bar.update(step, metrics)
        if step % cfg.run.save_every == 0 or last:
            results["wall_seconds"] = wall0 + time.time() - t_start
            checkpoint(run_dir, step, model, tokenizer, state, results, cfg)
    bar.close()
    if cfg.rl.steps == 0:
        results["accuracy_after_rl"] = results["accuracy_after_sft"]
        results["eval_after_rl"] = results.get("eval_after_sft", {})
    results["rl_seconds"] = results.get("rl_seconds", 0.0) + time.time() - t_rl

    summary = {
        "task": task.name,
        "accuracy_initial": results.get("accuracy_initial"),
        "accuracy_after_sft": results["accuracy_after_sft"],
        "accuracy_after_rl": results["accuracy_after_rl"],
        "rl_gain": results["accuracy_after_rl"] - results["accuracy_after_sft"],
        "rl_steps": state.step,
        "rl_stop": results.get("rl_stop"),
        "sft_steps": cfg.sft.steps,
        "n_eval": len(task.eval),
        "wall_seconds": wall0 + time.time() - t_start,  # the whole run, across resumes
        "checkpoint": str(latest_checkpoint(run_dir)),
        "run_dir": str(run_dir),
        "rollout_backend": backend.name,
        **({"eval_after_sft": results["eval_after_sft"], "eval_after_rl": results.get("eval_after_rl", {})}
           if results.get("eval_after_sft") else {}),
        "versions": library_versions(),
        **policy.summary(),
    }
    if main:
        atomic_write_json(run_dir / "summary.json", summary)
        redraw()
    return summary



def _split_metrics(ev: dict) -> dict:
    """The held-out figures beyond accuracy that a run's summary keeps: per question group
    (e.g. needs_search / no_search), and tool use per question."""
    return {k: v for k, v in ev.items() if k.startswith(("eval/accuracy/", "eval/tool_calls", "eval/turns"))}


def checkpoint(run_dir, step, model, tokenizer, state, results, cfg) -> None:
    """The main rank writes; every rank waits, so none runs ahead of a half-written step.
    Each rank's own state (sampler, data cursor, APRIL's parked samples, RNG) is gathered
    into the checkpoint, so a resumed torchrun run continues every rank where it was."""
    ranks = dist.all_gather_object(_rank_state(state)) if dist.world() > 1 else [_rank_state(state)]
    if fsdp.is_sharded(model):  # every rank writes its shards (DCP); the optimizer is not in the trainer state
        saved = _trainer_state(state, results, ranks, optimizer=False) if dist.is_main() else None
        save_sharded_checkpoint(run_dir, step, model, tokenizer, saved, state.optimizer, cfg.run.keep_checkpoints)
        return
    if hasattr(state.optimizer, "consolidate_state_dict"):  # ZeRO-1: the moments are gathered on rank 0
        state.optimizer.consolidate_state_dict(to=0)
    if dist.is_main():
        save_checkpoint(run_dir, step, model, tokenizer, _trainer_state(state, results, ranks), cfg.run.keep_checkpoints)
    dist.barrier()


def _rank_state(state: GRPOState) -> dict:
    return {
        "sampler": state.sampler.get_state(),
        "cursor": {"epoch": state.cursor.epoch, "index": state.cursor.index},
        # APRIL's parked samples (plain dataclasses), so a resumed run resumes them too.
        "april": None if state.april is None else {"buffer": state.april.buffer,
                                                   "next_group_id": state.april.next_group_id},
        "rng": rng_state(),
    }


def _trainer_state(state: GRPOState, results: dict, ranks: list[dict], optimizer: bool = True) -> dict:
    return {
        "step": state.step,
        "optimizer": state.optimizer.state_dict() if optimizer else None,
        "scheduler": state.scheduler.state_dict(),
        "results": dict(results),
        "ranks": ranks,  # one `_rank_state` per process, in rank order
        **ranks[0],  # also at the top level, as checkpoints before per-rank state had it
    }


def _saved_rank_state(saved: dict, ckpt: Path, cfg: Config) -> dict:
    """This rank's part of a checkpoint. Resuming on another number of processes is exact
    only where the ranks' states agree: without APRIL every rank continues from rank 0's
    data position; APRIL's per-rank prompt streams and parked samples cannot be re-split."""
    ranks = saved.get("ranks") or [saved]  # checkpoints before per-rank state: one entry
    if len(ranks) == dist.world():
        return ranks[dist.rank()]
    if cfg.rollout.partial:
        raise UserError(f"checkpoint {ckpt} holds APRIL state for {len(ranks)} process(es) and this run has "
                        f"{dist.world()}: resume with the same number (torchrun --nproc-per-node {len(ranks)})")
    return {**ranks[0], "sampler": torch.Generator().manual_seed(cfg.train.seed + 1 + dist.rank()).get_state()}


def rl_length_line(cfg: Config) -> str | None:
    """The line a run reports at its start when rl.stop_when_flat may end it early."""
    if not cfg.rl.stop_when_flat or cfg.rl.dpo_rounds > 1 or cfg.rl.steps < 2 * PLATEAU_WINDOW:
        return None
    return (f"longrl: rl.steps = {cfg.rl.steps} at most: from step {2 * PLATEAU_WINDOW}, at every "
            f"{PLATEAU_WINDOW}-step window's end, RL stops once neither the training reward (mean of the window's "
            f"last {PLATEAU_WINDOW // 2} steps) nor the held-out accuracy is {PLATEAU_DELTA:g} above its best "
            "earlier value; rl.stop_when_flat=false runs exactly rl.steps")


def plateau(cfg: Config, history: dict, metrics: dict, step: int) -> str | None:
    """Record this step's training reward and held-out accuracy; the plateau rule's reason to
    stop here, or None. Off for multi-round DPO (a round must end where it merges) and when the
    history has a gap (a checkpoint from before the history was kept)."""
    if "reward/mean" in metrics:
        history["reward"].append(float(metrics["reward/mean"]))
    if "eval/accuracy" in metrics:
        history["held_out"][step] = float(metrics["eval/accuracy"])
    if not cfg.rl.stop_when_flat or cfg.rl.dpo_rounds > 1 or len(history["reward"]) != step:
        return None
    return reward_plateau(history["reward"], history["held_out"], PLATEAU_WINDOW, PLATEAU_DELTA)


ZERO_REWARD_STEPS = 5
"""RL steps in a row with reward 0 on every sample before `longrl train` warns (once per streak)."""


def zero_reward_warning(step: int, n: int) -> str:
    return (f"warning: every sample scored reward 0 for {n} RL steps in a row (steps {step - n + 1}-{step}): "
            "nothing to learn from (without a KL term those steps make no update). Check that responses have the answer format "
            "the verifier reads (model.system_prompt, reward.correctness), that the response budget fits "
            "(rollout.max_new_tokens), or whether a learning rate broke the model (rl.lr)")


def demonstration_lengths(task, tokenizer) -> list[int]:
    """Token length of each training example's SFT demonstration, EOS counted."""
    from longrl.data.registry import demonstration

    return [len(tokenizer(demonstration(ex), add_special_tokens=False)["input_ids"]) + 1 for ex in task.train]


def derive_response_budgets(cfg: Config, task, tokenizer, sections: tuple[str, ...] = ("rollout", "eval")) -> str | None:
    """Resolve the `sections`' max_new_tokens left at 0 from the task's demonstrations, in
    place (`config.resolve_response_budgets`); the line to report, or None when all were set."""
    if all(getattr(cfg, k).max_new_tokens for k in sections):
        return None
    return resolve_response_budgets(cfg, demonstration_lengths(task, tokenizer), sections)


def demonstration_length_warning(task, tokenizer, cfg: Config) -> str | None:
    """A warning when SFT would teach responses longer than rollouts and evaluation may
    generate (they would be cut off and score 0), or None. Text tasks only. A budget left
    at 0 counts as the one it will be derived as."""
    if cfg.sft.steps == 0 or not task.train:
        return None
    lengths = demonstration_lengths(task, tokenizer)
    derived = response_budget(lengths)
    limit = min(cfg.rollout.max_new_tokens or derived, cfg.eval.max_new_tokens or derived)
    over = sum(n > limit for n in lengths)
    if not over:
        return None
    return (f"warning: {over} of {len(lengths)} SFT demonstrations are longer than the {limit} new tokens that "
            f"rollouts and evaluation may generate (longest {max(lengths)} tokens with EOS); those responses "
            f"will be cut off and score 0. Raise rollout.max_new_tokens and eval.max_new_tokens, or shorten the task.")


def load_task_and_policy(cfg: Config, device=None):
    """(task, load, as_policy): `load(model_cfg, device) -> (model, tokenizer)` and
    `as_policy(model, tokenizer) -> Policy`. Video tasks (`task.name=videos`) get the video
    question set, the VLM loader and `VideoPolicy`; text tasks the registry, `load_policy`
    and `TextPolicy`. With reward.correctness=judge the task's scorer is the judge model
    (loaded on `device`)."""
    from longrl.data import video_task

    judged = cfg.reward.correctness == "judge"
    if cfg.task.name != video_task.TASK_NAME:
        from longrl.policy.text import TextPolicy

        task = load_task(cfg.task, "auto" if judged else cfg.reward.correctness, cfg.reward.extract)
        load, as_policy = load_policy, lambda model, tok: TextPolicy.from_config(model, tok, cfg)
        if cfg.tools.enabled:  # the tiny tokenizer gets one token per tool-call tag
            from functools import partial

            from longrl.models.tiny import TOOL_TOKENS

            load = partial(load_policy, extra_tokens=tuple(TOOL_TOKENS))
    else:
        from longrl.policy.video import VideoPolicy, load_video_policy
        from longrl.rewards.verifiers import answer_scorer

        # Multiple-choice letters by default; a judge replaces the scorer below.
        task = video_task.load_video_task(cfg, answer_scorer("mcq" if cfg.reward.correctness in ("auto", "judge")
                                                             else cfg.reward.correctness, cfg.reward.extract))

        from longrl.models.tiny import TOOL_TOKENS

        def load(model_cfg, device):  # tools.enabled: the tiny tokenizer gets one token per tool-call tag
            return load_video_policy(model_cfg, device, train_vision=cfg.video.train_vision,
                                     extra_tokens=tuple(TOOL_TOKENS) if cfg.tools.enabled else ())

        def as_policy(model, tok):
            return VideoPolicy(model, tok, task, cfg)
    if cfg.train.dtype != "float32":  # mixed precision: fp32 weights, layers under autocast
        load = _in_compute_dtype(load, cfg.train.dtype)
    if cfg.reward.correctness == "judge":
        from longrl.models.load import DTYPES
        from longrl.rewards.judge import Judge, judge_scorer

        judge = Judge(cfg.reward.judge_model, device or pick_device(cfg.model.device), cfg.reward.judge_template,
                      DTYPES[cfg.model.dtype])
        task = replace(task, score=judge_scorer(judge))
    return task, load, as_policy


def _in_compute_dtype(load, dtype: str):
    """`load` whose models run their decoder layers in `dtype` (`models.precision`)."""
    from longrl.models.precision import set_compute_dtype

    def load_mixed(model_cfg, device):
        model, tokenizer = load(model_cfg, device)
        return set_compute_dtype(model, dtype), tokenizer

    return load_mixed


def shard(model, cfg: Config):
    """`model` wrapped with FSDP2 when parallel.fsdp (collective), else as it is."""
    return fsdp.shard_model(model, offload=cfg.parallel.fsdp_offload) if cfg.parallel.fsdp else model


def _restore(cfg: Config, ckpt: Path, device, task, load, as_policy):
    """Weights from the checkpoint directory, then the trainer state on top.
    -> (policy, backend, state, results, task with its environment)"""
    n_train = len(task.train)
    model, tokenizer = load(replace(cfg.model, path=str(ckpt)), device)
    model = shard(model, cfg)
    task = with_environment(task, cfg, tokenizer)
    if lora.has_lora(model):  # the saved weights are merged: take base and adapter from their files
        lora.restore_lora(model, ckpt, ckpt.parent / "step_0")
    policy, backend = as_policy(model, tokenizer), make_backend(cfg, model, tokenizer)
    saved = load_trainer_state(ckpt)
    state = init_state(model, replace(cfg, rl=replace(cfg.rl, kl_coef=0.0, algorithm="grpo")), n_train, backend,
                       april_episodes(task, cfg, tokenizer))
    if needs_reference(cfg) and lora.has_lora(model):  # the base under the adapter
        state.reference = make_reference(model)
    elif needs_reference(cfg):  # the reference is the post-SFT policy, kept as step_0
        ref, _ = load(replace(cfg.model, path=str(ckpt.parent / "step_0")), device)
        state.reference = ref.eval().requires_grad_(False)
    if (ckpt / DCP_DIR).is_dir():  # FSDP2: weights and moments resharded to this run's processes
        load_sharded_state(ckpt, model, state.optimizer, saved["optimizer_param_groups"])
    else:
        state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.step = saved["step"]
    mine = _saved_rank_state(saved, ckpt, cfg)
    state.sampler.set_state(mine["sampler"])
    state.cursor = DataCursor(cfg.train.seed, n_train, **mine["cursor"])
    if state.april is not None and mine.get("april"):
        state.april.buffer = mine["april"]["buffer"]
        state.april.next_group_id = mine["april"]["next_group_id"]
    backend.sync_weights(model, state.step)
    set_rng_state(mine["rng"])
    return policy, backend, state, dict(saved["results"]), task
