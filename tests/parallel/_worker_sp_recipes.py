"""Sequence parallelism inside the recipes; run by test_parallel_sp_recipes.py.

    python tests/parallel/_worker_sp_recipes.py OUT.json WORLD SP_SIZE

The parent process first runs every case as ONE process on the whole batch (the
reference), then forks WORLD ranks with torchrun's environment variables; they
join through `init_from_env`, build the SP x DP layout (`setup_layout`) and run
the same cases through the recipes' own functions (`run_sft`, `grpo_step`,
`collect`). Each rank compares its result with the reference and rank 0 writes
the largest differences to OUT.json. Errors are relative to the reference's
largest magnitude (at least 1 for parameters, at least 1e-6 for gradients).

The GRPO update runs on fixed rollouts (uneven prompt and response lengths,
non-constant rewards): `collect` is replaced by one that returns this replica's
groups, so the update itself is compared. The rollout split (each SP rank
samples its share, shares all-gathered) is compared separately with greedy
decoding, which makes the reference reproducible.
"""
import json
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as tdist
from transformers import Qwen2Config, Qwen2ForCausalLM

from longrl.config import Config
from longrl.data.example import Example
from longrl.recipes.tasks import load_task
from longrl.models.tiny import build_tiny_tokenizer
from longrl.parallel import dist
from longrl.parallel.local_spawn import free_port
from longrl.policy.text import TextPolicy
from longrl.recipes import dpo, grpo, sft
from longrl.rollout.hf import HFBackend

TOKENIZER = build_tiny_tokenizer()
N_PROMPTS, G = 4, 3
SFT_CASES = [("chunked", torch.float64), ("checkpoint", torch.float64), ("chunked", torch.float32)]
GRPO_CASES = [("ppo", "token-mean", 0.1), ("gspo", "seq-mean-token-mean", 0.0)]
REF: dict = {}  # filled by the parent before forking; the ranks inherit it


def _model(dtype, tie=True):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, pad_token_id=TOKENIZER.pad_token_id,
                      eos_token_id=TOKENIZER.eos_token_id)
    return Qwen2ForCausalLM(cfg).to(dtype)


def _text(model, cfg):
    """The recipes' text policy and batched backend over `model`."""
    backend = HFBackend(model, eos_id=TOKENIZER.eos_token_id, pad_id=TOKENIZER.pad_token_id)
    return TextPolicy.from_config(model, TOKENIZER, cfg), backend


def _record_grads(module):
    """Wrap the recipe's clip_and_step so every optimizer step's gradients are kept."""
    original, steps = module.clip_and_step, []

    def wrapped(model, *args, **kwargs):
        steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return original(model, *args, **kwargs)

    module.clip_and_step = wrapped
    return steps, lambda: setattr(module, "clip_and_step", original)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _err(a, b, floor):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=floor)).item()


def _compare(got, ref):
    errs = {}
    for i, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
        assert g.keys() == r.keys(), (sorted(g), sorted(r))
        errs.update({f"grad{i}_{n}": _err(g[n], r[n], 1e-6) for n in r})
    errs.update({f"param_{n}": _err(got["params"][n], ref["params"][n], 1.0) for n in ref["params"]})
    errs.update({k: _err(torch.tensor(got["metrics"][k]), torch.tensor(ref["metrics"][k]), 1e-6)
                 for k in got["metrics"]})
    return errs


# ----------------------------------------------------------------------------------------
# SFT: one optimizer step of run_sft
# ----------------------------------------------------------------------------------------


def _sft_examples():
    solutions = ["7", "<think>1+2=3</think><answer>3</answer>", "ab", "<think>" + "x" * 25 + "</think>",
                 "<answer>42</answer>", "q" * 11]
    return [Example(id=str(i), prompt=f"{'9' * (3 * i + 1)}+1=", answer="", solution=s)
            for i, s in enumerate(solutions)]


