"""Load (issue 13): several `longrl train` processes at once on one machine. Three tiny runs
with different names, one run killed (SIGKILL) twice and resumed each time, and one run
writing into a small filling disk, all started together: every one finishes or fails
cleanly (exit 0, or exit 2 with one line and no traceback), no run's files touch another's,
and the killed run's metrics equal an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

TINY = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
        "task.n_train=100", "task.n_eval=6", "sft.steps=6", "sft.batch_size=8", "rl.steps=6",
        "rl.prompts_per_step=2", "rl.group_size=3", "rl.kl_coef=0.05", "rl.eval_every=3",
        "rollout.max_new_tokens=10", "eval.max_new_tokens=10", "run.save_every=1", "run.progress=false"]


def _start(out, name, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "longrl", "train", *TINY, f"run.out_dir={out}", f"run.name={name}",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _rl(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in recs if r["phase"] == "rl"]


def _kill_after(proc, ckpt, timeout=240):
    """SIGKILL `proc` as soon as checkpoint directory `ckpt` exists (or it ends by itself)."""
    t0 = time.time()
    while not ckpt.is_dir() and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _clean(proc):
    out, err = proc.communicate(timeout=600)
    lines = err.strip().splitlines()
    return proc.returncode, lines, out


def test_concurrent_runs_a_killed_run_and_a_full_disk(tmp_path):
    runs = tmp_path / "runs"
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(small)],
                             capture_output=True).returncode == 0
    try:
        procs = {name: _start(runs, name) for name in ("a", "b", "c")}
        killed = _start(runs, "k")
        full = _start(small, "f") if mounted else None
        _kill_after(killed, runs / "k" / "checkpoints" / "step_2")
        resumed = subprocess.Popen([sys.executable, "-m", "longrl", "train", f"resume={runs / 'k'}",
                                    "run.progress=false"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _kill_after(resumed, runs / "k" / "checkpoints" / "step_4")
        last = subprocess.run([sys.executable, "-m", "longrl", "train", f"resume={runs / 'k'}", "run.progress=false"],
                              capture_output=True, text=True, timeout=600)
        assert last.returncode == 0, last.stderr[-2000:]
        for name, p in procs.items():
            code, err, _ = _clean(p)
            assert code == 0, (name, err[-5:])
        if full is not None:  # 300 KiB fill up at the first RL checkpoint: one clean message
            code, err, _ = _clean(full)
            assert code == 2 and not any("Traceback" in line for line in err), err[-5:]
            assert "disk is full" in err[-1] and "step_0 is intact" in err[-1]
            assert (small / "f" / "checkpoints" / "step_0" / "model.safetensors").is_file()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(small)], capture_output=True)
    # Every run wrote only its own directory, and a, b, c are the same run (same config, same seed).
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "c", "k"]
    assert _rl(runs / "a") == _rl(runs / "b") == _rl(runs / "c")
    assert _rl(runs / "k") == _rl(runs / "a")  # killed twice and resumed: the uninterrupted run's metrics
    for name in "abck":
        cfg = (runs / name / "config.yaml").read_text()
        assert f"name: {name}\n" in cfg
