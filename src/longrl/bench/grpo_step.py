"""Benchmark: one GRPO step of longrl vs the same step with TRL's `GRPOTrainer`.

    longrl bench grpo-step --json [--prompts 8] [--group-size 8] [--max-new-tokens 32] [--steps 3]
    python -m longrl.bench.grpo_step --json [...] [key=value ...]

One GRPO step = sample G responses for each of N prompts, score them, group-normalise the
rewards, one clipped policy-gradient update (PPO-clip, token-mean loss, no KL, no reference
model), one AdamW step. Both sides get:
- the same model and weights: each side builds the policy from the same config and seed
  (`load_policy`, the tiny default unless `model.path=...`); a checksum of the initial
  weights is reported per side and must match;
- the same prompts in the same order: the exact prompts longrl's data cursor feeds each step
  become TRL's dataset, read unshuffled, so step s sees the same N prompts on both sides;
- the same reward: `score_responses` with the task's scorer and format weight (TRL's reward
  function decodes the completion ids itself, keeping the format tags that TRL's
  `skip_special_tokens=True` decoding would drop);
- the same group size, response budget, temperature (1.0), top-p, learning rate, AdamW
  betas, weight decay, grad clip, clip range (0.2 / 0.28) and token-mean loss (TRL's `dapo`);
  one optimizer step per generation (TRL: steps_per_generation=1, num_iterations=1), one
  micro-batch of N*G sequences unless `--micro-batch` says otherwise.

What differs is the implementation: longrl's own KV-cache engine and chunked log-probs
(StreamBP) vs TRL's `model.generate` and full-logit forward. TRL's own default of gradient
checkpointing is kept (`--trl-gradient-checkpointing off` turns it off). The step is exactly
on-policy (one epoch, one optimizer step), so neither side runs a separate old log-prob
forward: both take old = the update pass's own log-probs, detached (longrl:
`grpo.on_policy_update`; its row groups of train.pass_tokens positions each take their share
of the loss's gradient right after their forward, `streambp.logprobs.row_separable`). With the tiny default (vocabulary ~100, sequences ~60 tokens) logits are small, so the
memory saving barely shows; give `model.path=DIR` (or raise `model.tiny.*`) to see it.

`--reward parity` (the fraction of even code points in the response) replaces the task's
scorer on both sides: an untuned instruct model earns 0 on every task answer, and longrl (rightly)
makes no update on a step without signal, which would leave nothing to compare.

The longrl side also reports `phases` (seconds, CPU seconds and peak-RSS rise of the rollout's
prefill and decode, the old/reference log-prob passes, the training pass and its body forward
and head, the optimizer step) and `training_pass`: its model FLOPs (counted from the config,
`bench/profile.py` says which), their rate, and that rate against the float32 matmul peak
measured in the same process on the same thread count (`fraction_of_peak`; by CPU time too,
which leaves out the time a shared machine's other load held the core).

Each side runs in its own subprocess so that peak memory is not polluted by the other: the
child's own `ru_maxrss` (`peak_rss_mb`; on CUDA also `torch.cuda.max_memory_allocated` over the
steps) and the kernel's account of the whole child read by the parent with `wait4`
(`process_peak_rss_mb`, the same measure for both sides, `process_peak_rss_ratio`). Either
includes each side's imports (TRL pulls in accelerate and datasets), so `rss_before_steps_mb`
is reported too. Step time is the median over `--steps` steps after `--warmup` discarded
steps; on TRL it is the time between consecutive `on_step_end` callbacks, which spans
generation, reward, loss, backward and the optimizer step, like a longrl `grpo_step` call.
The ratios are trl / longrl: above 1 means longrl is faster or lighter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

RESULT_TAG = "GRPO_STEP_RESULT "


def _parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="longrl bench grpo-step", description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8, help="prompts (groups) per step, N")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt, G")
    p.add_argument("--max-new-tokens", type=int, default=32, help="response budget in tokens")
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per forward/backward (0: all N*G)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side and round (median reported)")
    p.add_argument("--rounds", type=int, default=2,
                   help="side processes per side, alternating which goes first (evens out machine-load drift)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones (at least 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate, both sides")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each side (0: torch default)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-length", action="store_true",
                   help="every response runs to --max-new-tokens on both sides (longrl: the hf engine ignores EOS; "
                        "TRL: min_new_tokens), so both sides do the same work whatever they sample")
    p.add_argument("--reward", choices=["task", "parity"], default="task",
                   help="task: the task's scorer; parity: the fraction of the response's characters with an even "
                        "code point, a reward that is never constant over a group, so that every step trains on "
                        "both sides (an untuned instruct model scores 0 on every task answer: no update to time)")
    p.add_argument("--trl-gradient-checkpointing", choices=["on", "off"], default="on",
                   help="TRL's gradient checkpointing (on is GRPOConfig's default)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per side")
    p.add_argument("--side", choices=["both", "longrl", "trl"], default="both", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the JSON result (python -m)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="longrl config overrides for both sides, e.g. model.path=DIR task.name=sort")
    opt = p.parse_args(args)
    if opt.warmup < 1 or opt.steps < 1 or opt.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1 (the first step pays one-off costs)")
    return opt


def _config(opt):
    from longrl.config import load_config

    n_seqs = opt.prompts * opt.group_size
    micro = opt.micro_batch or n_seqs
    if n_seqs % micro:
        from longrl.errors import UserError

        raise UserError(f"--micro-batch={micro} must divide prompts*group_size={n_seqs} (TRL needs whole micro-batches)")
    base = [f"rl.prompts_per_step={opt.prompts}", f"rl.group_size={opt.group_size}",
            f"rollout.max_new_tokens={opt.max_new_tokens}", "rollout.temperature=1.0",
            f"rl.micro_batch_size={micro}", f"rl.lr={opt.lr}", "rl.warmup_steps=0", "rl.kl_coef=0",
            "rl.ppo_epochs=1", "rl.loss=ppo", "rl.loss_agg=token-mean", "rl.advantage=grpo",
            "rl.dynamic_sampling=false", "rl.overlong=none", f"train.seed={opt.seed}",
            f"train.threads={opt.threads}", f"model.device={opt.device}", "run.progress=false",
            f"task.n_train={max(64, opt.prompts * (opt.warmup + opt.steps))}", "task.n_eval=8"]
    return load_config(None, base + list(opt.overrides))


def _setup(opt):
    """Config, task, freshly built policy and the per-step prompt order: identical on both sides."""
    import torch

    from longrl.recipes.tasks import load_task
    from longrl.models.load import load_policy
    from longrl.recipes.grpo import DataCursor
    from longrl.utils import pick_device, quiet_libraries, seed_everything

    cfg = _config(opt)
    if opt.threads > 0:
        torch.set_num_threads(opt.threads)
    quiet_libraries()
    device = pick_device(cfg.model.device)
    seed_everything(cfg.train.seed)
    task = load_task(cfg.task, cfg.reward.correctness)
    if opt.reward == "parity":
        task = replace(task, score=parity_reward)
    model, tokenizer = load_policy(cfg.model, device)
    cursor = DataCursor(cfg.train.seed, len(task.train))  # what init_state builds
    order = [cursor.take(opt.prompts) for _ in range(opt.warmup + opt.steps)]
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return cfg, task, model, tokenizer, device, order, checksum


def parity_reward(text: str, example) -> float:
    """`--reward parity`: the fraction of the characters of `text` with an even code point."""
    return sum(ord(c) % 2 == 0 for c in text) / max(1, len(text))


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (Linux: ru_maxrss is KiB)."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _summary(times: list[float], cpu: list[float], rollout: list[float], opt, device, rss_before: float,
             checksum: float, extra: dict) -> dict:
    """Medians over the timed steps (the first `opt.warmup` are dropped), memory, provenance."""
    import torch

    w = opt.warmup
    peak = _rss_mb()[1]
    out = {
        "step_seconds": statistics.median(times[w:]),
        "step_cpu_seconds": statistics.median(cpu[w:]),
        "rollout_seconds": statistics.median(rollout[w:]),
        "step_seconds_all": [round(t, 4) for t in times],
        "warmup_steps": w,
        "rss_before_steps_mb": round(rss_before, 1),
        "peak_rss_mb": round(peak, 1),
        # ru_maxrss never falls, so this is the growth only when the steps set the peak
        "rss_growth_during_steps_mb": round(max(0.0, peak - rss_before), 1),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "initial_weights_checksum": checksum,
        **extra,
    }
    if device.type == "cuda":
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


# ----------------------------------------------------------------------------------------
# The two sides (each runs in its own process)
# ----------------------------------------------------------------------------------------


def run_longrl_side(opt) -> dict:
    import torch

    from longrl.bench.profile import best_peak, matmul_peak
    from longrl.errors import UserError
    from longrl.policy.text import TextPolicy
    from longrl.recipes.grpo import grpo_step, init_state
    from longrl.rollout import make_backend

    cfg, task, model, tokenizer, device, order, checksum = _setup(opt)
    policy, backend = TextPolicy.from_config(model, tokenizer, cfg), make_backend(cfg, model, tokenizer)
    if opt.full_length:
        if backend.name != "hf":
            raise UserError("--full-length needs rollout.backend=hf")
        backend.eos_id = -1  # no token ends a row: every row decodes max_new_tokens
    state = init_state(model, cfg, len(task.train), backend)
    clock, passes = _instrument(policy, backend, state)
    peak = matmul_peak() if device.type == "cpu" else None  # same process, same threads as the step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _rss_mb()[0]
    times, cpu, rollout, lengths, rewards = [], [], [], [], []
    for _ in order:
        clock.start_step()
        passes.append([])
        t0, c0 = time.perf_counter(), time.process_time()
        m = grpo_step(policy, backend, task, cfg, state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        rollout.append(m["time/rollout"])
        lengths.append(m["rollout/response_len"])
        rewards.append(m["reward/mean"])
    if peak is not None:
        peak = best_peak(peak, matmul_peak())
    phases = clock.summary(opt.warmup)
    return _summary(times, cpu, rollout, opt, device, rss_before, checksum, {
        "response_len_mean": statistics.fmean(lengths), "response_len_per_step": lengths,
        "reward_mean": statistics.fmean(rewards),
        "backprop": cfg.train.backprop, "phases": phases,
        "training_pass": _training_rate(model, passes[opt.warmup:], phases, peak)})


def _instrument(policy, backend, state):
    """Time the phases of the recipe's own step (see `bench/profile.py`); record each training
    pass's rows for the FLOP count."""
    import torch

    from longrl.bench.profile import PhaseClock
    from longrl.streambp import logprobs as streambp

    clock, passes = PhaseClock(), []
    model = policy.model
    clock.wrap(backend, "generate", "rollout/generate")
    def forward_phase(a, k):  # the top model's forward runs in the rollout (and in backprop=standard)
        ids = k.get("input_ids", a[0] if a else None)
        if torch.is_grad_enabled():
            return "train/full_forward"
        return "rollout/prefill" if ids is None or ids.shape[1] > 1 else "rollout/decode"

    clock.wrap(model, "forward", forward_phase)
    clock.wrap(policy, "logprobs", lambda a, k: "logprobs/reference" if k.get("model") is not None else "logprobs/old")
    clock.wrap(streambp, "final_hidden", lambda a, k: "train/body_forward" if torch.is_grad_enabled() else
               "logprobs/body_forward")
    clock.wrap(streambp, "head_backward", "train/head_backward")  # the LM head with grad, chunk by chunk
    clock.wrap(state.optimizer, "step", "train/optimizer")
    loss_and_backward = policy.loss_and_backward

    def counted(batch, *a, **k):
        mask = batch.mask != 0  # [b, T]
        cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        lengths = (torch.where(mask, cols, -2).amax(1) + 2).tolist()  # real tokens: last target + 1 + 1
        passes[-1].append((lengths, int(mask.sum()), mask.numel()))
        return loss_and_backward(batch, *a, **k)

    policy.loss_and_backward = counted
    clock.wrap(policy, "loss_and_backward", "train/pass")
    return clock, passes


