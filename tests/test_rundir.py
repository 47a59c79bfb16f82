"""Run directories: refused when taken, locked while used, cleaned after a kill, resumed
with only the overrides a resumed run can take."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from longrl import rundir
from longrl.checkpoint import write_manifest
from longrl.cli import main
from longrl.config import config_to_yaml, load_config
from longrl.errors import UserError


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"run.out_dir={tmp_path}", "run.name=r", *overrides])


def _saved_run(tmp_path, step=2):
    """A run directory as a run leaves it: config.yaml and one verified checkpoint."""
    run = tmp_path / "r"
    ckpt = run / "checkpoints" / f"step_{step}"
    ckpt.mkdir(parents=True)
    text = config_to_yaml(_cfg(tmp_path, "rl.steps=4", "task.n_train=200", "rl.lr=1e-5"))
    (run / "config.yaml").write_text(text)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "trainer_state.pt").write_bytes(b"state")
    write_manifest(ckpt, step, text)
    return run


# ----------------------------------------------------------------------------------------
# New runs
# ----------------------------------------------------------------------------------------


def test_a_run_directory_that_holds_a_run_is_refused_unless_overwrite(tmp_path):
    run = rundir.prepare_run_dir(_cfg(tmp_path))
    assert run == tmp_path / "r" and sorted(p.name for p in run.iterdir()) == [".lock"]
    (run / "config.yaml").write_text("x")
    (run / "checkpoints" / "step_4").mkdir(parents=True)
    with pytest.raises(UserError, match=rf"'{run}' already holds a run \(checkpoints, config.yaml\); continue it "
                                        rf"with resume={run}, pick another run.name, or .* run.overwrite=true"):
        rundir.prepare_run_dir(_cfg(tmp_path))
    assert (run / "checkpoints" / "step_4").is_dir()  # nothing was touched
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files longrl did not write \(notes.txt\)"):
        rundir.prepare_run_dir(_cfg(tmp_path, "run.overwrite=true"))
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step_4").is_dir()  # refused before deleting
    (run / "notes.txt").unlink()
    assert rundir.prepare_run_dir(_cfg(tmp_path, "run.overwrite=true")) == run
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_an_unnamed_run_never_lands_in_an_existing_one(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-000000")
    first = rundir.prepare_run_dir(_cfg(tmp_path, "run.name="))
    (first / "config.yaml").write_text("x")
    second = rundir.prepare_run_dir(_cfg(tmp_path, "run.name="))
    assert (first.name, second.name) == ("20260101-000000", "20260101-000000-2")


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    run = _saved_run(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from longrl.rundir import lock_run_dir
        lock_run_dir({str(run)!r}); print("locked", flush=True); sys.stdin.read()""")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"'{run}' is in use by another longrl process \(pid {holder.pid}\)"):
            rundir.prepare_run_dir(_cfg(tmp_path))
        with pytest.raises(UserError, match="in use by another longrl process"):
            rundir.resume_config(str(run), _cfg(tmp_path))
        r = subprocess.run([sys.executable, "-m", "longrl", "train", f"resume={run}"], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 2 and r.stderr.startswith("longrl: error: ") and r.stderr.count("\n") == 1
        assert f"in use by another longrl process (pid {holder.pid})" in r.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert rundir.resume_config(str(run), _cfg(tmp_path))[1] == run  # the lock went with the process
    rundir.release_run_dir(run)


def test_what_a_killed_run_left_is_cleaned_at_the_next_start(tmp_path):
    run = _saved_run(tmp_path)
    ckpts = run / "checkpoints"
    (ckpts / ".step_4.tmpab12cd").mkdir()
    (ckpts / ".step_4.tmpab12cd" / "model.safetensors").write_bytes(b"half")
    (run / ".config.yaml.x1y2.tmp").write_text("half")
    (run / ".curves.png.tmp.png").write_bytes(b"half")
    shutil.copytree(ckpts / "step_2", ckpts / ".step_6.old")  # killed between the two renames of a replace
    (run / ".notes.old").write_text("the user's")
    rundir.resume_config(str(run), _cfg(tmp_path))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_6"]
    assert sorted(p.name for p in run.iterdir()) == [".lock", ".notes.old", "checkpoints", "config.yaml"]


# ----------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------


def test_resume_applies_the_safe_overrides_and_writes_them_down(tmp_path):
    run = _saved_run(tmp_path)
    asked = _cfg(tmp_path, "rl.steps=10", "rl.eval_every=5", "run.save_every=3", "run.progress=false")
    cfg, run_dir, ckpt = rundir.resume_config(str(run), asked)
    assert (run_dir, ckpt) == (run, run / "checkpoints" / "step_2")
    assert (cfg.rl.steps, cfg.rl.eval_every, cfg.run.save_every, cfg.run.progress) == (10, 5, 3, False)
    assert cfg.task.n_train == 200  # the run's own value, not the default
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert (written["rl"]["steps"], written["run"]["save_every"]) == (10, 3)  # a later resume continues from them


def test_resume_refuses_every_other_override_by_name(tmp_path):
    run = _saved_run(tmp_path)
    with pytest.raises(UserError, match=r"cannot change on resume: rl.lr \(1e-05 -> 0.5\), task.n_train "
                                        r"\(200 -> 5\) \(may change: rl.steps, "):
        rundir.resume_config(str(run), _cfg(tmp_path, "rl.lr=0.5", "task.n_train=5", "rl.steps=10"))
    with pytest.raises(UserError, match="rl.steps=2 does not go past the checkpoint's RL step 2"):
        rundir.resume_config(str(run), _cfg(tmp_path, "rl.steps=2"))
    assert "steps: 4" in (run / "config.yaml").read_text()  # nothing written on refusal


def test_resume_checks_config_yaml_against_the_checkpoints_copy(tmp_path, capsys):
    run = _saved_run(tmp_path)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("n_train: 200", "n_train: 50"))
    with pytest.raises(UserError, match=r"config.yaml was edited since checkpoint step_2: task.n_train \(200 -> 50\)"):
        rundir.resume_config(str(run), _cfg(tmp_path))
    (run / "config.yaml").write_text("")  # emptied
    cfg, _, _ = rundir.resume_config(str(run), _cfg(tmp_path))
    assert cfg.task.n_train == 200 and cfg.rl.steps == 4
    assert "config.yaml is empty; using the copy kept with checkpoint step_2" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == text  # put back


