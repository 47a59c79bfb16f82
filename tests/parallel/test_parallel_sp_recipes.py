"""Ulysses sequence parallelism inside the SFT and GRPO recipes.

Two gloo runs of `_worker_sp_recipes.py`: world 2 with parallel.sp_size=2 (one
replica, each sequence split over both ranks) and world 4 with sp_size=2 (2
data-parallel replicas of 2 SP ranks). In both, one SFT step (chunked and
checkpoint backprop, float64 and float32) and one GRPO step (2 PPO epochs,
micro-batches, PPO+KL and GSPO) and one online-DPO step leave every gradient and
parameter equal to one process on the whole batch, with uneven prompt/response lengths (padding, and
sequence lengths that P does not divide). Then a real `torchrun ... -m longrl train
parallel.sp_size=2` run, and the input checks.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from longrl.cli import main
from longrl.errors import UserError
from longrl.models.gla import GLAConfig, GLAForCausalLM
from longrl.parallel import dist
from longrl.parallel.local_spawn import free_port
from longrl.parallel.sp_train import check_sp_model

from _records import assert_close as _assert_close, select as _select  # noqa: E402

WORKER = Path(__file__).with_name("_worker_sp_recipes.py")
TOL = {"torch.float64": 1e-10, "torch.float32": 1e-5}
LAYOUTS = {"sp2": (2, 2), "sp2xdp2": (4, 2)}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def records(request, run_worker):
    world, sp = LAYOUTS[request.param]
    recs = run_worker(WORKER, f"sp_{request.param}", world, sp)
    assert sorted(r["rank"] for r in recs if r["kind"] == "rollout") == list(range(world))
    return recs


def test_layout_of_the_run(records):
    world = records[0]["world"]
    for r in _select(records, kind="rollout"):
        assert (r["sp_size"], r["sp_rank"], r["dp_rank"]) == (2, r["rank"] % 2, r["rank"] // 2)
    assert {r["dp_rank"] for r in records} == set(range(world // 2))


@pytest.mark.parametrize("mode,dtype", [("chunked", "torch.float64"), ("checkpoint", "torch.float64"),
                                        ("chunked", "torch.float32")])
def test_sft_step_equals_one_process(records, mode, dtype):
    chosen = _select(records, kind="sft", mode=mode, dtype=dtype)
    for r in chosen:
        assert r["checkpointed"] == (mode == "checkpoint")
        assert {"loss/sft", "grad/norm", "grad0_model.embed_tokens.weight", "param_model.norm.weight"} <= r["errs"].keys()
    _assert_close(chosen, TOL[dtype])


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_grpo_step_equals_one_process(records, loss):
    chosen = _select(records, kind="grpo", loss=loss)
    for r in chosen:
        assert r["clip_frac"] > 0, "the second PPO epoch never clipped: the case tests too little"
        # two optimizer steps (ppo_epochs=2); untied LM head
        assert {"grad0_lm_head.weight", "grad1_lm_head.weight", "param_lm_head.weight", "grad/norm"} <= r["errs"].keys()
        assert "loss/policy" in r["errs"] and (not r["kl"] or "loss/kl" in r["errs"])
    _assert_close(chosen, TOL["torch.float64"])


def test_dpo_step_equals_one_process(records):
    chosen = _select(records, kind="dpo")
    for r in chosen:
        assert r["pairs"] == 4  # dpo/pairs: the whole step's pairs, on every rank
        assert {"grad0_lm_head.weight", "param_lm_head.weight", "loss/dpo"} <= r["errs"].keys()
    _assert_close(chosen, TOL["torch.float64"])


def test_sp_ranks_share_rollouts_sampled_once(records):
    """Greedy rollouts (3 prompts x 3 samples): each replica's SP ranks hold exactly the rows
    one process generates for that replica's prompts, though each rank sampled only its share."""
    chosen = _select(records, kind="rollout")
    assert all(r["same"] and r["behaviour_err"] < 1e-5 for r in chosen)
    assert sum(r["n_rows"] for r in chosen) == 9 * 2  # every row on both ranks of its SP group


def test_torchrun_sequence_parallel_train_writes_summary(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "longrl", "train", f"run.out_dir={tmp_path}", "run.name=sp", "parallel.sp_size=2",
           "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
           "task.n_train=50", "task.n_eval=4", "sft.steps=2", "sft.batch_size=4", "rl.steps=1",
           "rl.prompts_per_step=2", "rl.group_size=3", "rollout.max_new_tokens=8", "eval.max_new_tokens=8",
           "run.progress=false", "rl.kl_coef=0.05"]  # KL: the step updates even if every reward is 0
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "sp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rl_steps"] == 1 and 0.0 <= summary["accuracy_after_rl"] <= 1.0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if x["phase"] == "sft"] == [1, 2]  # one writer
    rl = [x for x in recs if x["phase"] == "rl" and x["step"] == 1]
    assert len(rl) == 1 and rl[0]["rollout/groups"] == 2  # one replica: both groups on each SP rank
    assert rl[0]["logprob/engine_trainer_gap"] < 1e-4  # Ulysses log-probs equal the engine's
    assert (run / "checkpoints" / "step_1" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------
# Input checks (single process)
# ----------------------------------------------------------------------------------------


def test_sp_without_torchrun_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=x", "parallel.sp_size=2"]) == 2
    err = capsys.readouterr().err
    assert "parallel.sp_size=2" in err and "torchrun --nproc-per-node 2" in err
    assert not (tmp_path / "x").exists()


def test_world_not_divisible_by_sp_size():
    with pytest.raises(UserError, match=r"does not divide the 4 processes.*\[1, 2, 4\]"):
        dist.check_sp_size(3, 4)
    dist.check_sp_size(2, 4)
    dist.check_sp_size(1, 1)


def test_single_process_layout_is_plain():
    assert dist.layout() == dist.Layout(1, 0, 1, 0, None, None)
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]


def _qwen(heads=4, kv=2):
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=16, hidden_size=8 * heads, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=heads, num_key_value_heads=kv))


@pytest.mark.parametrize("backprop", ["standard", "streambp"])
def test_backprop_modes_without_sp_support_are_refused(backprop):
    with pytest.raises(UserError, match=f"train.backprop={backprop}.*chunked"):
        check_sp_model(_qwen(), 2, backprop)
    check_sp_model(_qwen(), 1, backprop)  # no SP: every mode


def test_models_ulysses_cannot_shard_are_refused():
    check_sp_model(_qwen(), 2, "checkpoint")
    with pytest.raises(UserError, match="divide the model's 6 attention heads"):
        check_sp_model(_qwen(heads=6, kv=2), 4, "chunked")
    gla = GLAForCausalLM(GLAConfig(vocab_size=16, d_model=16, num_layers=1))
    with pytest.raises(UserError, match="no softmax attention"):
        check_sp_model(gla, 2, "chunked")


def test_vision_language_models_pass_on_their_language_model():
    """Qwen2.5-VL: the check reads the text model (the video recipe shards it with MR-SP)."""
    from longrl.models.vlm import build_tiny_vlm, build_vlm_tokenizer

    vlm = build_tiny_vlm(build_vlm_tokenizer())
    assert vlm.config.get_text_config().num_attention_heads == 4
    check_sp_model(vlm, 2, "chunked")
    with pytest.raises(UserError, match="divide the model's 4 attention heads"):
        check_sp_model(vlm, 3, "chunked")
    with pytest.raises(UserError, match="train.backprop=streambp"):
        check_sp_model(vlm, 2, "streambp")
