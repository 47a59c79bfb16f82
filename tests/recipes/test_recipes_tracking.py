"""`longrl train run.report_to=tensorboard` end to end: every RL metric at its step, the
held-out samples at each eval, curves.png written before the run ends, plain log lines
without a terminal, and wall_seconds counting the whole run across a resume."""

import json

import pytest

from longrl.cli import main

TINY = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
        "task.n_train=40", "task.n_eval=4", "sft.steps=3", "rl.steps=4", "rl.prompts_per_step=2",
        "rl.group_size=2", "rl.eval_every=2", "rollout.max_new_tokens=6", "eval.max_new_tokens=6",
        "run.save_every=2"]


def test_tensorboard_receives_the_run_and_lines_are_printed(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", *TINY, f"run.out_dir={tmp_path}", "run.name=t", "run.report_to=tensorboard",
                 "run.progress=false", "run.log_every=2"]) == 0
    run = tmp_path / "t"
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("reward/mean")] == [1, 2, 3, 4]
    assert [e.step for e in ea.Scalars("eval/accuracy")] == [0, 2, 4]
    assert [e.step for e in ea.Scalars("sft/loss")] == [1, 2, 3]
    assert sorted(e.step for e in ea.Tensors("samples/text_summary")) == [0, 2, 4]
    assert (run / "curves.png").is_file()
    err = capsys.readouterr().err
    assert sum(line.startswith("grpo") for line in err.splitlines()) == 2  # RL steps 2 and 4 (log_every=2)


def test_wall_seconds_counts_the_run_before_a_resume(tmp_path):
    import time

    import yaml

    from longrl.checkpoint import load_trainer_state

    # SFT makes the first part long, so a summary that counted only the resumed part would fail.
    assert main(["train", *TINY, "sft.steps=40", f"run.out_dir={tmp_path}", "run.name=w", "run.progress=false",
                 "rl.steps=2"]) == 0
    before = load_trainer_state(tmp_path / "w" / "checkpoints" / "step_2")["results"]["wall_seconds"]
    t0 = time.time()
    assert main(["train", f"resume={tmp_path / 'w'}", "rl.steps=4", "run.progress=false"]) == 0
    resumed = time.time() - t0
    total = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert before <= total["wall_seconds"] <= before + resumed
    assert yaml.safe_load((tmp_path / "w" / "config.yaml").read_text())["rl"]["steps"] == 4
    assert "torch" in total["versions"] and total["rollout_backend"] == "hf"