def test_resume_without_a_usable_checkpoint_is_one_line(tmp_path):
    run = _saved_run(tmp_path)
    (run / "checkpoints" / "step_2" / "model.safetensors").write_bytes(b"cut")
    with pytest.raises(UserError, match="has no complete checkpoint under checkpoints/"):
        rundir.resume_config(str(run), _cfg(tmp_path))
    with pytest.raises(UserError, match="is not a run directory"):
        rundir.resume_config(str(tmp_path / "nothing"), _cfg(tmp_path))


# ----------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------

TINY = [
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
    "task.n_train=60", "task.n_eval=6", "sft.steps=4", "sft.batch_size=8",
    "rl.steps=4", "rl.prompts_per_step=2", "rl.group_size=3", "rl.micro_batch_size=6", "rl.eval_every=2",
    "rollout.max_new_tokens=8", "eval.max_new_tokens=8", "run.save_every=2", "run.progress=false",
]


def _rl(path):
    return [{k: v for k, v in r.items() if not k.startswith("time/")}
            for r in map(json.loads, path.read_text().splitlines()) if r["phase"] == "rl"]


def test_a_reused_name_is_refused_and_a_damaged_run_resumes_from_its_last_good_checkpoint(tmp_path, capsys):
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=full", *TINY]) == 0
    capsys.readouterr()
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=full", *TINY]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("longrl: error:")]
    assert len(errors) == 1 and "already holds a run" in errors[0] and "Traceback" not in err
    full, damaged = tmp_path / "full", tmp_path / "damaged"
    shutil.copytree(full, damaged)
    weights = damaged / "checkpoints" / "step_4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # the newest checkpoint is cut short
    metrics = (damaged / "metrics.jsonl").read_text()
    (damaged / "metrics.jsonl").write_text(metrics[: len(metrics) - 40])  # and the last record
    (damaged / "summary.json").unlink()
    assert main(["train", f"resume={damaged}", "run.progress=false"]) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint step_4: model.safetensors holds 1000 bytes" in err and "using step_2" in err
    assert "dropping the cut-off last line" in err
    assert _rl(damaged / "metrics.jsonl") == _rl(full / "metrics.jsonl")


def test_data_videos_replaces_only_a_directory_it_made(tmp_path):
    from longrl.data import videos

    args = ["--n", "2", "--min-seconds", "1", "--max-seconds", "2", "--eval-frac", "0"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match=r"--out .*mine is a non-empty directory that `longrl data videos` did not "
                                        r"make; .* --overwrite"):
        videos.main(["--out", str(mine), *args])
    assert (mine / "thesis.tex").read_text() == "years of work"
    out = tmp_path / "vids"
    assert videos.main(["--out", str(out), *args]) == 0
    assert videos.main(["--out", str(out), *args, "--seed", "1"]) == 0  # its own output: replaced
    assert videos.main(["--out", str(mine), *args, "--overwrite"]) == 0  # asked for
    assert not (mine / "thesis.tex").exists() and (mine / "train.jsonl").is_file()
