"""FSDP2 (`parallel.fsdp`) for the video policy: sharded training equals one process.

- One gloo run of `_worker_fsdp_video.py` (the cases of `_worker_sp_video.py` with every
  rank's tiny Qwen2.5-VL sharded over 2 data-parallel ranks): the encode, one SFT step and
  one GRPO step (2 PPO epochs with KL against a plain reference copy; and a trainable
  vision tower) leave every gradient and parameter equal to one process on the whole batch
  (float64), greedy rollouts from the gathered weights equal one process's, and each rank
  holds half of the weights.
- `torchrun --nproc-per-node 2 -m longrl train task.name=videos parallel.fsdp=true`, with every
  weight (runs, writes DCP and Hugging Face checkpoints) and with a LoRA adapter
  (`model.lora.r=4`): stopped after its step-2 checkpoint, it resumes to the same metrics
  and weights.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("av", reason="video tests need PyAV (pip install -e '.[video]')")

from longrl.parallel.local_spawn import free_port  # noqa: E402

from _records import assert_close, select as _select  # noqa: E402

WORKER = Path(__file__).with_name("_worker_fsdp_video.py")
TOL = 1e-10  # float64


@pytest.fixture(scope="module")
def records(run_worker):
    return run_worker(WORKER, "fsdp_video")


def test_encode_equals_one_process(records):
    chosen = _select(records, kind="encode")
    assert sorted(r["rank"] for r in chosen) == [0, 1]
    assert_close(chosen, TOL)


@pytest.mark.parametrize("train_vision", [False, True])
def test_sft_step_equals_one_process(records, train_vision):
    chosen = _select(records, kind="sft", train_vision=train_vision)
    assert sorted(r["rank"] for r in chosen) == [0, 1]
    for r in chosen:
        vision = [k for k in r["errs"] if k.startswith("grad0_model.visual.")]
        assert bool(vision) == train_vision  # a frozen tower has no gradient; a trainable one is compared
        assert {"loss/sft", "grad/norm", "param_model.language_model.norm.weight",
                "param_model.visual.merger.mlp.0.weight"} <= r["errs"].keys()
    assert_close(chosen, TOL)


@pytest.mark.parametrize("train_vision", [False, True])
def test_grpo_step_equals_one_process(records, train_vision):
    chosen = _select(records, kind="grpo", train_vision=train_vision)
    assert sorted(r["rank"] for r in chosen) == [0, 1]
    for r in chosen:
        emb = "model.language_model.embed_tokens.weight"  # tied to the LM head
        assert {f"grad0_{emb}", f"param_{emb}", "grad/norm", "loss/policy"} <= r["errs"].keys()
        if not train_vision:  # two PPO epochs with KL: the second clips, the reference is a plain copy
            assert r["clip_frac"] > 0 and "loss/kl" in r["errs"] and f"grad1_{emb}" in r["errs"]
    assert_close(chosen, TOL)


def test_rollouts_from_the_gathered_weights(records):
    chosen = _select(records, kind="rollout")
    assert len(chosen) == 2 and all(r["same"] and r["behaviour_err"] < 1e-10 for r in chosen)


def test_each_rank_holds_half_of_the_weights(records):
    shares = _select(records, kind="shares")
    assert sorted(r["rank"] for r in shares) == [0, 1]
    for r in shares:
        assert r["shares"] and all(abs(x - 0.5) < 0.01 for x in r["shares"]), r


# ----------------------------------------------------------------------------------------
# torchrun: the video recipe, sharded, stopped and resumed
# ----------------------------------------------------------------------------------------

TINY = ["task.name=videos", "task.n_train=6", "task.n_eval=2", "task.kwargs.kinds=colour",
        "task.kwargs.min_seconds=3", "task.kwargs.max_seconds=5", "model.tiny.hidden_size=32",
        "model.tiny.num_layers=1", "model.tiny.intermediate_size=64", "video.max_frames=4", "video.max_pixels=3136",
        "sft.steps=2", "sft.batch_size=4", "sft.warmup_steps=1", "rl.steps=4", "rl.prompts_per_step=2",
        "rl.group_size=2", "rl.micro_batch_size=3", "rl.eval_every=0", "run.save_every=2", "rl.kl_coef=0.05",
        "rollout.max_new_tokens=6", "eval.max_new_tokens=6", "run.progress=false", "parallel.fsdp=true"]


def _torchrun(nproc, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "longrl", "train", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _rl_records(run):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "video/"))} for r in recs if r["phase"] == "rl"]


# LoRA: full SFT long enough that rewards vary (the adapter starts at B = 0, so a step whose
# rewards are all alike has no gradient), then the adapter folded into the shards for RL.
LORA = ["model.lora.r=4", "model.lora.alpha=8", "sft.steps=30", "sft.lr=1e-2", "rl.group_size=4",
        "rl.micro_batch_size=4", "rollout.max_new_tokens=20", "eval.max_new_tokens=20"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora"])
def test_torchrun_fsdp_video_run_trains_and_resumes_exactly(tmp_path, extra):
    from safetensors.torch import load_file

    data = [f"task.train_file={tmp_path}/videos/train.jsonl"]  # generated by the first run
    _torchrun(2, f"run.out_dir={tmp_path}", "run.name=full", *TINY, *data, *extra)
    full = tmp_path / "full"
    recs = _rl_records(full)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4] and all("loss/kl" in r for r in recs[1:])
    if extra:  # the RL adapter trained: the merged weights moved off step_0's, the tower did not
        step0 = load_file(full / "checkpoints" / "step_0" / "model.safetensors")
        step4 = load_file(full / "checkpoints" / "step_4" / "model.safetensors")
        assert any(r["kl/mean"] > 0 for r in recs[1:]) and (full / "checkpoints" / "step_4" / "adapter").is_dir()
        assert any(not torch.equal(step0[k], step4[k]) for k in step0 if "visual" not in k)
        assert all(torch.equal(step0[k], step4[k]) for k in step0 if "visual" in k)
    assert all(r["logprob/engine_trainer_gap"] < 1e-4 for r in recs[1:])  # the engine reads the gathered weights
    assert len(list((full / "checkpoints" / "step_2" / "dcp").glob("*.distcp"))) == 2
    if not extra:  # suite time: the resume runs once, with the adapter (its DCP holds base and adapter shards)
        assert load_file(full / "checkpoints" / "step_4" / "model.safetensors")
        return

    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_4")
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:-2]) + "\n")  # the step-3 and step-4 records
    (crashed / "summary.json").unlink()
    _torchrun(2, f"resume={crashed}", "run.progress=false")
    assert _rl_records(crashed) == recs
    want = load_file(full / "checkpoints" / "step_4" / "model.safetensors")
    got = load_file(crashed / "checkpoints" / "step_4" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
