"""Reading the records a multi-process worker wrote (shared by the test modules here)."""


def select(records, **want):
    """The records whose fields equal `want`; at least one."""
    chosen = [r for r in records if all(r.get(k) == v for k, v in want.items())]
    assert chosen, f"no records for {want}"
    return chosen


def assert_close(chosen, tol, where=("world",)):
    """Every error in each record's `errs` is within `tol`."""
    for r in chosen:
        bad = {k: v for k, v in r["errs"].items() if not v <= tol}
        place = " ".join(f"{k}={r.get(k)}" for k in where)
        assert not bad, f"{r['kind']} {place} rank={r['rank']}: {bad}"


def torchrun_train(nproc, *overrides, timeout=300):
    """`torchrun --nproc-per-node nproc -m longrl train ...` on a free port, one thread per
    process; fails the calling test (with the end of stderr) unless it exits 0."""
    import os
    import subprocess
    import sys

    from longrl.parallel.local_spawn import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "longrl", "train", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]


def metric_records(run, phase=None, drop=("time/",)):
    """A run directory's metrics.jsonl records (of `phase`, or all), without keys starting
    with `drop` (timings differ between two otherwise equal runs)."""
    import json

    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in recs if phase is None or r["phase"] == phase]


def crash_after_step_2(full, crashed, records: int = 1):
    """A copy of the finished run `full` at `crashed` as if it had died after its step-2
    checkpoint: the step-4 checkpoint, the last `records` metrics records (those of the steps
    after 2) and summary.json removed. Returns `crashed`."""
    import shutil

    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_4")
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:-records]) + "\n")
    (crashed / "summary.json").unlink()
    return crashed
