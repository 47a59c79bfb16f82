"""MR-SP inside the video recipe; run by test_parallel_sp_video.py.

    python tests/parallel/_worker_sp_video.py OUT.json

The parent process builds a small video task in memory (random frames; clips of 6, 4
and 2 frames, i.e. 3, 2 and 1 temporal patches, so a rank of a 2-rank group may encode
none) and runs every case as ONE process on the whole batch (the reference). It then
forks 2 ranks with torchrun's environment variables; they run the same cases through
the recipes' own functions (`run_sft`, `grpo_step`, `collect`) with the video recipe's
`VideoPolicy`, first with parallel.sp_size=2 (both ranks one replica, MR-SP encode and
Ulysses passes), then with sp_size=1 (2 data-parallel replicas). Each rank compares
with the reference and rank 0 writes the largest differences to OUT.json. Errors are
relative to the reference's largest magnitude (at least 1 for parameters and
embeddings, at least 1e-6 for gradients).

The GRPO update runs on fixed rollouts (non-constant rewards, uneven lengths): `collect`
is replaced by one that runs the real rollout of this replica's prompts (so the step's
videos are encoded as in training) and returns its share of the fixed rows instead. The rollout split itself is compared
with greedy decoding, which makes the reference reproducible.
"""
import sys
from pathlib import Path

import torch

from longrl.config import load_config
from longrl.data.example import Example
from longrl.parallel import dist
from longrl.parallel.local_spawn import free_port
from longrl.recipes import grpo, sft
from longrl.data import video_task as V
from longrl.policy.video import VideoPolicy, load_video_policy
from longrl.rollout.hf import HFBackend
from longrl.rewards.verifiers import answer_scorer

# The text SP worker's gradient recorder and comparison (this file's directory is on sys.path).
from _worker_sp_recipes import _compare, _err, _params, _record_grads, forked_rank, write_records  # noqa: E402

N_PROMPTS, G = 4, 3
VIDEOS = {"v0": 6, "v1": 4, "v2": 2, "v3": 5}  # frames: 3, 2, 1 temporal patches, and an odd count (padded)
PROMPT_VIDEO = ("v0", "v1", "v2", "v0")  # the last prompt asks another question of v0
REF: dict = {}  # filled by the parent before forking; the ranks inherit it
OVERRIDES = ["model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.num_heads=4",
             "model.tiny.num_kv_heads=2", "model.tiny.intermediate_size=48", "video.max_frames=8",
             "video.max_pixels=3136", "train.stream_chunk=5", "run.progress=false",
             "video.encode_chunk=2"]  # under SP each rank patchifies and encodes its frames 2 at a time


def _task(root: Path):
    cfg = load_config(None, OVERRIDES)
    gen = torch.Generator().manual_seed(1)
    clips, examples = {}, []
    for k, (name, n) in enumerate(VIDEOS.items()):
        path = root / f"{name}.mp4"
        path.write_bytes(name.encode())  # the cache key hashes the file
        frames = torch.randint(0, 256, (n, 56, 56, 3), dtype=torch.uint8, generator=gen)  # [N, H, W, 3]
        clips[str(path)] = V.VideoClip(frames, 0.5 + k)
    for i, name in enumerate(PROMPT_VIDEO):
        question = f"What colour is shape {i}?\nA. red\nB. blue"
        solution = f"<think>shape {i}</think><answer>{'AB'[i % 2]}</answer>"
        examples.append(Example(id=f"q{i}", prompt=question, answer="AB"[i % 2], solution=solution,
                                media=[str(root / f"{name}.mp4")]))
    return V.VideoTask("videos:test", examples, examples[:2], answer_scorer("mcq"), clips, V.frame_sampling(cfg))


