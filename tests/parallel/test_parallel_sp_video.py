"""MR-SP in the video recipe: sequence parallelism (and data parallelism) for video GRPO.

One gloo run of `_worker_sp_video.py` with 2 ranks, first as one SP group
(parallel.sp_size=2: each video's temporal patches split over the ranks, Ulysses for the
language model), then as 2 data-parallel replicas. In both, the encode, one SFT step and
one GRPO step of the video recipe (frozen and trainable vision tower) leave every
gradient and parameter equal to one process on the whole batch (float64), and greedy
rollouts equal one process's. Then a real `torchrun ... -m longrl train --config
examples/video_grpo.yaml parallel.sp_size=2` run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av", reason="video tests need PyAV (pip install -e '.[video]')")

from longrl.parallel.local_spawn import free_port  # noqa: E402

from _records import assert_close, select as _select  # noqa: E402

WORKER = Path(__file__).with_name("_worker_sp_video.py")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "video_grpo.yaml"
TOL = 1e-10  # float64


@pytest.fixture(scope="module")
def records(run_worker):
    recs = run_worker(WORKER, "sp_video")
    assert sorted((r["rank"], r["sp_size"]) for r in recs if r["kind"] == "rollout") == [(0, 1), (0, 2), (1, 1), (1, 2)]
    return recs


def _assert_close(chosen):
    assert_close(chosen, TOL, where=("sp_size",))


@pytest.mark.parametrize("sp_size", [2, 1])
def test_encode_equals_one_process(records, sp_size):
    """Clips of 3, 2 and 1 temporal patches and one of 5 frames: under SP the 1-patch clip is
    encoded by one rank only; each rank encodes its frames 2 at a time (video.encode_chunk)."""
    chosen = _select(records, kind="encode", sp_size=sp_size)
    assert all(set(r["errs"]) == {"embeds_v0", "embeds_v1", "embeds_v2", "embeds_v3"} for r in chosen)
    _assert_close(chosen)


@pytest.mark.parametrize("sp_size", [2, 1])
@pytest.mark.parametrize("train_vision", [False, True])
def test_sft_step_equals_one_process(records, sp_size, train_vision):
    chosen = _select(records, kind="sft", sp_size=sp_size, train_vision=train_vision)
    for r in chosen:
        vision = [k for k in r["errs"] if k.startswith("grad0_model.visual.")]
        assert bool(vision) == train_vision  # a frozen tower has no gradient; a trainable one is compared
        assert {"loss/sft", "grad/norm", "param_model.language_model.norm.weight"} <= r["errs"].keys()
    _assert_close(chosen)


@pytest.mark.parametrize("sp_size", [2, 1])
@pytest.mark.parametrize("train_vision", [False, True])
def test_grpo_step_equals_one_process(records, sp_size, train_vision):
    chosen = _select(records, kind="grpo", sp_size=sp_size, train_vision=train_vision)
    for r in chosen:
        assert "loss/policy" in r["errs"] and "grad0_model.language_model.embed_tokens.weight" in r["errs"]
        if train_vision:
            assert "grad0_model.visual.patch_embed.proj.weight" in r["errs"]
        else:  # two PPO epochs with a KL term; the second one clips
            assert r["clip_frac"] > 0 and "loss/kl" in r["errs"]
            assert "grad1_model.language_model.embed_tokens.weight" in r["errs"]
    _assert_close(chosen)


@pytest.mark.parametrize("sp_size", [2, 1])
def test_grpo_step_on_reduced_videos_with_proportional_attention_equals_one_process(records, sp_size):
    """Token reduction with proportional attention: under SP the key bias rides in an additive
    mask over the whole rows that Ulysses' attention applies after its all-to-all."""
    chosen = _select(records, kind="grpo_reduced", sp_size=sp_size)
    assert chosen and all(r["biased"] for r in chosen)
    for r in chosen:
        assert "loss/policy" in r["errs"] and "grad1_model.language_model.embed_tokens.weight" in r["errs"]
    _assert_close(chosen)


def test_rollouts_are_split_over_sp_ranks_and_shared(records):
    """Greedy, 3 prompts x 3 samples: each SP rank samples its share (5 | 4 rows, one prompt
    split between them) and both hold one process's 9 rows; data-parallel replicas hold
    their own prompts' rows (6 | 3)."""
    for r in _select(records, kind="rollout"):
        assert r["same"] and r["behaviour_err"] < 1e-10
        assert r["n_rows"] == (9 if r["sp_size"] == 2 else (6, 3)[r["dp_rank"]])


def test_torchrun_video_sequence_parallel_train_writes_summary(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "longrl", "train", "--config", str(EXAMPLE), "parallel.sp_size=2",
           f"task.train_file={tmp_path}/data/train.jsonl", f"task.eval_file={tmp_path}/data/eval.jsonl",
           "task.n_train=4", "task.n_eval=2", "task.kwargs.min_seconds=3", "task.kwargs.max_seconds=5",
           "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
           "video.max_frames=4", "sft.steps=2", "sft.batch_size=3", "sft.warmup_steps=1", "rl.steps=1",
           "rl.prompts_per_step=2", "rl.group_size=3", "rl.eval_every=0", "rollout.max_new_tokens=6",
           "eval.max_new_tokens=6", f"run.out_dir={tmp_path}", "run.name=vsp", "run.progress=false",
           "rl.kl_coef=0.05"]  # KL: the step updates even if every reward is 0 (no signal otherwise)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("generating 6 videos") == 1  # one rank generates the data, the other waits
    run = tmp_path / "vsp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rl_steps"] == 1 and 0.0 <= summary["accuracy_after_rl"] <= 1.0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if x["phase"] == "sft"] == [1, 2]  # one writer
    rl = [x for x in recs if x["phase"] == "rl" and x["step"] == 1]
    assert len(rl) == 1 and rl[0]["rollout/groups"] == 2  # one replica: both groups on each SP rank
    assert rl[0]["logprob/engine_trainer_gap"] < 1e-4  # Ulysses log-probs on MR-SP embeddings == the sampler's
    assert (run / "checkpoints" / "step_1" / "model.safetensors").is_file()
