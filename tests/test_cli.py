"""The command line: help texts, and one clear line + exit status 2 for bad input."""

import os
import subprocess
import sys

import pytest

from longrl.cli import main
from longrl.errors import UserError


def test_help_texts(capsys):
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["bench", "--help"], ["data", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "rl.group_size=8" in out and "resume=runs/mine" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "rl.grup_size=3"], "did you mean 'rl.group_size'"),
    (["train", "task.name=adition"], "unknown task 'adition'; did you mean 'addition'"),
    (["train", "model.path=/nonexistent/model"], "is not a directory"),
    (["train", "task.name=rg:chain_summ"], "unknown reasoning-gym task"),
    (["train", "task.name=jsonl"], "needs task.train_file"),
    (["train", "resume=/nonexistent/run"], "not a run directory"),
    (["eval", "task=addition"], "needs model=PATH"),
    (["eval", "--videomme", "/nonexistent/annot.json", "--videos", "/tmp"], "annotation file not found"),
    (["eval", "--videomme", "/nonexistent/annot.json"], "needs --videos DIR"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_malformed_jsonl_names_the_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "oops"\n')
    assert main(["train", "task.name=jsonl", f"task.train_file={data}", "run.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_unwritable_run_dir(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere: use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out_dir = blocker / "runs"
    else:
        out_dir = tmp_path / "ro"
        out_dir.mkdir(mode=0o500)
    assert main(["train", f"run.out_dir={out_dir}", "run.progress=false"]) == 2
    assert "run.out_dir" in capsys.readouterr().err


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "longrl", "train", "rl.bad_key=1"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown config key 'rl.bad_key'" in r.stderr


def test_overrides_on_both_sides_of_config_are_kept_in_order(tmp_path):
    from longrl.cli import parse_args

    args = parse_args(["train", "rl.steps=2", "--config", "c.yaml", "rl.steps=3", "sft.steps=0"])
    assert args.config == "c.yaml" and args.overrides == ["rl.steps=2", "rl.steps=3", "sft.steps=0"]
    f = tmp_path / "c.yaml"
    f.write_text("rl:\n  steps: 1\n")
    from longrl.config import load_config

    assert load_config(args.config and f, args.overrides).rl.steps == 3  # the later override wins
    args = parse_args(["eval", "model=m", "--out", "o.jsonl", "task=sort", "--max-frames", "4", "eval.batch_size=2"])
    assert args.overrides == ["model=m", "task=sort", "eval.batch_size=2"] and args.max_frames == 4
    with pytest.raises(SystemExit) as e:  # an unknown option is still argparse's error
        parse_args(["train", "rl.steps=2", "--bogus"])
    assert e.value.code == 2


def test_eval_out_is_checked_before_anything_runs(tmp_path, capsys):
    from longrl.cli import check_out_path

    check_out_path(tmp_path / "new" / "deeper" / "r.jsonl")  # missing parents: the writer makes them
    check_out_path(tmp_path / "d", directory=True)
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file; give a directory"):
        check_out_path(tmp_path / "f", directory=True)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(UserError, match="cannot write in"):
            check_out_path(ro / "r.jsonl")
