"""RL length and learning rate that follow the task and the model (issue 16 item 6).

rl.stop_when_flat (`recipes.common.reward_plateau`): at every 20-step window's end from step
40, the mean training reward of the window's last 10 steps and the held-out accuracy there,
each against its best earlier value; when neither is 0.02 above it, RL ends there. rl.lr=0: 5e-5 for the model built from scratch, 1e-5
for a checkpoint. Hand-worked reward histories; `longrl train` end to end with a stand-in RL
step (the rule reads only reward/mean), reporting, config.yaml, summary.json and resume."""

import json

import pytest
import yaml

from longrl.cli import main
from longrl.config import PLATEAU_DELTA, PLATEAU_WINDOW, Config, eval_cadence, load_config, resolve_rl_lr, rl_lr
from longrl.errors import UserError
from longrl.recipes import train
from longrl.recipes.common import reward_plateau


def _flat(rewards, held_out=None):
    return reward_plateau(rewards, held_out or {}, PLATEAU_WINDOW, PLATEAU_DELTA)


def test_the_rule_stops_only_at_a_window_end_from_the_second_window():
    assert (PLATEAU_WINDOW, PLATEAU_DELTA) == (20, 0.02)
    flat = [0.5] * 40
    assert _flat(flat[:20]) is None  # one window: nothing to compare with
    assert _flat(flat[:39]) is None and _flat(flat + [0.5]) is None  # not a window's end
    assert _flat(flat) == "training reward flat: 0.500 over steps 31-40, best earlier window 0.500 (each needs +0.02)"


def test_a_rising_reward_runs_on():
    rising = [0.01 * i for i in range(1, 121)]  # +0.2 per window
    assert all(_flat(rising[:n]) is None for n in range(1, 121))


def test_rise_then_flat_stops_at_the_first_flat_window():
    # windows' last halves: 0.4, 0.6, 0.61 (only +0.01 on the best, 0.6), 0.7
    rewards = [0.2] * 10 + [0.4] * 10 + [0.6] * 20 + [0.61] * 20 + [0.7] * 20
    assert _flat(rewards[:40]) is None  # 0.6 >= 0.4 + 0.02
    assert _flat(rewards[:60]).startswith("training reward flat: 0.610 over steps 51-60, best earlier window 0.600")


def test_only_the_last_half_of_a_window_counts_and_the_best_earlier_window_is_the_bar():
    # window 2's first half is high (0.9) but its last half is back at window 1's 0.5: flat
    assert _flat([0.5] * 20 + [0.9] * 10 + [0.5] * 10) is not None
    # window 3 beats window 2 (0.3) but not window 1 (0.5): flat
    assert _flat([0.5] * 20 + [0.3] * 20 + [0.51] * 20) is not None
    assert _flat([0.5] * 20 + [0.3] * 20 + [0.53] * 20) is None  # 0.53 >= 0.5 + 0.02


def test_a_rising_held_out_accuracy_keeps_a_flat_reward_run_going():
    """The default run of the previous stop: sampled rewards 0.504 / 0.494 / 0.523 over the
    windows' last halves while greedy held-out accuracy went 0.27 (after SFT) / 0.50 / 0.72 / 0.735."""
    rewards = [0.504] * 20 + [0.494] * 20 + [0.523] * 20
    acc = {0: 0.27, 20: 0.50, 40: 0.72, 60: 0.735}
    assert _flat(rewards[:40]) is not None  # the reward alone would stop at 40 ...
    assert _flat(rewards[:40], {k: v for k, v in acc.items() if k <= 40}) is None  # ... held-out +0.22: on
    reason = _flat(rewards, acc)  # 0.735 < 0.72 + 0.02 and 0.523 < 0.504 + 0.02: both flat
    assert reason == ("training reward flat: 0.523 over steps 51-60, best earlier window 0.504; held-out accuracy "
                      "0.735, best earlier 0.720 (each needs +0.02)")
    assert _flat([0.01 * i for i in range(1, 61)], {0: 0.5, 20: 0.5, 40: 0.5, 60: 0.5}) is None  # reward rising: on
    assert _flat(rewards[:40], {0: 0.3, 40: 0.9}) is None  # the held-out's best earlier may be the step-0 one


