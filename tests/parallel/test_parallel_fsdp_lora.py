"""FSDP2 (`parallel.fsdp`) with LoRA adapters (`model.lora.r`): sharded == one process.

- One gloo run of `_worker_fsdp_lora.py`: the text recipe cases (one SFT step: chunked,
  checkpoint, StreamBP, float64 and float32; one GRPO step with 2 PPO epochs, KL against
  the disabled adapter, PPO and GSPO; one online-DPO step; greedy rollouts) on an adapted
  model sharded over 2 ranks leave every adapter gradient and every parameter equal to one
  process on the whole batch; the base gets no gradient. The gradients go through the
  reduce-scatter in many small buckets (`fsdp.BUCKET_ELEMENTS` lowered to 300).
- The phase change under FSDP2 (`models.lora.new_adapter` / `merge_adapter`, in place: the
  module tree is fully_shard's): the update lands in the base shards (== one process's
  merged weights), the fresh adapter is the same on every rank and adds nothing, and the
  trainable flags follow on the shards and the gathered weights.
- `torchrun --nproc-per-node 2 -m longrl train parallel.fsdp=true model.lora.r=4
  rl.algorithm=dpo rl.dpo_rounds=2` (full SFT, then two DPO rounds, each merged in place):
  stopped after its step-2 checkpoint, it resumes to the same metrics and weights.
"""

import pytest
import torch


from _records import assert_close as _assert_close, metric_records, select as _select  # noqa: E402
from _records import crash_after_step_2, torchrun_train as _torchrun  # noqa: E402

pytest.importorskip("peft")

WORKER = __import__("pathlib").Path(__file__).with_name("_worker_fsdp_lora.py")
TOL = {"torch.float64": 1e-10, "torch.float32": 1e-5}


@pytest.fixture(scope="module")
def records(run_worker):
    return run_worker(WORKER, "fsdp_lora")


def _only_adapter_grads(chosen):
    for r in chosen:
        grads = [k for k in r["errs"] if k.startswith("grad0_")]
        assert grads and all(".lora_A." in k or ".lora_B." in k for k in grads), grads
        assert any(k.startswith("param_") and ".base_layer." in k for k in r["errs"])  # the frozen base is compared too


@pytest.mark.parametrize("mode,dtype", [("chunked", "torch.float64"), ("checkpoint", "torch.float64"),
                                        ("streambp", "torch.float64"), ("chunked", "torch.float32")])
def test_sft_step_equals_one_process(records, mode, dtype):
    chosen = _select(records, kind="sft", mode=mode, dtype=dtype)
    assert sorted(r["rank"] for r in chosen) == [0, 1]
    _only_adapter_grads(chosen)
    _assert_close(chosen, TOL[dtype])


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_grpo_step_equals_one_process(records, loss):
    chosen = _select(records, kind="grpo", loss=loss)
    assert sorted(r["rank"] for r in chosen) == [0, 1]
    _only_adapter_grads(chosen)
    for r in chosen:
        assert r["clip_frac"] > 0 and "grad/norm" in r["errs"] and any(k.startswith("grad1_") for k in r["errs"])
        assert not r["kl"] or "loss/kl" in r["errs"]  # the KL reference: the disabled adapter
    _assert_close(chosen, TOL["torch.float64"])


def test_dpo_step_equals_one_process(records):
    chosen = _select(records, kind="dpo")
    assert sorted(r["rank"] for r in chosen) == [0, 1] and all(r["pairs"] == 4 for r in chosen)
    _only_adapter_grads(chosen)
    assert all("loss/dpo" in r["errs"] for r in chosen)
    _assert_close(chosen, TOL["torch.float64"])


def test_rollouts_from_the_gathered_adapted_weights(records):
    chosen = _select(records, kind="rollout")
    assert len(chosen) == 2 and all(r["same"] for r in chosen)


def test_phase_change_folds_into_the_shards(records):
    for r in _select(records, kind="fold"):
        assert r["adapter_effect"] > 1e-3  # the adapter being folded mattered
        assert r["base_err"] < 1e-12 and r["logits_err"] < 1e-10 and r["merge_logits_err"] < 1e-10, r
        assert r["b_zero"] and r["a_redrawn"] and r["a_same_on_ranks"] and r["moved"], r
        assert r["adapters_train"] and r["shards_agree"] and r["base_trains"], r
        assert r["optimizer_params"] > 0


# ----------------------------------------------------------------------------------------
# torchrun: full SFT, two DPO rounds merged in place, stopped and resumed
# ----------------------------------------------------------------------------------------

TINY = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
        "task.n_train=200", "task.n_eval=4", "sft.steps=30", "sft.lr=1e-2", "sft.batch_size=8", "rl.steps=4",
        "rl.prompts_per_step=3", "rl.group_size=4", "rl.micro_batch_size=5", "rl.eval_every=0",
        "rollout.max_new_tokens=12", "eval.max_new_tokens=12", "run.save_every=2", "run.progress=false",
        "parallel.fsdp=true", "model.lora.r=4", "model.lora.alpha=16", "rl.algorithm=dpo", "rl.dpo_beta=0.5",
        "rl.dpo_rounds=2"]


def _rl_records(run):
    return metric_records(run, "rl")


@pytest.mark.slow
def test_torchrun_fsdp_lora_dpo_rounds_resume_exactly(tmp_path):
    from safetensors.torch import load_file

    from longrl.models import lora

    _torchrun(2, f"run.out_dir={tmp_path}", "run.name=full", *TINY)
    full = tmp_path / "full"
    recs = _rl_records(full)
    assert [r.get("dpo/round") for r in recs[1:]] == [1, 1, 2, 2]
    assert sum(r["dpo/pairs"] for r in recs[1:3]) > 0 and sum(r["dpo/pairs"] for r in recs[3:]) > 0  # both rounds learn
    ckpt = full / "checkpoints" / "step_4"
    assert (ckpt / lora.BASE_FILE).is_file() and not (full / "checkpoints" / "step_2" / lora.BASE_FILE).exists()
    merged, step0 = load_file(ckpt / "model.safetensors"), load_file(full / "checkpoints" / "step_0" / "model.safetensors")
    assert merged.keys() == step0.keys() and not any("lora_" in k or "base_layer" in k for k in merged)
    assert any(not torch.equal(merged[k], step0[k]) for k in merged)  # the rounds' adapters, merged

    crashed = crash_after_step_2(full, tmp_path / "crashed", records=2)  # the step-3 and step-4 records
    _torchrun(2, f"resume={crashed}", "run.progress=false")
    assert _rl_records(crashed) == recs
    for name in ("model.safetensors", lora.BASE_FILE, f"{lora.ADAPTER_DIR}/adapter_model.safetensors"):
        want, got = load_file(ckpt / name), load_file(crashed / "checkpoints" / "step_4" / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