def _float64_throughout():
    """Transformers' Qwen2.5-VL rounds to float32 inside its RMSNorm and the vision rotary
    embedding. Sums of the same numbers in another order (a shared prompt's gradient summed
    over rows here, per row under SP) then round differently to float32 and differ by ~1e-8:
    the comparison could not tell a real error from that. Same math, in the input dtype."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as m

    def rms_norm(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x

    def rotary_vision(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        return q * cos + m.rotate_half(q) * sin, k * cos + m.rotate_half(k) * sin

    m.Qwen2_5_VLRMSNorm.forward = rms_norm
    m.apply_rotary_pos_emb_vision = rotary_vision


def _policy(cfg):
    torch.manual_seed(0)
    model, tok = load_video_policy(cfg.model, torch.device("cpu"), train_vision=cfg.video.train_vision)
    return model.double(), tok


# ----------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------


def encode_case(task):
    """Every clip's embeddings through VideoPolicy's encode (MR-SP under SP)."""
    cfg = load_config(None, OVERRIDES)
    model, tok = _policy(cfg)
    policy = VideoPolicy(model, tok, task, cfg)
    return {p: policy._encode(model, p, grad=False).embeds for p in task.clips}


def sft_case(task, train_vision):
    cfg = load_config(None, [*OVERRIDES, "sft.steps=1", "sft.batch_size=4", "sft.warmup_steps=0", "sft.lr=1e-2",
                             "train.grad_clip=100", f"video.train_vision={train_vision}"])
    model, tok = _policy(cfg)
    logs, policy = [], VideoPolicy(model, tok, task, cfg)
    grads, restore = _record_grads(sft)
    try:
        sft.run_sft(policy, task.train, cfg, torch.device("cpu"), logs.append)
    finally:
        restore()
    return {"grads": grads, "params": _params(model), "metrics": {k: logs[0][k] for k in ("loss/sft", "grad/norm")}}


def _fixed_rollouts(policy, task):
    gen = torch.Generator().manual_seed(3)
    response_lens = [1, 6, 14, 2, 9, 4, 11, 3, 1, 7, 5, 13]
    examples = [ex for ex in task.train for _ in range(G)]
    prompts = policy.encode_prompts(examples)
    responses = [torch.randint(10, 90, (n,), generator=gen).tolist() for n in response_lens]
    behaviour = [(-torch.rand(len(r), generator=gen, dtype=torch.float64) * 4).tolist() for r in responses]
    rewards = torch.randn(N_PROMPTS * G, generator=gen)
    return grpo.Rollouts(examples, prompts, responses, behaviour, [[0] * len(r) for r in responses],
                         torch.zeros(N_PROMPTS * G, dtype=torch.bool), rewards, {"correctness": rewards})


def _replica_collect(policy, backend, task, cfg, state):
    lay = dist.layout()
    mine = dist.shard_indices(N_PROMPTS, lay.dp_rank, lay.dp_size)
    # The real rollout of this replica's prompts: the step's videos are encoded as in training.
    grpo.rollout(policy, backend, [task.train[j] for j in mine], task, cfg, state.sampler, state.step)
    keep = torch.zeros(N_PROMPTS, dtype=torch.bool)
    keep[mine] = True
    return grpo._select_groups(_fixed_rollouts(policy, task), keep, G), {}


REDUCED = ["video.token_reduction=diff", "video.drop_threshold=2.0", "video.max_unseen=0"]
"""Token reduction keeping only each patch's first temporal step, with proportional attention
(the default): every kept token of a multi-step clip carries a key bias log(steps)."""


def grpo_case(task, train_vision, extra=()):
    epochs, kl = (1, 0.0) if train_vision else (2, 0.1)  # a trainable tower: one epoch, no reference
    cfg = load_config(None, [*OVERRIDES, f"rl.group_size={G}", f"rl.prompts_per_step={N_PROMPTS}",
                             "rl.micro_batch_size=4", f"rl.ppo_epochs={epochs}", f"rl.kl_coef={kl}", "rl.lr=3e-2",
                             "rl.warmup_steps=0", "rollout.max_new_tokens=2", f"video.train_vision={train_vision}",
                             *extra])
    model, tok = _policy(cfg)
    state = grpo.init_state(model, cfg, n_train=N_PROMPTS)
    policy, backend = VideoPolicy(model, tok, task, cfg), HFBackend(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    grads, restore = _record_grads(grpo)
    original_collect, grpo.collect = grpo.collect, _replica_collect
    try:
        metrics = grpo.grpo_step(policy, backend, task, cfg, state)
    finally:
        grpo.collect = original_collect
        restore()
    keys = [k for k in metrics if k.startswith("loss/")] + ["grad/norm"]
    keys += ["logprob/engine_trainer_gap"] if dist.layout().dp_size == 1 else []
    biased = any(getattr(v, "key_bias", None) is not None and float(v.key_bias.max()) > 0 for v in policy._step.values())
    return {"grads": grads, "params": _params(model), "metrics": {k: metrics[k] for k in keys},
            "clip_frac": metrics["clip/frac_low"] + metrics["clip/frac_high"], "biased": biased}


def rollout_case(task):
    """Greedy rollouts of 3 prompts x 3 samples (9 rows: SP shares 5 | 4, one prompt split)."""
    cfg = load_config(None, [*OVERRIDES, f"rl.group_size={G}", f"rl.prompts_per_step={N_PROMPTS - 1}",
                             "rollout.temperature=0", "rollout.max_new_tokens=5"])
    model, tok = _policy(cfg)
    state = grpo.init_state(model, cfg, n_train=N_PROMPTS)
    backend = HFBackend(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    roll, _ = grpo.collect(VideoPolicy(model, tok, task, cfg), backend, task, cfg, state)
    return {"prompt_ids": roll.prompt_ids, "response_ids": roll.response_ids, "rewards": roll.rewards.tolist(),
            "ids": [ex.id for ex in roll.examples], "behaviour": roll.behaviour_logprobs}


def _replica_rows(ref_roll, n_prompts):
    lay = dist.layout()
    rows = [j * G + g for j in dist.shard_indices(n_prompts, lay.dp_rank, lay.dp_size) for g in range(G)]
    return {k: [v[i] for i in rows] for k, v in ref_roll.items()}


# ----------------------------------------------------------------------------------------


def references(task):
    REF["encode"] = encode_case(task)
    REF["sft"] = {tv: sft_case(task, tv) for tv in (False, True)}
    REF["grpo"] = {tv: grpo_case(task, tv) for tv in (False, True)}
    REF["grpo_reduced"] = grpo_case(task, False, REDUCED)
    REF["rollout"] = rollout_case(task)


def run_layout(task, ctx, sp_size):
    lay = dist.setup_layout(sp_size)
    base = dict(rank=ctx.rank, world=ctx.world, sp_size=lay.sp_size, sp_rank=lay.sp_rank, dp_rank=lay.dp_rank)
    records = []
    enc = encode_case(task)
    records.append(dict(base, kind="encode", errs={f"embeds_{Path(p).stem}": _err(enc[p], REF["encode"][p], 1.0)
                                                   for p in task.clips}))
    for tv in (False, True):
        records.append(dict(base, kind="sft", train_vision=tv, errs=_compare(sft_case(task, tv), REF["sft"][tv])))
        records.append(dict(base, kind="grpo", train_vision=tv, clip_frac=REF["grpo"][tv]["clip_frac"],
                            errs=_compare(grpo_case(task, tv), REF["grpo"][tv])))
    reduced = grpo_case(task, False, REDUCED)
    records.append(dict(base, kind="grpo_reduced", biased=reduced["biased"] and REF["grpo_reduced"]["biased"],
                        errs=_compare(reduced, REF["grpo_reduced"])))
    roll = rollout_case(task)
    want = _replica_rows(REF["rollout"], N_PROMPTS - 1)
    behaviour_err = max(abs(a - b) for ra, rb in zip(roll["behaviour"], want["behaviour"]) for a, b in zip(ra, rb))
    records.append(dict(base, kind="rollout", n_rows=len(roll["ids"]), behaviour_err=behaviour_err,
                        same=all(roll[k] == want[k] for k in ("prompt_ids", "response_ids", "rewards", "ids"))))
    return records


def main(out_path, task):
    ctx = dist.init_from_env()
    torch.set_num_threads(1)
    records = run_layout(task, ctx, 2) + run_layout(task, ctx, 1)
    write_records(records, ctx, out_path)


if __name__ == "__main__":
    out = sys.argv[1]
    root = Path(out).parent  # the fake video files (only hashed, never decoded) go beside OUT.json
    torch.set_num_threads(1)  # before any kernel runs: the ranks are forked from this process
    _float64_throughout()
    task = _task(root)
    references(task)
    torch.multiprocessing.start_processes(forked_rank, args=(main, 2, free_port(), out, task), nprocs=2,
                                          start_method="fork")