@pytest.mark.parametrize("steps, stop, expected", [(120, True, 20), (120, False, 40), (60, True, 20), (12, True, 4),
                                                   (300, True, 20), (300, False, 100), (50, True, 20), (50, False, 17),
                                                   (39, True, 13)])
def test_eval_cadence_meets_every_point_where_the_run_may_stop(steps, stop, expected):
    cfg = Config()
    cfg.rl.steps, cfg.rl.stop_when_flat = steps, stop
    assert eval_cadence(cfg) == expected


def test_the_learning_rate_follows_the_model():
    cfg = Config()
    assert cfg.rl.lr == 0 and rl_lr(cfg) == 5e-5  # the tiny model built from scratch: the default run's rate
    cfg.model.path = "models/smollm2-135m-instruct"
    assert rl_lr(cfg) == 1e-5  # a checkpoint: what SmolLM2-135M needed
    assert resolve_rl_lr(cfg) == "longrl: rl.lr = 1e-05 for a checkpoint (model.path); set rl.lr to override"
    assert cfg.rl.lr == 1e-5 and resolve_rl_lr(cfg) is None  # resolved in place, once
    cfg = load_config(None, ["rl.lr=3e-4", "model.path=x"])
    assert rl_lr(cfg) == 3e-4 and resolve_rl_lr(cfg) is None  # a rate given is kept


def test_a_negative_rate_is_refused():
    with pytest.raises(UserError, match=r"rl.lr=-0.1 must be positive \(or 0"):
        load_config(None, ["rl.lr=-0.1"])
    with pytest.raises(UserError, match="sft.lr=0.0 must be positive"):
        load_config(None, ["sft.lr=0"])


TINY = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
        "task.n_train=40", "task.n_eval=4", "sft.steps=1", "sft.batch_size=4", "rl.prompts_per_step=2",
        "rl.group_size=2", "run.progress=false", "run.save_every=1000"]


def _stand_in(rewards):
    """An RL step that only reports a training reward (the held-out accuracy is the real one:
    the weights do not move, so it stays flat)."""
    def step(policy, backend, task, cfg, state):
        state.step += 1
        return {"reward/mean": rewards[state.step - 1]}
    return step


def test_train_stops_when_flat_reports_it_and_stays_stopped_on_resume(tmp_path, capsys, monkeypatch):
    rewards = [0.1] * 10 + [0.3] * 10 + [0.5] * 20 + [0.505] * 20 + [0.9] * 60  # flat at window 3
    monkeypatch.setattr(train, "grpo_step", _stand_in(rewards))
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=p", *TINY]) == 0
    out = capsys.readouterr().out
    assert "longrl: rl.lr = 5e-05 for a model built from scratch" in out
    assert "longrl: rl.steps = 120 at most: from step 40, at every 20-step window's end" in out
    assert "longrl: stopped at RL step 60 of at most 120: training reward flat: 0.505 over steps 51-60" in out
    assert "; held-out accuracy " in out  # evaluated at step 60, and flat (the weights never moved)
    run = tmp_path / "p"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rl_steps"] == 60 and summary["rl_stop"].startswith("stopped at RL step 60")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["rl"]["lr"] == 5e-5 and saved["rl"]["eval_every"] == 20 and saved["rl"]["stop_when_flat"] is True
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rl_steps = [r["step"] for r in records if r.get("phase") == "rl" and "reward/mean" in r]
    assert rl_steps == list(range(1, 61))
    evals = [r["step"] for r in records if r.get("phase") == "rl" and "eval/accuracy" in r]
    assert evals == [0, 20, 40, 60]  # after SFT, then every window, the last one the final eval
    assert (run / "checkpoints" / "step_60").is_dir()
    assert main(["train", f"resume={run}", "run.progress=false"]) == 0  # a stopped run stays stopped
    assert json.loads((run / "summary.json").read_text())["rl_steps"] == 60
    assert main(["train", f"resume={run}", "run.progress=false", "rl.stop_when_flat=false", "rl.steps=70"]) == 0
    assert json.loads((run / "summary.json").read_text())["rl_steps"] == 70  # unless told to go on


def test_stop_when_flat_off_runs_every_step(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "grpo_step", _stand_in([0.5] * 50))
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=q", "rl.steps=50", "rl.stop_when_flat=false",
                 *TINY]) == 0
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["rl_steps"] == 50 and summary["rl_stop"] is None
