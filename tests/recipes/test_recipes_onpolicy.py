"""Exactly on-policy GRPO updates skip the separate old log-prob pass (issue 16): one PPO epoch,
nothing reading the old log-probs before the update. The update then takes old = its own
log-probs, detached (ratio exactly 1). Checked here: the same step with and without the skip
ends at the same parameters (float64, 1e-12) and the same metrics, with KL, loss masks,
truncation filtering, TIS, uneven lengths, micro-batches and row groups; the policy's model
really runs no no-grad forward; and the pass stays where it is needed (epochs > 1, mismatch
masking, APRIL)."""

from dataclasses import replace

import pytest
import torch

from longrl.config import Config
from longrl.data.example import Example
from longrl.policy.text import TextPolicy
from longrl.recipes import grpo
from longrl.rollout.hf import HFBackend

G, N = 2, 3
LENGTHS = (3, 5, 2, 4, 6, 1)  # uneven responses


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                        eos_token_id=1)).double()


def _rollouts():
    gen = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(2, 40, (n,), generator=gen).tolist()  # noqa: E731
    prompts = [ids(p) for p in (4, 2, 5, 3, 4, 6)]
    responses = [ids(n) for n in LENGTHS]
    behaviour = [(-torch.rand(n, generator=gen, dtype=torch.float64) * 3).tolist() for n in LENGTHS]
    loss_masks = [[1] * n for n in LENGTHS]
    loss_masks[4][1:3] = [0, 0]  # a tool result inside a response: no loss
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.25])
    truncated = torch.tensor([False, True, False, False, False, False])
    return grpo.Rollouts([Example(id=str(i // G), prompt="", answer="") for i in range(N * G)], prompts, responses,
                         behaviour, [[0] * n for n in LENGTHS], truncated, rewards, {"correctness": rewards},
                         loss_masks)


def _cfg(pass_tokens=0, rl=None, rollout=None):
    cfg = Config()
    cfg.rl = replace(cfg.rl, **{**dict(group_size=G, prompts_per_step=N, lr=1e-2, warmup_steps=0,
                                       micro_batch_size=4), **(rl or {})})
    cfg.rollout = replace(cfg.rollout, **(rollout or {}))
    cfg.train = replace(cfg.train, pass_tokens=pass_tokens)
    return cfg


def _run(cfg, monkeypatch, skip: bool | None = None):
    """One GRPO step on fixed rollouts; `skip` forces the decision (None: the recipe's own).
    -> (parameters after the step, metrics, [grad enabled?] of each policy-model forward)."""
    monkeypatch.setattr(grpo, "collect", lambda *a, **k: (_rollouts(), {}))
    if skip is not None:
        monkeypatch.setattr(grpo, "on_policy_update", lambda cfg: skip)
    model = _model()
    state = grpo.init_state(model, cfg, n_train=N)  # the reference (KL) is a copy of these weights
    with torch.no_grad():  # move the policy off its reference, so the KL term has a gradient
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    forwards = []
    model.model.register_forward_hook(lambda *a: forwards.append(torch.is_grad_enabled()))
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()
    m = grpo.grpo_step(TextPolicy.from_config(model, tok, cfg), HFBackend(model, eos_id=1, pad_id=0), None, cfg, state)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, m, forwards


VARIANTS = {
    "ppo-kl-filter": dict(rl=dict(kl_coef=0.1, overlong="filter")),
    "ppo-tis-seqmean": dict(rl=dict(loss_agg="seq-mean-token-mean"), rollout=dict(offpolicy="tis", tis_clip=1.5)),
    "gspo-kl": dict(rl=dict(loss="gspo", kl_coef=0.05, kl_estimator="k2", micro_batch_size=2)),
}


@pytest.mark.parametrize("pass_tokens", [0, 12])  # one forward per micro-batch / row groups of <= 12 positions
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_skip_gives_the_same_update(variant, pass_tokens, monkeypatch):
    cfg = _cfg(pass_tokens, **VARIANTS[variant])
    assert grpo.on_policy_update(cfg)
    w_skip, m_skip, f_skip = _run(cfg, monkeypatch, skip=True)
    w_pass, m_pass, f_pass = _run(cfg, monkeypatch, skip=False)
    assert not all(torch.equal(w_skip[k], _model().state_dict()[k]) for k in w_skip)  # the step trained
    for k in w_pass:
        assert torch.allclose(w_skip[k], w_pass[k], rtol=0, atol=1e-12), k
    for key in ("loss/policy", "logprob/engine_trainer_gap", "clip/frac_low", "clip/frac_high", "ratio/mean",
                "grad/norm", *(["loss/kl", "kl/mean"] if "kl" in variant else [])):
        assert m_skip[key] == pytest.approx(m_pass[key], rel=1e-10, abs=1e-12), key
    assert m_skip["logprob/engine_trainer_gap"] > 0.1  # behaviour log-probs differ from the trainer's
    assert m_skip["ratio/mean"] == 1.0 and m_skip["clip/frac_low"] == m_skip["clip/frac_high"] == 0.0
    assert sum(not g for g in f_pass) > 0 and sum(not g for g in f_skip) == 0  # the pass ran / did not


def test_on_policy_the_policy_model_runs_only_the_training_forwards(monkeypatch):
    cfg = _cfg(pass_tokens=12)
    _, _, forwards = _run(cfg, monkeypatch)
    assert forwards and all(forwards)  # every forward of the policy's model is a training one (with grad)
    _, _, forwards = _run(_cfg(pass_tokens=0, rl=dict(micro_batch_size=2)), monkeypatch)
    assert forwards == [True, True, True]  # one per micro-batch, nothing else


@pytest.mark.parametrize("change", [dict(rl=dict(ppo_epochs=2)), dict(rollout=dict(mismatch_threshold=5.0))])
def test_the_old_pass_runs_where_the_update_needs_it(change, monkeypatch):
    cfg = _cfg(pass_tokens=12, **change)
    assert not grpo.on_policy_update(cfg)
    _, m, forwards = _run(cfg, monkeypatch)
    assert sum(not g for g in forwards) > 0  # the no-grad old pass ran before the update
    assert "logprob/engine_trainer_gap" in m and "rollout/mismatch_masked_frac" in m


def test_april_keeps_the_old_pass():
    assert grpo.on_policy_update(_cfg())
    assert not grpo.on_policy_update(_cfg(rollout=dict(partial=True)))
    assert not grpo.on_policy_update(_cfg(rl=dict(ppo_epochs=3)))
