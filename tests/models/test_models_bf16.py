"""bf16 mixed precision without FSDP (`train.dtype=bfloat16`, `longrl.models.precision`).

Tolerances, stated: on the tiny model (hidden 64, 2 layers, random weights, 40-token rows)
bf16 compute tracks fp32 to a per-token log-prob error below 0.02 (max) and 2e-3 (mean), a
gradient within 2% (relative L2), and the SFT loss over 8 steps within 1% at each step
(measured on this CPU: 1.2e-3, 3.1e-4, 0.34%), loose enough for another CPU's bf16
kernels. The fp32 master weights keep updates that bf16 weights would round away (tested).
"""

import copy
import json

import pytest
import torch

from longrl.cli import main
from longrl.config import ModelConfig, TinyModelConfig
from longrl.models.load import load_policy
from longrl.models.precision import compute_dtype, set_compute_dtype
from longrl.policy.text import TextPolicy
from longrl.recipes.common import make_optimizer
from longrl.rl.losses import sft_loss
from longrl.streambp.logprobs import make_batch

SHAPE = TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128)
MODES = ["standard", "chunked", "checkpoint", "streambp"]


def _models():
    torch.manual_seed(0)
    fp32, tok = load_policy(ModelConfig(tiny=SHAPE), torch.device("cpu"))
    return fp32, set_compute_dtype(copy.deepcopy(fp32), "bfloat16"), tok


def _batch(tok, n=4, length=40):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, len(tok), (n, length), generator=g).tolist()
    return make_batch([r[:8] for r in ids], [r[8:] for r in ids], tok.pad_token_id)


def _err(a, b, mask):
    d = (a - b).abs() * mask
    return float(d.max()), float(d.sum() / mask.sum())


@pytest.mark.parametrize("mode", MODES)
def test_bf16_logprobs_and_gradients_track_fp32(mode):
    fp32, bf16, tok = _models()
    batch = _batch(tok)
    n = float(batch.mask.sum())
    out = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        policy = TextPolicy(model, tok, chunk=8, backprop=mode)
        logp = policy.logprobs(batch, [None] * 4)
        assert logp.dtype == torch.float32
        loss, _, _ = policy.loss_and_backward(batch, [None] * 4, lambda lp: sft_loss(lp, batch.mask, n))
        assert loss.dtype == torch.float32
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert grad.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
        out[name] = logp, grad
    worst, mean = _err(out["fp32"][0], out["bf16"][0], batch.mask)
    assert 0 < worst < 0.02 and mean < 2e-3  # > 0: the bf16 matmuls really ran, on this path too
    rel = float((out["fp32"][1] - out["bf16"][1]).norm() / out["fp32"][1].norm())
    assert 0 < rel < 0.02


def test_small_updates_survive_in_the_fp32_master_weights_and_vanish_in_bf16_ones():
    """Why the master weights stay fp32: an lr-1e-5 AdamW step (updates ~1e-5) moves every
    fp32 weight, while bf16 weights (8 bits of mantissa) round most of those updates away."""
    fp32, bf16, tok = _models()
    pure = copy.deepcopy(fp32).to(torch.bfloat16)
    batch = _batch(tok)
    n = float(batch.mask.sum())
    moved = {}
    for name, model in (("mixed", bf16), ("pure", pure)):
        before = [p.detach().clone() for p in model.parameters()]
        policy, opt = TextPolicy(model, tok, chunk=8), make_optimizer(model, 1e-5, 0.0)
        policy.loss_and_backward(batch, [None] * 4, lambda lp: sft_loss(lp.float(), batch.mask, n))
        opt.step()
        changed = sum(int((p != b).sum()) for p, b in zip(model.parameters(), before))
        moved[name] = changed / sum(b.numel() for b in before)
    assert moved["mixed"] > 0.99 and moved["pure"] < 0.5


def test_sft_steps_in_bf16_track_fp32_and_keep_fp32_master_weights():
    fp32, bf16, tok = _models()
    batch = _batch(tok)
    n = float(batch.mask.sum())
    losses = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        policy, opt = TextPolicy(model, tok, chunk=8), make_optimizer(model, 3e-3, 0.0)
        losses[name] = []
        for _ in range(8):
            loss, _, _ = policy.loss_and_backward(batch, [None] * 4, lambda lp: sft_loss(lp, batch.mask, n))
            opt.step()
            opt.zero_grad()
            losses[name].append(float(loss))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert losses["fp32"][-1] < losses["fp32"][0] - 0.1  # it learns, so the comparison means something
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) / a < 0.01
    assert losses["fp32"] != losses["bf16"]


def test_a_copy_keeps_the_compute_dtype_and_its_own_weights():
    fp32, bf16, tok = _models()
    ref = copy.deepcopy(bf16)  # GRPO's frozen reference
    assert compute_dtype(ref) == torch.bfloat16 and compute_dtype(fp32) is None
    batch = _batch(tok)
    before = TextPolicy(ref, tok, chunk=8).logprobs(batch, [None] * 4)
    with torch.no_grad():
        for p in bf16.parameters():
            p.add_(0.1)
    assert torch.equal(TextPolicy(ref, tok, chunk=8).logprobs(batch, [None] * 4), before)


def test_lora_adapters_run_in_bf16_too_also_a_fresh_one():
    pytest.importorskip("peft")
    from longrl.config import LoRAConfig
    from longrl.models import lora

    _, bf16, _ = _models()
    cfg = LoRAConfig(r=4)
    lora.apply_lora(bf16, cfg)
    lora.new_adapter(bf16, cfg, base_moved=True)
    adapter = [m for n, m in bf16.named_modules() if n.endswith("lora_A.default")]
    assert adapter and all(getattr(type(m), "longrl_compute_dtype", None) == torch.bfloat16 for m in adapter)


def test_train_dtype_bf16_runs_end_to_end(tmp_path):
    args = ["train", f"run.out_dir={tmp_path}", "run.name=r", "run.progress=false", "train.dtype=bf16",
            "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
            "task.n_train=50", "task.n_eval=4", "sft.steps=3", "sft.batch_size=4", "rl.steps=2",
            "rl.prompts_per_step=2", "rl.group_size=2", "rl.kl_coef=0.05", "rollout.max_new_tokens=8",
            "eval.max_new_tokens=8"]
    assert main(args) == 0
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # The engine samples with the same bf16 projections the trainer computes with.
    assert all(r["logprob/engine_trainer_gap"] < 1e-4 for r in recs if "logprob/engine_trainer_gap" in r)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "r" / "checkpoints" / "step_2" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())  # fp32 master weights are what is saved
    assert main([*args, "run.name=bad", "model.dtype=bfloat16"]) == 2  # bf16 compute needs fp32 master weights