def _training_rate(model, passes: list[list], phases: dict, peak: dict | None) -> dict | None:
    """Model FLOPs of the timed steps' training passes over their time, against the matmul peak."""
    import torch

    from longrl.bench.profile import decoder_shape, training_flops

    shape = decoder_shape(model.config)
    if shape is None or "train/pass" not in phases:
        return None
    n_steps = len(passes)
    flops = [training_flops(shape, lengths, head) for step in passes for lengths, head, _ in step]
    per_step = {k: sum(f[k] for f in flops) / n_steps for k in ("training", "layers", "attention", "head", "tokens")}
    seconds, cpu_seconds = phases["train/pass"]["seconds"], phases["train/pass"]["cpu_seconds"]
    out = {"model_flops_per_step": per_step["training"], "flops_split": {k: per_step[k] for k in ("layers", "attention", "head")},
           "real_tokens_per_step": per_step["tokens"],
           "padded_tokens_per_step": sum(n for step in passes for *_, n in step) / n_steps,
           "seconds_per_step": seconds, "cpu_seconds_per_step": cpu_seconds,
           "gflops": per_step["training"] / seconds / 1e9 if seconds > 0 else None,
           # CPU time leaves out the time other processes held the cores (x threads: all threads worked)
           "gflops_by_cpu_time": per_step["training"] / cpu_seconds * torch.get_num_threads() / 1e9 if cpu_seconds > 0 else None,
           "shape": shape, "convention": "model FLOPs: 6 x layer matmul weights x real tokens + causal attention "
           "+ 6 x D x V x response tokens; no recompute, no padding (bench/profile.py)"}
    if peak is not None:
        out["matmul_peak"] = peak
        out["fraction_of_peak"] = out["gflops"] / peak["gflops"] if out["gflops"] else None
        out["fraction_of_peak_by_cpu_time"] = (out["gflops_by_cpu_time"] / peak["gflops"]
                                               if out["gflops_by_cpu_time"] else None)
    return out


