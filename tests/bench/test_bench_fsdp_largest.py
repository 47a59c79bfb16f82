"""`longrl bench fsdp --largest`: the depth search finds the boundary in few trials, and a
trial runs one real GRPO step in 2 processes (an update, measured peak RSS) or is stopped
by its watchdog once a process passes its share of the cap."""
import pytest

from longrl.bench import fsdp as bench


@pytest.mark.parametrize("start", [1, 11, 40, 64])
def test_search_finds_the_largest_fitting_depth(monkeypatch, start):
    tried = []

    def fake_trial(opt, kind, layers, cap):
        tried.append(layers)
        return {"layers": layers, "params": 10 * layers, "peak_rss_sum": layers, "fits": layers <= 13}

    monkeypatch.setattr(bench, "_trial", fake_trial)
    opt = bench._parse(["--largest", "--max-layers", "64"])
    got = bench._search(opt, "plain", 1, start)
    assert got["layers"] == 13 and got["params"] == 130
    assert 13 in tried and 14 in tried and len(tried) == len(set(tried)) <= 8  # never the same depth twice


def test_search_reports_nothing_when_one_layer_does_not_fit(monkeypatch):
    monkeypatch.setattr(bench, "_trial", lambda opt, kind, layers, cap: {"layers": layers, "params": 1, "fits": False})
    got = bench._search(bench._parse(["--largest"]), "fsdp", 1, 5)
    assert got["layers"] == 0 and got["params"] == 0 and got["trials"][-1]["layers"] == 1


def test_a_trial_is_one_grpo_step_and_a_process_over_its_share_is_stopped():
    opt = bench._parse(["--largest", "--hidden", "64", "--vocab", "512", "--new-tokens", "4"])
    bench._setup(opt)
    for kind in ("plain", "fsdp"):
        ok = bench._trial(opt, kind, 1, 6 * 2**30)
        assert ok["fits"] and ok["updated"] and ok["peak_rss_sum"] > 2 * ok["rss_before_model"] * 0.9, ok
    over = bench._trial(opt, "plain", 1, 2 * 2**20)  # 1 MiB per process: torch alone is more
    assert not over["fits"] and over["why"] == "over the cap"
