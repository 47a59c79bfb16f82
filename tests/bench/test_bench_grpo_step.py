"""Smoke test of `longrl bench grpo-step`: both sides run one timed step on a very small model.

No timing is asserted (benchmarks are programs, not tests); the test checks that each side ran
in its own process, started from the same weights and saw the same prompts, and that the
ratios are computed from the reported numbers.
"""

import json

import pytest

from longrl.bench import grpo_step
from longrl.errors import UserError

SMALL = ["--prompts", "2", "--group-size", "2", "--max-new-tokens", "4", "--steps", "1", "--warmup", "1", "--rounds", "1",
         "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
         "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1"]


def test_both_sides_run_and_report(capsys):
    pytest.importorskip("trl")
    result = grpo_step.run(["--json", *SMALL])
    printed = json.loads(capsys.readouterr().out)  # `--json` prints the same report
    assert printed == json.loads(json.dumps(result))

    for side in ("longrl", "trl"):
        s = result[side]
        assert "error" not in s, s
        for key in ("step_seconds", "step_cpu_seconds", "rollout_seconds", "peak_rss_mb", "rss_before_steps_mb",
                    "rss_growth_during_steps_mb", "response_len_mean", "torch_threads", "initial_weights_checksum"):
            assert key in s, (side, key)
        (round_,) = s["step_seconds_all"]  # one round: warm-up + one timed step
        assert len(round_) == 2
        assert s["step_seconds"] == pytest.approx(round_[1], abs=1e-4)
        assert s["peak_rss_mb"] >= s["rss_before_steps_mb"] > 0
        assert s["torch_threads"] == 1
        assert 1 <= s["response_len_mean"] <= 4
    assert result["same_initial_weights"] is True
    assert result["trl"]["same_prompts_per_step_as_longrl"] is True
    assert result["trl"]["same_prompt_ids_as_longrl"] is True
    assert result["trl"]["generations_per_step"] == 4
    assert result["step_time_ratio"] == pytest.approx(result["trl"]["step_seconds"] / result["longrl"]["step_seconds"])
    assert result["peak_rss_ratio"] == pytest.approx(result["trl"]["peak_rss_mb"] / result["longrl"]["peak_rss_mb"])
    cfg = result["config"]
    assert (cfg["prompts"], cfg["group_size"], cfg["sequences_per_step"], cfg["max_new_tokens"]) == (2, 2, 4, 4)
    assert cfg["threads"] == 1 and "note" in result
    assert result["step_time_ratio_per_round"] == [pytest.approx(result["step_time_ratio"])]


def test_rounds_merge_to_median_time_and_max_memory():
    rounds = [{"step_seconds": t, "step_cpu_seconds": t / 2, "rollout_seconds": t / 4, "peak_rss_mb": m,
               "rss_before_steps_mb": 100.0, "rss_growth_during_steps_mb": m - 100, "response_len_mean": 10.0,
               "step_seconds_all": [t, t], "process_seconds": 5.0, "initial_weights_checksum": 1.5}
              for t, m in [(3.0, 200.0), (1.0, 250.0), (2.0, 150.0)]]
    merged = grpo_step._merge_rounds(rounds)
    assert (merged["step_seconds"], merged["step_cpu_seconds"], merged["rollout_seconds"]) == (2.0, 1.0, 0.5)
    assert (merged["peak_rss_mb"], merged["rss_growth_during_steps_mb"]) == (250.0, 150.0)
    assert merged["step_seconds_all"] == [[3.0, 3.0], [1.0, 1.0], [2.0, 2.0]]
    assert merged["process_seconds"] == 15.0 and merged["initial_weights_checksum"] == 1.5
    rounds[1]["initial_weights_checksum"] = 2.5
    assert grpo_step._merge_rounds(rounds)["initial_weights_checksum"] is None
    assert grpo_step._merge_rounds([rounds[0], {"error": "boom"}]) == {"error": "boom"}


def test_bad_override_fails_before_any_subprocess():
    with pytest.raises(UserError, match="rl.group_sise"):
        grpo_step.run(["rl.group_sise=4"])


def test_micro_batch_must_divide_the_step():
    with pytest.raises(UserError, match="--micro-batch"):
        grpo_step.run(["--prompts", "2", "--group-size", "3", "--micro-batch", "4"])


def test_warmup_must_be_at_least_one():
    with pytest.raises(SystemExit):
        grpo_step.run(["--warmup", "0"])