def _trl_args(opt, cfg, device, out_dir: str):
    """GRPOConfig for the same step: N*G sequences, one generation and one AdamW step per step."""
    from trl import GRPOConfig

    n_seqs, micro = opt.prompts * opt.group_size, cfg.rl.micro_batch_size
    return GRPOConfig(
        output_dir=out_dir, use_cpu=device.type == "cpu", bf16=False, fp16=False, use_vllm=False,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        seed=cfg.train.seed, max_steps=opt.warmup + opt.steps, shuffle_dataset=False, dataloader_pin_memory=False,
        # per-device batch counts completions; generation batch = micro * accumulation = N*G
        per_device_train_batch_size=micro, gradient_accumulation_steps=n_seqs // micro,
        num_generations=opt.group_size, max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=0,
        generation_kwargs={"use_cache": True, **({"min_new_tokens": cfg.rollout.max_new_tokens} if opt.full_length else {})},
        beta=0.0, num_iterations=1, epsilon=cfg.rl.clip_low, epsilon_high=cfg.rl.clip_high,
        loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,  # dapo = token-mean
        learning_rate=cfg.rl.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.99,
        weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.grad_clip,
        gradient_checkpointing=opt.trl_gradient_checkpointing == "on",
    )


def _trl_reward(tokenizer, task, cfg, lengths: list, seen: list):
    """longrl's reward as a TRL reward function. It decodes the completion ids itself, since
    TRL's `completions` text is decoded with skip_special_tokens=True and loses the format tags."""
    from longrl.eval.accuracy import decode_response
    from longrl.rewards.combine import score_responses

    def reward_fn(prompts, completions, completion_ids, example_index, **_):
        texts = [decode_response(tokenizer, list(ids)) for ids in completion_ids]
        lengths.append(statistics.fmean(len(ids) for ids in completion_ids))
        seen.append(sorted(example_index))
        rewards, _parts = score_responses(texts, [task.train[i] for i in example_index], task.score,
                                          cfg.reward.correctness_weight, cfg.reward.format_weight)
        return rewards.tolist()

    return reward_fn


