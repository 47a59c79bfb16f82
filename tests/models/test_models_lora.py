"""LoRA (`longrl.models.lora`): adapter gradients against a brute-force reference, merge ==
adapter forward, the disabled adapter is the base exactly, checkpoints load in plain
transformers (without peft) and restore bit for bit."""

import copy
import subprocess
import sys

import pytest
import torch

from longrl.config import LoRAConfig, ModelConfig, TinyModelConfig, load_config
from longrl.errors import UserError
from longrl.models import lora
from longrl.models.load import load_policy, save_policy
from longrl.policy.text import TextPolicy
from longrl.rl.losses import sft_loss
from longrl.streambp.logprobs import make_batch

pytest.importorskip("peft")

SHAPE = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
LORA = LoRAConfig(r=4, alpha=8.0)


def _model(lora_cfg=LORA, seed=0):
    """(plain base copy, adapted model, tokenizer); the adapter's B is random (not zero),
    so the adapter changes the model and every adapter weight gets a gradient."""
    torch.manual_seed(seed)
    model, tok = load_policy(ModelConfig(tiny=SHAPE), torch.device("cpu"))
    base = copy.deepcopy(model)
    lora.apply_lora(model, lora_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return base, model, tok


def _rows(tok, n=3, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(tok), (n, length), generator=g).tolist()
    return [r[:4] for r in ids], [r[4:] for r in ids]  # prompts, responses (equal lengths: no padding)


def test_adapter_gradients_equal_a_brute_force_reference():
    base, model, tok = _model()
    prompts, responses = _rows(tok)
    batch = make_batch(prompts, responses, tok.pad_token_id)
    norm = float(batch.mask.sum())
    TextPolicy(model, tok, chunk=4).loss_and_backward(batch, [None] * 3, lambda lp: sft_loss(lp, batch.mask, norm))
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got and all(g is not None for g in got.values())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)  # the base is frozen

    # Brute force: the plain model with W + (alpha / r) * B @ A written out for every
    # adapted layer, full [B, T, V] logits, autograd on the A and B leaves.
    scale = LORA.alpha / LORA.r
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if "lora_" in n}
    weights = dict(base.named_parameters())
    for name in {n.split(".lora_")[0] for n in leaves}:
        A, B = leaves[f"{name}.lora_A.default.weight"], leaves[f"{name}.lora_B.default.weight"]
        weights[f"{name}.weight"] = weights[f"{name}.weight"].detach() + scale * B @ A
    logits = torch.func.functional_call(base, weights, (batch.input_ids,)).logits  # [B, T, V]
    logp = logits.log_softmax(-1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    (-(logp * batch.mask).sum() / norm).backward()
    assert set(got) == set(leaves)
    for name, leaf in leaves.items():
        torch.testing.assert_close(got[name], leaf.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_disabled_adapter_gives_the_base_logprobs_exactly():
    base, model, tok = _model()
    batch = make_batch(*_rows(tok), tok.pad_token_id)
    policy = TextPolicy(model, tok, chunk=4)
    with lora.DisabledAdapter(model) as off:
        disabled = policy.logprobs(batch, [None] * 3, model=off)
    assert torch.equal(disabled, policy.logprobs(batch, [None] * 3, model=base))
    adapted = policy.logprobs(batch, [None] * 3)
    assert (adapted - disabled).abs().max() > 1e-3  # the adapter is on again, and it matters
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_merge_equals_the_adapter_forward_and_a_new_adapter_starts_from_it():
    _, model, tok = _model()
    ids = torch.tensor(_rows(tok)[1])
    with torch.no_grad():
        adapted = model(ids).logits
        merged_weights = lora.merged_state_dict(model)
        lora.new_adapter(model, LORA, base_moved=True)  # merge in place, then a fresh adapter (B = 0)
        after = model(ids).logits
        with lora.adapter_disabled(model):
            base_now = model(ids).logits
    torch.testing.assert_close(after, adapted, rtol=0, atol=1e-5)
    assert torch.equal(after, base_now)  # the fresh adapter adds exactly nothing
    assert lora.base_moved(model) and lora.trainable_parameters(model) > 0
    merged_now = lora.base_state_dict(model)
    assert set(merged_now) == set(merged_weights)
    for k, v in merged_weights.items():
        torch.testing.assert_close(merged_now[k], v, rtol=0, atol=1e-6)


PLAIN_LOAD = """
import sys, torch
sys.modules["peft"] = None  # plain transformers: importing peft fails
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
ids = torch.load(sys.argv[2])
torch.save(model(ids).logits.detach(), sys.argv[3])
"""


def test_a_saved_lora_model_loads_in_plain_transformers_without_peft(tmp_path):
    _, model, tok = _model()
    save_policy(model, tok, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / lora.ADAPTER_DIR / "adapter_config.json").is_file()
    assert not (tmp_path / "ckpt" / "adapter_config.json").exists()  # transformers would reach for peft
    ids = torch.tensor(_rows(tok)[1])
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, timeout=300)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("moved", [False, True])
def test_restore_brings_back_base_and_adapter_bit_for_bit(tmp_path, moved):
    base, model, tok = _model()
    step0 = tmp_path / "step_0"
    save_policy(base, tok, step0)  # the run's post-SFT weights
    if moved:  # a DPO round merged: the base is no longer step_0's, so the checkpoint carries it
        lora.new_adapter(model, LORA, base_moved=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.2)
    save_policy(model, tok, tmp_path / "step_2")
    assert (tmp_path / "step_2" / lora.BASE_FILE).is_file() == moved
    _, again, _ = _model(seed=5)  # other weights, other adapter
    lora.restore_lora(again, tmp_path / "step_2", step0)
    want, got = model.state_dict(), again.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert lora.base_moved(again) == moved


def test_only_the_named_modules_get_adapters():
    _, model, _ = _model(LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(UserError, match="target_modules"):
        _model(LoRAConfig(r=2, target_modules=["no_such_layer"]))


def test_lora_settings_are_checked_when_the_config_loads():
    cfg = load_config(None, ["model.lora.r=8", "model.lora.target_modules=q_proj, v_proj"])
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    for bad, what in [(["rl.dpo_rounds=2", "rl.algorithm=dpo"], "model.lora.r"),
                      (["rl.dpo_rounds=3", "rl.algorithm=dpo", "model.lora.r=4", "rl.steps=10"], "rounds of equal"),
                      (["model.lora.r=-1"], "r=-1"), (["model.lora.r=4", "model.lora.dropout=1.5"], "dropout")]:
        with pytest.raises(UserError, match=what):
            load_config(None, bad)
    cfg = load_config(None, ["model.lora.r=4", "parallel.fsdp=true"])  # with FSDP2: tests/parallel/test_parallel_fsdp_lora.py
    assert cfg.model.lora.r == 4 and cfg.parallel.fsdp


def test_gla_models_take_adapters_too():
    """The GLA model (not a transformers generation model) gets a plain peft adapter."""
    torch.manual_seed(0)
    shape = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model, tok = load_policy(ModelConfig(arch="gla", tiny=shape), torch.device("cpu"))
    base = copy.deepcopy(model)
    lora.apply_lora(model, LORA)
    batch = make_batch(*_rows(tok), tok.pad_token_id)
    policy = TextPolicy(model, tok, chunk=4)
    with lora.DisabledAdapter(model) as off:
        assert torch.equal(policy.logprobs(batch, [None] * 3, model=off), policy.logprobs(batch, [None] * 3, model=base))
    n = float(batch.mask.sum())
    policy.loss_and_backward(batch, [None] * 3, lambda lp: sft_loss(lp, batch.mask, n))
    trained = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    # A fresh B is zero, so A's gradient is zero too; B's is not.
    assert all(g is not None and g.abs().sum() > 0 for name, g in trained.items() if "lora_B" in name)


def test_lora_defaults_follow_the_model():
    """model.lora.sft=auto: adapters in SFT for a pretrained checkpoint, every weight for the
    randomly initialised tiny model; adapters train at lr_scale x the phase's rate."""
    from longrl.config import load_config, lora_sft, phase_lr

    tiny = load_config(None, ["model.lora.r=16"])
    assert tiny.model.lora.sft == "auto" and not lora_sft(tiny)
    assert lora_sft(load_config(None, ["model.lora.r=16", "model.lora.sft=true"]))
    assert not lora_sft(load_config(None, ["model.lora.r=16", "model.lora.sft=no"]))
    pretrained = load_config(None, ["model.lora.r=16", "model.path=/some/model"])
    assert lora_sft(pretrained) and not lora_sft(load_config(None, ["model.path=/some/model"]))
    assert phase_lr(tiny, 5e-5, adapters=True) == pytest.approx(5e-4) and phase_lr(tiny, 5e-5, adapters=False) == 5e-5
    with pytest.raises(UserError, match="model.lora.sft"):
        load_config(None, ["model.lora.r=16", "model.lora.sft=maybe"])
    with pytest.raises(UserError, match="lr_scale"):
        load_config(None, ["model.lora.r=16", "model.lora.lr_scale=0"])
