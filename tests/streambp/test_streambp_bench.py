"""The benchmark's length search (doubling, then bisection) on a fake memory model."""

import argparse

import pytest

from longrl.bench import streambp as bench


def _opt(**kw):
    return argparse.Namespace(**{"start": 256, "step": 64, "limit": 16384, "json": True, **kw})


@pytest.mark.parametrize("true_max, expect", [
    (3000, (2816, 3008)),  # doubling 256..2048 fits, 4096 fails; bisection to within max(64, 1/8)
    (100, (64, 128)),  # the first length fails: bisection goes below it
    (20000, (16384, 16384)),  # never fails: stops at the limit
])
def test_max_length_brackets_the_true_maximum(monkeypatch, true_max, expect):
    tried = []

    def fake_fits(mode, objective, length, opt):
        tried.append(length)
        return {"fits": length <= true_max, "length": length, "peak_gib": length / 1e4}

    monkeypatch.setattr(bench, "fits", fake_fits)
    out = bench.max_length("streambp", "sft", _opt())
    lo, hi = expect
    assert lo <= out["max_len"] <= hi
    assert out["max_len"] <= true_max  # never reports a length that did not fit
    assert out["hit_limit"] == (true_max >= 16384)
    assert out["runs"] == len(tried) == len(set(tried))  # no length measured twice
    assert out["max_len"] % 64 == 0
