"""FSDP2 (`parallel.fsdp`): sharded training equals one process, DCP checkpoints, export.

- Two gloo runs of `_worker_fsdp.py` (the cases of `_worker_sp_recipes.py` with every
  rank's model sharded): FSDP2 over 2 and over 4 ranks, and SP 2 x FSDP 2 over 4. One SFT
  step (chunked, checkpoint and, without SP, StreamBP backprop; float64 and float32), one
  GRPO step (2 PPO epochs, micro-batches, PPO+KL and GSPO, uneven lengths), one online-DPO
  step and greedy rollouts (at most 3 replicas: the case has 3 prompts) leave every
  gradient and parameter equal to one process on the whole batch, while each rank holds
  1/replicas of the weights and of AdamW's moments.
- DCP: a sharded checkpoint written by 2 ranks (with and without CPU offload) loads on
  1 rank, sharded or plain, with bit-equal weights and moments.
- `torchrun --nproc-per-node 2 -m longrl train parallel.fsdp=true`: a run stopped after
  its step-2 checkpoint resumes to the same metrics and bit-equal weights; it also resumes
  on 1 process; `longrl export` gives a directory plain transformers loads and generates from.
- The combinations that are refused, each with one line.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longrl.cli import main
from longrl.parallel.local_spawn import spawn_local

from _records import assert_close as _assert_close, metric_records, select as _select  # noqa: E402
from _records import crash_after_step_2 as _crash_after_step_2, torchrun_train as _torchrun  # noqa: E402

WORKER = Path(__file__).with_name("_worker_fsdp.py")
TOL = {"torch.float64": 1e-10, "torch.float32": 1e-5}
LAYOUTS = {"fsdp2": (2, 1), "fsdp4": (4, 1), "sp2xfsdp2": (4, 2)}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def run(request, run_worker, tmp_path_factory):
    """(world, sp, records, side): the comparison records, and each rank's side file (its
    fraction of the parameters' elements and of AdamW's state)."""
    world, sp = LAYOUTS[request.param]
    records = run_worker(WORKER, f"fsdp_{request.param}", world, sp)
    newest = max(tmp_path_factory.getbasetemp().glob(f"fsdp_{request.param}*"), key=lambda p: p.stat().st_mtime)
    return world, sp, records, [json.loads(p.read_text()) for p in sorted(newest.glob("records.json.rank*"))]


@pytest.mark.parametrize("mode,dtype", [("chunked", "torch.float64"), ("checkpoint", "torch.float64"),
                                        ("chunked", "torch.float32")])
def test_sft_step_equals_one_process(run, mode, dtype):
    world, _, records, _ = run
    chosen = _select(records, kind="sft", mode=mode, dtype=dtype)
    assert sorted(r["rank"] for r in chosen) == list(range(world))
    for r in chosen:
        assert r["checkpointed"] == (mode == "checkpoint")
        assert {"loss/sft", "grad/norm", "grad0_model.embed_tokens.weight", "param_model.norm.weight"} <= r["errs"].keys()
    _assert_close(chosen, TOL[dtype])


def test_streambp_sft_step_equals_one_process(run):
    world, sp, _, side = run
    if sp > 1:
        pytest.skip("StreamBP does not run sequence-parallel (refused)")
    for s in side:
        errs = s["streambp_errs"]
        assert {"loss/sft", "grad/norm", "grad0_model.embed_tokens.weight", "param_model.norm.weight"} <= errs.keys()
        assert max(errs.values()) <= TOL["torch.float64"], errs


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_grpo_step_equals_one_process(run, loss):
    chosen = _select(run[2], kind="grpo", loss=loss)
    for r in chosen:
        assert r["clip_frac"] > 0, "the second PPO epoch never clipped: the case tests too little"
        assert {"grad0_lm_head.weight", "grad1_lm_head.weight", "param_lm_head.weight", "grad/norm"} <= r["errs"].keys()
        assert not r["kl"] or "loss/kl" in r["errs"]  # the KL case: a plain reference copied from the shards
    _assert_close(chosen, TOL["torch.float64"])


def test_dpo_step_equals_one_process(run):
    chosen = _select(run[2], kind="dpo")
    for r in chosen:
        assert r["pairs"] == 4
        assert {"grad0_lm_head.weight", "param_lm_head.weight", "loss/dpo"} <= r["errs"].keys()
    _assert_close(chosen, TOL["torch.float64"])


def test_rollouts_from_the_gathered_weights(run):
    """The native engine generates from the gathered full weights: greedy rollouts equal one process's."""
    if run[0] // run[1] > 3:
        pytest.skip("the rollout case has 3 prompts: one per replica needs at most 3 replicas")
    chosen = _select(run[2], kind="rollout")
    assert all(r["same"] and r["behaviour_err"] < 1e-5 for r in chosen)


def test_each_rank_holds_its_share(run):
    world, sp, _, side = run
    dp = world // sp
    assert sorted(s["rank"] for s in side) == list(range(world))
    for s in side:  # 1/dp of the elements, up to fully_shard's rounding of rows
        assert s["param_shares"] and all(abs(x - 1 / dp) < 0.01 for x in s["param_shares"]), s
        assert abs(s["optimizer_share"] - 1 / dp) < 0.01, s


# ----------------------------------------------------------------------------------------
# DCP: another world size
# ----------------------------------------------------------------------------------------


def _in_worker(fn_name, world, *args):
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _worker_fsdp
    finally:
        sys.path.pop(0)
    spawn_local(getattr(_worker_fsdp, fn_name), world, *args, start_method="fork")


