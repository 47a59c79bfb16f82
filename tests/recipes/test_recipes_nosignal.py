"""Steps without a learning signal make no update (issue 16): when every group's rewards are
equal (and there is no KL term) the gradient is zero, but AdamW would still move the weights
on its momentum and weight decay. The step leaves the weights and the optimizer's moments
bit-equal, counts itself, and keeps the LR schedule in step; with KL it trains. Also: the
logged lr is the one the update used."""

from dataclasses import replace

import torch

from longrl.config import Config
from longrl.data.example import Example
from longrl.policy.text import TextPolicy
from longrl.recipes import dpo, grpo
from longrl.rollout.hf import HFBackend

G, N = 2, 3


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                        eos_token_id=1)).double()


def _rollouts(rewards):
    gen = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(2, 40, (n,), generator=gen).tolist()  # noqa: E731
    prompts = [ids(4) for _ in range(N) for _ in range(G)]
    responses = [ids(n) for n in (3, 5, 2, 4, 6, 1)]
    rewards = torch.tensor(rewards, dtype=torch.float32)
    return grpo.Rollouts([Example(id=str(i // G), prompt="", answer="") for i in range(N * G)], prompts, responses,
                         [[-1.0] * len(r) for r in responses], [[0] * len(r) for r in responses],
                         torch.zeros(N * G, dtype=torch.bool), rewards, {"correctness": rewards})


def _cfg(**rl):
    cfg = Config()
    cfg.rl = replace(cfg.rl, group_size=G, prompts_per_step=N, lr=1e-2, warmup_steps=2, **rl)
    return cfg


def _step(module, step_fn, model, cfg, state, rewards, monkeypatch):
    monkeypatch.setattr(module, "collect", lambda *a, **k: (_rollouts(rewards), {}))
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()
    policy = TextPolicy.from_config(model, tok, cfg)
    return step_fn(policy, HFBackend(model, eos_id=1, pad_id=0), None, cfg, state)


def _snapshot(model, optimizer):
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()
               if p in optimizer.state}
    return weights, moments


def _equal(a, b):
    (wa, ma), (wb, mb) = a, b
    return all(torch.equal(wa[k], wb[k]) for k in wa) and ma.keys() == mb.keys() and all(
        all(torch.equal(ma[p][k], mb[p][k]) for k in ma[p]) for p in ma)


def test_a_grpo_step_without_signal_leaves_weights_and_moments_bit_equal(monkeypatch):
    model, cfg = _model(), _cfg()
    state = grpo.init_state(model, cfg, n_train=N)
    m1 = _step(grpo, grpo.grpo_step, model, cfg, state, [1, 0, 0, 1, 1, 0], monkeypatch)  # signal: trains
    assert m1["train/no_signal_steps"] == 0 and m1["lr"] == 0.5e-2  # warm-up step 1 of 2 used half the rate
    after_first = _snapshot(model, state.optimizer)
    m2 = _step(grpo, grpo.grpo_step, model, cfg, state, [1, 1, 0, 0, 0.5, 0.5], monkeypatch)  # every group constant
    assert _equal(_snapshot(model, state.optimizer), after_first)  # AdamW's momentum did not move anything
    assert m2["train/no_signal_steps"] == 1 and "loss/policy" not in m2 and m2["lr"] == 1e-2
    assert state.step == 2 and state.scheduler.last_epoch == 2  # the schedule counts RL steps
    _step(grpo, grpo.grpo_step, model, cfg, state, [1, 0, 0, 1, 1, 0], monkeypatch)
    assert not _equal(_snapshot(model, state.optimizer), after_first)  # and the next real step trains


def test_with_a_kl_term_the_same_step_trains(monkeypatch):
    model, cfg = _model(), _cfg(kl_coef=0.1)
    state = grpo.init_state(model, cfg, n_train=N)
    with torch.no_grad():  # the policy differs from its reference: the KL term has a gradient
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = _snapshot(model, state.optimizer)
    m = _step(grpo, grpo.grpo_step, model, cfg, state, [1, 1, 0, 0, 0.5, 0.5], monkeypatch)
    assert m["train/no_signal_steps"] == 0 and not _equal(_snapshot(model, state.optimizer), before)


def test_a_dpo_step_without_pairs_makes_no_update(monkeypatch):
    model, cfg = _model(), _cfg(algorithm="dpo")
    state = grpo.init_state(model, cfg, n_train=N)
    _step(dpo, dpo.dpo_step, model, cfg, state, [1, 0, 0, 1, 1, 0], monkeypatch)  # pairs: trains
    after_first = _snapshot(model, state.optimizer)
    m = _step(dpo, dpo.dpo_step, model, cfg, state, [1, 1, 0, 0, 0.5, 0.5], monkeypatch)
    assert m["dpo/pairs"] == 0 and m["train/no_signal_steps"] == 1
    assert _equal(_snapshot(model, state.optimizer), after_first)


def test_without_sft_the_held_out_set_is_evaluated_once(tmp_path, monkeypatch, capsys):
    from longrl.cli import main
    from longrl.recipes import train

    calls = []
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["train", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
                 "task.n_eval=4", "sft.steps=0", "rl.steps=1", "rl.prompts_per_step=2", "rl.group_size=2",
                 "rollout.max_new_tokens=4", "eval.max_new_tokens=4", "run.progress=false",
                 f"run.out_dir={tmp_path}", "run.name=n"]) == 0
    assert len(calls) == 2  # before RL (once, not twice on the same weights) and after it
    assert "after SFT" not in capsys.readouterr().out


def test_eval_honours_train_threads(tmp_path, monkeypatch):
    import torch

    from longrl.cli import main

    assert main(["train", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
                 "task.n_eval=2", "sft.steps=0", "rl.steps=0", "run.progress=false", f"run.out_dir={tmp_path}",
                 "run.name=e"]) == 0
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    assert main(["eval", f"model={tmp_path / 'e' / 'checkpoints' / 'step_0'}", "task.n_eval=2", "train.threads=1"]) == 0
    assert seen == [1]


def test_a_run_whose_rewards_stay_zero_warns_once(tmp_path, capsys):
    from longrl.cli import main
    from longrl.recipes.train import ZERO_REWARD_STEPS

    assert main(["train", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
                 "task.n_eval=2", "sft.steps=0", f"rl.steps={ZERO_REWARD_STEPS + 2}", "rl.prompts_per_step=2",
                 "rl.group_size=2", "rl.eval_every=0", "rollout.max_new_tokens=3", "eval.max_new_tokens=3",
                 "run.progress=false", f"run.out_dir={tmp_path}", "run.name=z"]) == 0  # a random model: reward 0
    err = capsys.readouterr().err
    assert err.count("scored reward 0") == 1 and f"for {ZERO_REWARD_STEPS} RL steps in a row (steps 1-" in err


def test_eval_shows_progress_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    import io
    import sys

    from longrl.cli import main

    assert main(["train", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
                 "task.n_eval=3", "sft.steps=0", "rl.steps=0", "run.progress=false", f"run.out_dir={tmp_path}",
                 "run.name=p"]) == 0
    ckpt = tmp_path / "p" / "checkpoints" / "step_0"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for term, bar in ((False, False), (True, True)):
        capsys.readouterr()
        if term:
            monkeypatch.setattr(sys, "stderr", Terminal())
        assert main(["eval", f"model={ckpt}", "task.n_eval=3", "eval.max_new_tokens=3", "eval.batch_size=2"]) == 0
        err = sys.stderr.getvalue() if term else capsys.readouterr().err
        assert ("3/3" in err) == bar  # the bar counts the examples as they decode
