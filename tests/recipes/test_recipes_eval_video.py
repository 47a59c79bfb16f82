"""`longrl eval` on a video task: loads the saved VLM checkpoint and scores the held-out
videos with the video recipe, giving the accuracy the training run logged."""

import json

import pytest

pytest.importorskip("av", reason="video tests need PyAV (pip install -e '.[video]')")

from longrl.cli import main  # noqa: E402
from longrl.recipes.evaluate import run_eval  # noqa: E402

TINY = [
    "task.name=videos", "task.n_train=4", "task.n_eval=3", "task.kwargs.kinds=colour",
    "task.kwargs.min_seconds=3", "task.kwargs.max_seconds=4",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
    "video.max_frames=4", "video.max_pixels=3136",
    "sft.steps=3", "sft.batch_size=2", "sft.warmup_steps=1", "sft.lr=1e-2",
    "rl.steps=1", "rl.prompts_per_step=2", "rl.group_size=2", "rl.eval_every=0",
    "rollout.max_new_tokens=8", "eval.max_new_tokens=8", "run.progress=false",
]


def test_eval_on_a_video_checkpoint_matches_the_training_runs_final_accuracy(tmp_path):
    data = f"task.train_file={tmp_path}/vids/train.jsonl"
    assert main(["train", *TINY, data, f"run.out_dir={tmp_path}", "run.name=v"]) == 0
    summary = json.loads((tmp_path / "v" / "summary.json").read_text())
    ckpt = tmp_path / "v" / "checkpoints" / "step_1"
    result = run_eval([f"model={ckpt}", *TINY, data])
    assert result["n"] == 3 and result["task"].startswith("videos:")
    assert result["accuracy"] == pytest.approx(summary["accuracy_after_rl"])
    assert result["response_len"] > 0


def test_eval_on_a_video_task_writes_per_item_results(tmp_path, capsys):
    data = f"task.train_file={tmp_path}/vids/train.jsonl"
    assert main(["train", *TINY, data, f"run.out_dir={tmp_path}", "run.name=v", "rl.steps=0"]) == 0
    ckpt = tmp_path / "v" / "checkpoints" / "step_0"
    result = run_eval([f"model={ckpt}", *TINY, data], out=str(tmp_path / "items.jsonl"))
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert len(items) == 3 and all(it["media"] and it["media"][0].endswith(".mp4") for it in items)
    assert sum(it["correct"] for it in items) / 3 == pytest.approx(result["accuracy"])
    assert {it["id"] for it in items} == {json.loads(x)["id"] for x in (tmp_path / "vids" / "eval.jsonl").read_text().splitlines()}


def test_video_task_without_pyav_fails_before_writing_anything(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    data = tmp_path / "data" / "vids"
    assert main(["train", *TINY, f"task.train_file={data}/train.jsonl", f"run.out_dir={tmp_path}/runs"]) == 2
    assert "needs PyAV" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