@pytest.mark.parametrize("offload", [False, True])
def test_sharded_checkpoint_loads_on_another_world_size(tmp_path, offload):
    _in_worker("save_rank", 2, str(tmp_path), offload)
    ckpt = tmp_path / "checkpoints" / "step_1"
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "manifest.json").is_file()
    assert not list(tmp_path.glob("checkpoints/.step_1.tmp*"))  # renamed into place
    for sharded in (True, False):
        _in_worker("load_rank", 1, str(tmp_path), sharded)
        got = json.loads((tmp_path / f"load_1_{sharded}.json").read_text())
        assert got["weights_equal"] and got["moments_equal"] and got["n_moments"] > 10, got
        assert got["lr"] == 1e-2  # the param groups come back from the trainer state


def test_reference_is_a_plain_copy_of_the_gathered_weights(tmp_path):
    _in_worker("replica_rank", 2, str(tmp_path))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"replica_{rank}.json").read_text())
        assert got == {"plain": True, "compute_dtype": "torch.bfloat16", "same_logits": True, "own_memory": True}


# ----------------------------------------------------------------------------------------
# torchrun: resume, resume on another world size, export
# ----------------------------------------------------------------------------------------

TINY = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
        "task.n_train=200", "task.n_eval=4", "sft.steps=2", "sft.batch_size=8", "rl.steps=4",
        "rl.prompts_per_step=3", "rl.group_size=4", "rl.micro_batch_size=5", "rl.eval_every=0",
        "rl.kl_coef=0.05", "rollout.max_new_tokens=12", "eval.max_new_tokens=12", "run.save_every=2",
        "run.progress=false", "parallel.fsdp=true"]


def _records(run):
    return metric_records(run)


def _weights(run, step=4):
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step_{step}" / "model.safetensors")


def test_torchrun_fsdp_run_resumes_exactly_and_exports(tmp_path):
    _torchrun(2, f"run.out_dir={tmp_path}", "run.name=full", *TINY)
    full = tmp_path / "full"
    recs = _records(full)
    rl = [r for r in recs if r["phase"] == "rl"]
    assert [r["step"] for r in rl] == [0, 1, 2, 3, 4] and "loss/kl" in rl[1]
    assert all(r["logprob/engine_trainer_gap"] < 1e-4 for r in rl[1:])  # the engine reads the gathered weights
    saved = torch.load(full / "checkpoints" / "step_2" / "trainer_state.pt", weights_only=True)
    assert saved["optimizer"] is None and saved["optimizer_param_groups"]  # the moments live in dcp/
    assert len(list((full / "checkpoints" / "step_2" / "dcp").glob("*.distcp"))) == 2

    # Same world size: the same metrics and bit-equal weights as the uninterrupted run.
    crashed = _crash_after_step_2(full, tmp_path / "crashed")
    _torchrun(2, f"resume={crashed}", "run.progress=false")
    assert _records(crashed) == recs
    want = _weights(full)
    assert all(torch.equal(want[k], v) for k, v in _weights(crashed).items())

    # One process takes over both ranks' shards (DCP reshards) and finishes the run.
    one = _crash_after_step_2(full, tmp_path / "one")
    _torchrun(1, f"resume={one}", "run.progress=false")
    assert [r["step"] for r in _records(one) if r["phase"] == "rl"] == [0, 1, 2, 3, 4]
    assert json.loads((one / "summary.json").read_text())["rl_steps"] == 4

    # Export: a plain Hugging Face directory.
    out = tmp_path / "hf"
    assert main(["export", str(full), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    code = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "ids = t('12+34=', return_tensors='pt').input_ids; "
            "out = m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=t.pad_token_id); "
            "print(out.shape[1] - ids.shape[1])")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) >= 1
    from safetensors.torch import load_file

    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(want[k], v) for k, v in exported.items())
    assert main(["export", str(full), "--out", str(tmp_path / "x"), "--step", "3"]) == 2  # no step_3


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------


def test_fsdp_without_torchrun_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=x", "parallel.fsdp=true"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc-per-node 2" in err and "parallel.fsdp=true" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("overrides,message", [
    (["parallel.fsdp=true", "parallel.zero_optimizer=true"], "drop parallel.zero_optimizer=true"),
    (["parallel.fsdp_offload=true"], "add parallel.fsdp=true"),
])
def test_refused_combinations(tmp_path, capsys, overrides, message):
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=x", *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bench_fsdp_measures_the_shards():
    """`longrl bench fsdp` on a small model: FSDP2 keeps half the state per rank at P=2 and
    updates the weights as plain AdamW does; ZeRO-1 shards only the moments."""
    from longrl.bench.fsdp import run as bench

    result = bench(["--procs", "2", "--layers", "1", "--hidden", "64", "--vocab", "256", "--seq", "8"])
    per = result["procs"]["2"]
    assert abs(per["fsdp"]["ratio_to_plain"]["state"] - 0.5) < 0.01
    assert 0.5 < per["zero"]["ratio_to_plain"]["state"] < 1.0
    assert 0.5 < per["fsdp"]["ratio_to_plain"]["in_step"] < 1.0  # the gathered weights and full grads
    assert all(per[k]["max_weight_diff_vs_plain"] < 1e-6 for k in per if k != "lora")
    # LoRA r=16: AdamW's moments cover the adapters only (A [16, in], B [out, 16] per linear layer)
    from transformers import Qwen2ForCausalLM

    from longrl.bench.fsdp import _config, _parse
    from longrl.config import LoRAConfig
    from longrl.models.lora import apply_lora

    model = Qwen2ForCausalLM(_config(_parse(["--layers", "1", "--hidden", "64", "--vocab", "256"])))
    full = sum(p.numel() for p in model.parameters())
    adapters = sum(p.numel() for p in apply_lora(model, LoRAConfig(r=16)).parameters() if p.requires_grad)
    assert per["lora"]["ratio_to_plain"]["optimizer"] == pytest.approx(adapters / full, abs=1e-4)
