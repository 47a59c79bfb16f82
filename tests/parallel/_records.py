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