def sft_case(mode, dtype):
    cfg = Config()
    cfg.sft = replace(cfg.sft, steps=1, batch_size=6, warmup_steps=0, lr=1e-3)
    cfg.train = replace(cfg.train, backprop=mode, stream_chunk=4, grad_clip=0.5)
    cfg.run.progress = False
    model = _model(dtype)
    logs = []
    grads, restore = _record_grads(sft)
    try:
        sft.run_sft(_text(model, cfg)[0], _sft_examples(), cfg, torch.device("cpu"), logs.append)
    finally:
        restore()
    return {"grads": grads, "params": _params(model), "checkpointed": bool(model.is_activation_checkpointing),
            "metrics": {k: logs[0][k] for k in ("loss/sft", "grad/norm")}}


# ----------------------------------------------------------------------------------------
# GRPO: one grpo_step (two PPO epochs, micro-batches) on fixed rollouts
# ----------------------------------------------------------------------------------------


def _fixed_rollouts():
    gen = torch.Generator().manual_seed(3)
    vocab = len(TOKENIZER)
    ids = lambda n: torch.randint(6, vocab, (n,), generator=gen).tolist()
    prompt_lens, response_lens = [5, 17, 3, 9], [1, 6, 14, 2, 9, 4, 11, 3, 1, 7, 5, 13]
    prompts = [ids(prompt_lens[i // G]) for i in range(N_PROMPTS * G)]
    prompts = [prompts[(i // G) * G] for i in range(N_PROMPTS * G)]  # one prompt per group
    responses = [ids(n) for n in response_lens]
    behaviour = [(-torch.rand(len(r), generator=gen, dtype=torch.float64) * 4).tolist() for r in responses]
    rewards = torch.randn(N_PROMPTS * G, generator=gen)
    return grpo.Rollouts([Example(id=str(i // G), prompt="", answer="") for i in range(N_PROMPTS * G)],
                         prompts, responses, behaviour, [[0] * len(r) for r in responses],
                         torch.zeros(N_PROMPTS * G, dtype=torch.bool), rewards, {"correctness": rewards})


def _replica_collect(policy, backend, task, cfg, state):
    lay = dist.layout()
    keep = torch.zeros(N_PROMPTS, dtype=torch.bool)
    keep[dist.shard_indices(N_PROMPTS, lay.dp_rank, lay.dp_size)] = True
    return grpo._select_groups(_fixed_rollouts(), keep, G), {}


def _grpo_cfg(loss, loss_agg, kl_coef):
    cfg = Config()
    cfg.rl = replace(cfg.rl, group_size=G, prompts_per_step=N_PROMPTS, micro_batch_size=4, ppo_epochs=2,
                     loss=loss, loss_agg=loss_agg, kl_coef=kl_coef, lr=3e-2, warmup_steps=0)
    cfg.train = replace(cfg.train, stream_chunk=4)
    return cfg


def _step_on_fixed_rollouts(module, step, cfg):
    """One `step` (grpo_step or dpo_step) of `module` on this replica's fixed rollouts, with
    every optimizer step's gradients recorded. -> (model, grads, metrics)"""
    model = _model(torch.float64, tie=False)
    state = grpo.init_state(model, cfg, n_train=N_PROMPTS)
    grads, restore = _record_grads(module)
    original_collect, module.collect = module.collect, _replica_collect
    try:
        metrics = step(*_text(model, cfg), None, cfg, state)
    finally:
        module.collect = original_collect
        restore()
    return model, grads, metrics


def grpo_case(loss, loss_agg, kl_coef):
    model, grads, metrics = _step_on_fixed_rollouts(grpo, grpo.grpo_step, _grpo_cfg(loss, loss_agg, kl_coef))
    # Other metrics are means of per-replica means (as in plain data parallelism), not the
    # whole batch's; the engine/trainer gap is compared where there is one replica.
    keys = [k for k in metrics if k.startswith("loss/")] + ["grad/norm"]
    keys += ["logprob/engine_trainer_gap"] if dist.layout().dp_size == 1 else []
    return {"grads": grads, "params": _params(model), "metrics": {k: metrics[k] for k in keys},
            "clip_frac": metrics["clip/frac_low"] + metrics["clip/frac_high"]}


def dpo_case():
    """One online-DPO step on the same fixed rollouts (every group's rewards differ: a pair each)."""
    cfg = Config()
    cfg.rl = replace(cfg.rl, algorithm="dpo", dpo_beta=0.5, group_size=G, prompts_per_step=N_PROMPTS,
                     micro_batch_size=4, lr=3e-2, warmup_steps=0)
    cfg.train = replace(cfg.train, stream_chunk=4)
    model, grads, metrics = _step_on_fixed_rollouts(dpo, dpo.dpo_step, cfg)
    return {"grads": grads, "params": _params(model), "metrics": {k: metrics[k] for k in ("loss/dpo", "grad/norm")},
            "pairs": metrics["dpo/pairs"]}


# ----------------------------------------------------------------------------------------
# Rollouts: each SP rank samples its share; greedy, so the reference is reproducible
# ----------------------------------------------------------------------------------------


def rollout_case():
    cfg = Config()
    cfg.task = replace(cfg.task, n_train=20, n_eval=1)
    cfg.rl = replace(cfg.rl, group_size=G, prompts_per_step=N_PROMPTS - 1)  # 9 rows: shares 5 | 4
    cfg.rollout = replace(cfg.rollout, temperature=0.0, max_new_tokens=6)
    model = _model(torch.float64)
    state = grpo.init_state(model, cfg, n_train=cfg.task.n_train)
    roll, _ = grpo.collect(*_text(model, cfg), load_task(cfg.task), cfg, state)
    return {"prompt_ids": roll.prompt_ids, "response_ids": roll.response_ids, "rewards": roll.rewards.tolist(),
            "ids": [ex.id for ex in roll.examples], "behaviour": roll.behaviour_logprobs}


def _replica_rows(ref_roll, n_prompts):
    lay = dist.layout()
    rows = [j * G + g for j in dist.shard_indices(n_prompts, lay.dp_rank, lay.dp_size) for g in range(G)]
    return {k: [v[i] for i in rows] for k, v in ref_roll.items()}


# ----------------------------------------------------------------------------------------


def references():
    REF["sft"] = {case: sft_case(*case) for case in SFT_CASES}
    REF["grpo"] = {case: grpo_case(*case) for case in GRPO_CASES}
    REF["rollout"] = rollout_case()
    REF["dpo"] = dpo_case()


def main(out_path, sp_size):
    ctx = dist.init_from_env()
    lay = dist.setup_layout(sp_size)
    torch.set_num_threads(1)
    base = dict(rank=ctx.rank, world=ctx.world, sp_size=lay.sp_size, sp_rank=lay.sp_rank, dp_rank=lay.dp_rank)
    records = []
    for mode, dtype in SFT_CASES:
        got = sft_case(mode, dtype)
        records.append(dict(base, kind="sft", mode=mode, dtype=str(dtype), checkpointed=got["checkpointed"],
                            errs=_compare(got, REF["sft"][(mode, dtype)])))
    for case in GRPO_CASES:
        got = grpo_case(*case)
        records.append(dict(base, kind="grpo", loss=case[0], loss_agg=case[1], kl=case[2] > 0,
                            clip_frac=REF["grpo"][case]["clip_frac"], errs=_compare(got, REF["grpo"][case])))
    got = dpo_case()
    records.append(dict(base, kind="dpo", pairs=got["pairs"], errs=_compare(got, REF["dpo"])))
    roll = rollout_case()
    want = _replica_rows(REF["rollout"], N_PROMPTS - 1)
    behaviour_err = max(abs(a - b) for ra, rb in zip(roll["behaviour"], want["behaviour"]) for a, b in zip(ra, rb))
    records.append(dict(base, kind="rollout", same=all(roll[k] == want[k] for k in ("prompt_ids", "response_ids",
                                                                                       "rewards", "ids")),
                        n_rows=len(roll["ids"]), behaviour_err=behaviour_err))
    write_records(records, ctx, out_path)


def write_records(records, ctx, out_path):
    """Every rank's records, written once by the main rank; then the process group ends."""
    gathered = dist.all_gather_object(records)
    if ctx.is_main:
        with open(out_path, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)
    tdist.destroy_process_group()


def forked_rank(rank, main, world, port, out_path, arg):
    """A `start_processes` target: this fork's torchrun-style rank environment, then `main(out_path, arg)`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    main(out_path, arg)


if __name__ == "__main__":
    out, world, sp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)  # before any kernel runs: the ranks are forked from this process
    references()
    torch.multiprocessing.start_processes(forked_rank, args=(main, world, free_port(), out, sp), nprocs=world,
                                          start_method="fork")
