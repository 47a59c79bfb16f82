"""`longrl train model.lora.r=...` end to end: SFT, GRPO and DPO train only the adapter, the
reference is the base with the adapter off, multi-round DPO merges per round, and a LoRA
run resumes exactly (crash after step 2 + resume == uninterrupted)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longrl.checkpoint import load_trainer_state
from longrl.cli import main
from longrl.config import load_config
from longrl.models import lora

pytest.importorskip("peft")


def _train_tests():
    """The helpers of the full fine-tuning recipe tests, reused as they are."""
    spec = importlib.util.spec_from_file_location("_recipes_train", Path(__file__).with_name("test_recipes_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_T = _train_tests()
TINY, _rl_records, _crashed_copy = _T.TINY, _T._rl_records, _T._crashed_copy
# The settings these tests were written for: adapter SFT on the tiny model (the default,
# 'auto', fine-tunes every weight there) and the phases' own learning rates.
LORA = ["model.lora.r=4", "model.lora.alpha=16", "rl.lr=1e-3", "model.lora.sft=true", "model.lora.lr_scale=1"]
# An adapter on the tiny random model cannot learn the answer format in a few SFT steps
# (its embeddings and head stay random): full SFT, so rewards vary and RL has gradients.
FULL_SFT = ["model.lora.sft=false", "sft.steps=30", "sft.lr=1e-2"]
DPO_ROUNDS = ["rl.algorithm=dpo", "rl.dpo_beta=0.5", *FULL_SFT, "rl.dpo_rounds=2"]


@pytest.mark.parametrize("extra", [["rl.kl_coef=0.05", "rl.ppo_epochs=2", *FULL_SFT], DPO_ROUNDS], ids=["grpo_kl", "dpo_rounds"])
def test_lora_run_resumes_exactly(tmp_path, extra):
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=full", *TINY, *LORA, *extra]) == 0
    full = tmp_path / "full"
    crashed = _crashed_copy(full, tmp_path / "crashed")
    assert main(["train", f"resume={crashed}", "run.progress=false"]) == 0
    recs = _rl_records(full / "metrics.jsonl")
    assert _rl_records(crashed / "metrics.jsonl") == recs
    for name in ("model.safetensors", f"{lora.ADAPTER_DIR}/adapter_model.safetensors"):
        wa = load_file(full / "checkpoints" / "step_4" / name)
        wb = load_file(crashed / "checkpoints" / "step_4" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    # The optimizer holds moments for the adapter only.
    saved = load_trainer_state(full / "checkpoints" / "step_4")
    moments = sum(s["exp_avg"].numel() for s in saved["optimizer"]["state"].values())
    adapter = load_file(full / "checkpoints" / "step_4" / lora.ADAPTER_DIR / "adapter_model.safetensors")
    assert moments == sum(v.numel() for v in adapter.values()) > 0
    if "rl.dpo_rounds=2" in extra:
        assert [r.get("dpo/round") for r in recs[1:]] == [1, 1, 2, 2]
        assert sum(r["dpo/pairs"] for r in recs[1:]) > 0
        # Round 2's base is round 1's merged model, not step_0's: the checkpoint carries it.
        assert not (full / "checkpoints" / "step_2" / lora.BASE_FILE).exists()
        assert (full / "checkpoints" / "step_4" / lora.BASE_FILE).is_file()
    else:
        assert any(r.get("kl/mean", 0.0) > 0 for r in recs[1:])


def _state(extra):
    """A tiny policy after SFT-less setup, with its RL state (reference included)."""
    from longrl.recipes.grpo import init_state
    from longrl.recipes.train import load_task_and_policy

    cfg = load_config(None, [*TINY, *LORA, *extra])
    task, load, as_policy = load_task_and_policy(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model, tok = load(cfg.model, torch.device("cpu"))
    return cfg, task, as_policy(model, tok), init_state(model, cfg, len(task.train))


def test_the_next_rounds_reference_is_the_merged_model_of_the_round_before():
    from longrl.recipes.dpo import start_round
    from longrl.recipes.grpo import reference_logprobs
    from longrl.streambp.logprobs import make_batch

    cfg, task, policy, state = _state(["rl.algorithm=dpo", "rl.dpo_rounds=2"])
    model = policy.model
    assert isinstance(state.reference, lora.DisabledAdapter)  # no second copy of the model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)  # round 1 "trained" its adapter
    ex = task.train[:3]
    ids = policy.encode_prompts(ex)
    batch = make_batch(ids, [[5, 6, 7, 8]] * 3, policy.tokenizer.pad_token_id)
    round1_policy = policy.logprobs(batch, ex)
    round1_ref = reference_logprobs(policy, state.reference, batch, ex)
    assert (round1_policy - round1_ref).abs().max() > 1e-3
    old_optimizer = state.optimizer
    start_round(model, cfg, state)
    assert state.optimizer is not old_optimizer and state.scheduler.last_epoch == 0
    assert policy.model is model  # merged in place: the engines keep the same object
    torch.testing.assert_close(reference_logprobs(policy, state.reference, batch, ex), round1_policy,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(policy.logprobs(batch, ex), round1_policy, rtol=0, atol=1e-5)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert trained == {id(p) for g in state.optimizer.param_groups for p in g["params"]}


def test_lora_sft_trains_the_adapter_and_merges_it_before_rl(tmp_path):
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=r", *TINY, *LORA, "rl.steps=0"]) == 0
    step0 = tmp_path / "r" / "checkpoints" / "step_0"
    cfg = load_config(None, TINY)
    from longrl.models.load import load_policy

    torch.manual_seed(cfg.train.seed)
    init, _ = load_policy(cfg.model, torch.device("cpu"))  # the weights before SFT
    after = load_file(step0 / "model.safetensors")
    changed = [k for k, v in init.state_dict().items() if k in after and not torch.equal(v, after[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only adapted layers moved
    adapter = load_file(step0 / lora.ADAPTER_DIR / "adapter_model.safetensors")
    assert all(not v.any() for k, v in adapter.items() if "lora_B" in k)  # RL's adapter starts fresh
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["accuracy_after_rl"] == summary["accuracy_after_sft"]