def run_trl_side(opt) -> dict:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"  # no hub calls: model, tokenizer and data are all built here
    os.environ.setdefault("WANDB_DISABLED", "true")
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from longrl.eval.accuracy import encode_prompts
    from longrl.models.load import format_prompt

    cfg, task, model, tokenizer, device, order, checksum = _setup(opt)
    model.config.use_cache = True  # load_policy turns it off for training; HF generate wants it
    # The prompts longrl's cursor feeds each step, in order; TRL reads them unshuffled.
    rows = [i for step in order for i in step]
    dataset = Dataset.from_dict({"prompt": [format_prompt(tokenizer, task.train[i].prompt) for i in rows],
                                 "example_index": rows})
    # TRL tokenises the prompt text itself; it must give the ids longrl's engine gets.
    same_ids = ([tokenizer(text=p)["input_ids"] for p in dataset["prompt"]]
                == encode_prompts(tokenizer, [task.train[i] for i in rows]))
    lengths: list[float] = []
    seen: list[list[int]] = []  # example indices scored at each step
    marks: list[tuple[float, float]] = []  # (wall, cpu) at the first step's start and every step's end
    rollout_seconds: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not marks:
                marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory(prefix="longrl-bench-trl-") as out_dir:
        args = _trl_args(opt, cfg, device, out_dir)
        trainer = GRPOTrainer(model=model, reward_funcs=_trl_reward(tokenizer, task, cfg, lengths, seen), args=args,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[StepClock()])
        # Sampling + reward + advantages: the counterpart of longrl's time/rollout.
        generate_and_score = trainer._generate_and_score_completions

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = generate_and_score(*a, **k)
            rollout_seconds.append(time.perf_counter() - t0)
            return out

        trainer._generate_and_score_completions = timed
        if opt.threads > 0:
            torch.set_num_threads(opt.threads)  # in case accelerate changed it
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = _rss_mb()[0]
        trainer.train()
    times = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    if len(times) != len(order):
        raise RuntimeError(f"TRL ran {len(times)} optimizer steps, expected {len(order)}")
    same_prompts = seen == [sorted(i for i in step for _ in range(opt.group_size)) for step in order]
    return _summary(times, cpu, rollout_seconds, opt, device, rss_before, checksum, {
        "response_len_mean": statistics.fmean(lengths), "response_len_per_step": lengths, "trl_version": trl.__version__,
        "same_prompts_per_step_as_longrl": same_prompts, "same_prompt_ids_as_longrl": same_ids,
        "gradient_checkpointing": args.gradient_checkpointing, "loss_type": args.loss_type,
        "generations_per_step": args.generation_batch_size})


