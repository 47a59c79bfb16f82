"""`longrl bench zero` runs and reports what it measures (a tiny model, 2 processes): each
rank's optimizer state is about half of plain AdamW's, with bit-identical weights."""

from longrl.bench import zero


def test_zero_bench_reports_the_state_split(capsys):
    report = zero.run(["--json", "--procs", "2", "--layers", "1", "--hidden", "64", "--steps", "1"])
    r = report["results"]["2"]
    assert r["identical_weights"]
    each, plain = r["state_bytes_per_rank"]["zero_each"], r["state_bytes_per_rank"]["plain"]
    assert 0.5 <= r["state_ratio"] < 0.75 and max(each) == r["state_bytes_per_rank"]["zero_busiest"]
    assert sum(each) == plain  # every parameter's moments live on exactly one rank
    assert r["state_ratio"] == r["state_bytes_per_rank"]["zero_busiest"] / plain