# ----------------------------------------------------------------------------------------
# Plumbing: one subprocess per side, then the report
# ----------------------------------------------------------------------------------------


def _child_args(opt, side: str) -> list[str]:
    args = ["--side", side, "--prompts", str(opt.prompts), "--group-size", str(opt.group_size),
            "--max-new-tokens", str(opt.max_new_tokens), "--micro-batch", str(opt.micro_batch),
            "--steps", str(opt.steps), "--warmup", str(opt.warmup), "--lr", repr(opt.lr),
            "--threads", str(opt.threads), "--device", opt.device, "--seed", str(opt.seed),
            "--trl-gradient-checkpointing", opt.trl_gradient_checkpointing, "--reward", opt.reward,
            *(["--full-length"] if opt.full_length else [])]
    return args + list(opt.overrides)


def _run_child(opt, side: str) -> dict:
    cmd = [sys.executable, "-m", "longrl.bench.grpo_step", *_child_args(opt, side)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if opt.threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(opt.threads)
    t0 = time.time()
    returncode, stdout, stderr, maxrss_kib = _run_measured(cmd, env, opt.timeout)
    if returncode is None:
        return {"error": f"{side} side did not finish within --timeout={opt.timeout}s"}
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            result["process_seconds"] = round(time.time() - t0, 1)
            # the kernel's peak RSS of the whole child, read by this process: the same measure for both sides
            result["process_peak_rss_mb"] = round(maxrss_kib / 1024, 1)
            return result
    tail = (stderr or stdout).strip().splitlines()[-15:]
    return {"error": f"{side} side exited with status {returncode} and no result", "stderr_tail": tail}


def _run_measured(cmd: list[str], env: dict, timeout: float):
    """Run `cmd`; (exit status or None on timeout, stdout, stderr, its peak RSS in KiB from wait4)."""
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        killed = []
        timer = threading.Timer(timeout, lambda: (killed.append(True), proc.kill()))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        return None if killed else proc.returncode, out.read(), err.read(), usage.ru_maxrss


def _merge_rounds(results: list[dict]) -> dict:
    """One side's rounds: median of times, max of memory; a failed round fails the side."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    out = dict(results[0])
    for key in ("step_seconds", "step_cpu_seconds", "rollout_seconds"):
        out[key] = statistics.median(r[key] for r in results)
    for key in ("peak_rss_mb", "process_peak_rss_mb", "rss_before_steps_mb", "rss_growth_during_steps_mb",
                "peak_cuda_allocated_mb"):
        if key in out:
            out[key] = max(r[key] for r in results)
    for key in ("same_prompts_per_step_as_longrl", "same_prompt_ids_as_longrl"):
        if key in out:
            out[key] = all(r[key] for r in results)
    out["response_len_mean"] = statistics.fmean(r["response_len_mean"] for r in results)
    out["step_seconds_all"] = [r["step_seconds_all"] for r in results]  # one list per round
    out["process_seconds"] = round(sum(r["process_seconds"] for r in results), 1)
    if len({r["initial_weights_checksum"] for r in results}) != 1:
        out["initial_weights_checksum"] = None  # rounds disagree: flagged as different weights
    return out


def _ratio(trl_side: dict, longrl_side: dict, key: str):
    if key in trl_side and key in longrl_side and longrl_side[key] > 0:
        return trl_side[key] / longrl_side[key]
    return None


def run(args: list[str]) -> dict:
    opt = _parse(args)
    if opt.side != "both":
        return (run_longrl_side if opt.side == "longrl" else run_trl_side)(opt)
    cfg = _config(opt)  # bad overrides fail here, before any subprocess
    per_round: dict[str, list[dict]] = {"longrl": [], "trl": []}
    for r in range(opt.rounds):
        for side in ("longrl", "trl") if r % 2 == 0 else ("trl", "longrl"):
            print(f"grpo-step: round {r + 1}/{opt.rounds}: running the {side} side ...", file=sys.stderr)
            per_round[side].append(_run_child(opt, side))
    sides = {side: _merge_rounds(results) for side, results in per_round.items()}
    ok = all("error" not in s for s in sides.values())
    sums = [sides[side].get("initial_weights_checksum") for side in ("longrl", "trl")]
    same_weights = ok and sums[0] is not None and sums[0] == sums[1]
    report = {
        "benchmark": "grpo-step",
        "longrl": sides["longrl"],
        "trl": sides["trl"],
        "step_time_ratio": _ratio(sides["trl"], sides["longrl"], "step_seconds"),
        "step_cpu_time_ratio": _ratio(sides["trl"], sides["longrl"], "step_cpu_seconds"),
        "rollout_time_ratio": _ratio(sides["trl"], sides["longrl"], "rollout_seconds"),
        "peak_rss_ratio": _ratio(sides["trl"], sides["longrl"], "peak_rss_mb"),
        "process_peak_rss_ratio": _ratio(sides["trl"], sides["longrl"], "process_peak_rss_mb"),
        "rss_growth_ratio": _ratio(sides["trl"], sides["longrl"], "rss_growth_during_steps_mb"),
        "step_time_ratio_per_round": [_ratio(t, lo, "step_seconds") for t, lo in zip(per_round["trl"], per_round["longrl"])],
        "config": {
            "prompts": opt.prompts, "group_size": opt.group_size, "sequences_per_step": opt.prompts * opt.group_size,
            "micro_batch": cfg.rl.micro_batch_size, "max_new_tokens": opt.max_new_tokens,
            "timed_steps": opt.steps, "warmup_steps": opt.warmup, "rounds": opt.rounds, "lr": opt.lr, "threads": opt.threads,
            "device": opt.device, "seed": opt.seed, "task": cfg.task.name, "reward": opt.reward, "full_length": opt.full_length,
            "model": cfg.model.path or "tiny default", "overrides": list(opt.overrides),
            "trl_gradient_checkpointing": opt.trl_gradient_checkpointing,
        },
        "same_initial_weights": same_weights,
        "note": ("Ratios are trl / longrl (>1: longrl faster / lighter). Each side ran in its own process with "
                 f"torch.set_num_threads({opt.threads}), {opt.rounds} round(s) alternating which side goes first; "
                 "step_seconds is the median over rounds of each round's median timed step (warm-up dropped); on a shared "
                 "machine wall time swings with other load, step_cpu_seconds (this process's CPU time) much less; peak RSS includes each library's imports (see rss_before_steps_mb). Same model weights, "
                 "prompts per step, reward, G, response budget and optimizer on both sides; responses are sampled, "
                 "so response lengths (response_len_mean) can differ between sides."),
    }
    if "cuda" in str(sides["longrl"].get("device", "")):
        report["peak_cuda_ratio"] = _ratio(sides["trl"], sides["longrl"], "peak_cuda_allocated_mb")
    if not ok:
        report["note"] += " One side failed: see its 'error'; no ratio is reported."
    elif not same_weights:
        report["note"] += " WARNING: the two sides started from different weights."
    elif not (sides["trl"]["same_prompts_per_step_as_longrl"] and sides["trl"]["same_prompt_ids_as_longrl"]):
        report["note"] += " WARNING: TRL did not see the same prompts per step as longrl."
    for side in ("longrl", "trl"):
        s = sides[side]
        msg = s.get("error") or f"{s['step_seconds']:.3f} s/step, peak RSS {s['peak_rss_mb']:.0f} MiB"
        print(f"grpo-step: {side}: {msg}", file=sys.stderr)
    if opt.json:  # `longrl bench grpo-step --json` hands --json to us, not to the CLI
        print(json.dumps(report, indent=2))
    return report


def main(argv: list[str]) -> int:
    from longrl.errors import UserError

    opt = _parse(argv)
    try:
        result = run(argv)
    except UserError as e:
        print(f"longrl bench grpo-step: {e}", file=sys.stderr)
        return 2
    if opt.side != "both":
        print(RESULT_TAG + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
