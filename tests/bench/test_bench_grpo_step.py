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
        assert s["process_peak_rss_mb"] >= s["peak_rss_mb"]  # the child's whole life, read from outside
        assert s["torch_threads"] == 1
        assert 1 <= s["response_len_mean"] <= 4
    assert result["same_initial_weights"] is True
    assert result["trl"]["same_prompts_per_step_as_longrl"] is True
    assert result["trl"]["same_prompt_ids_as_longrl"] is True
    assert result["trl"]["generations_per_step"] == 4
    assert result["step_time_ratio"] == pytest.approx(result["trl"]["step_seconds"] / result["longrl"]["step_seconds"])
    assert result["peak_rss_ratio"] == pytest.approx(result["trl"]["peak_rss_mb"] / result["longrl"]["peak_rss_mb"])
    assert result["process_peak_rss_ratio"] == pytest.approx(result["trl"]["process_peak_rss_mb"]
                                                             / result["longrl"]["process_peak_rss_mb"])
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


# ----------------------------------------------------------------------------------------
# The profile: FLOP count, matmul peak, phases (bench/profile.py)
# ----------------------------------------------------------------------------------------

TINY_SHAPE = {"D": 32, "L": 1, "H": 2, "K": 1, "hd": 16, "I": 64, "V": 100}


def test_training_flops_equal_a_hand_count():
    from longrl.bench.profile import layer_matmul_params, training_flops

    # q 32x32, k and v 32x16 each, o 32x32, gate/up/down 32x64 each
    assert layer_matmul_params(TINY_SHAPE) == 1024 + 512 + 512 + 1024 + 3 * 2048
    f = training_flops(TINY_SHAPE, row_lengths=[3, 5], head_positions=4)
    layers = 2 * 9216 * 8  # 2 FLOPs per weight per token, 8 real tokens, one layer
    attention = 4 * 2 * 16 * (6 + 15)  # QK^T + AV over the causal pairs: 3*4/2 + 5*6/2
    head = 2 * 32 * 100 * 4  # the head at the 4 response positions only
    assert f["forward"] == layers + attention + head == 147456 + 2688 + 25600
    assert f["training"] == 3 * f["forward"]
    assert (f["layers"], f["attention"], f["head"]) == (3 * layers, 3 * attention, 3 * head)
    assert (f["tokens"], f["head_positions"]) == (8, 4)


def test_decoder_shape_reads_a_qwen_config(tiny_qwen):
    from longrl.bench.profile import decoder_shape

    assert decoder_shape(tiny_qwen(vocab=100).config) == {"D": 32, "L": 2, "H": 4, "K": 2, "hd": 8, "I": 64, "V": 100}
    assert decoder_shape(object()) is None


def test_matmul_peak_is_the_best_size():
    from longrl.bench.profile import best_peak, matmul_peak

    p = matmul_peak(sizes=(64, 128), repeats=2)
    assert p["gflops"] > 0 and p["gflops"] == pytest.approx(max(p["gflops_by_n"].values()), abs=0.05)
    assert p["n"] in (64, 128) and p["threads"] >= 1
    assert best_peak({"gflops": 1.0}, {"gflops": 3.0}, {"gflops": 2.0}) == {"gflops": 3.0}


def test_longrl_side_reports_phases_flops_and_memory():
    """One in-process longrl side with a reward that always has signal: the update runs, so
    the training pass is timed and its FLOPs counted."""
    result = grpo_step.run(["--side", "longrl", "--reward", "parity", *SMALL])
    phases = result["phases"]
    for name in ("rollout/generate", "rollout/prefill", "rollout/decode", "train/pass",
                 "train/body_forward", "train/head_backward", "train/optimizer"):
        assert phases[name]["calls"] >= 1 and phases[name]["seconds"] >= 0, name
    assert "logprobs/old" not in phases and "logprobs/body_forward" not in phases  # on-policy: no old pass
    assert phases["rollout/decode"]["calls"] <= 3  # 4 new tokens: one prefill, at most 3 decode steps
    tp = result["training_pass"]
    assert tp["shape"] == {"D": 32, "L": 1, "H": 2, "K": 1, "hd": 16, "I": 64, "V": tp["shape"]["V"]}
    assert 0 < tp["real_tokens_per_step"] <= tp["padded_tokens_per_step"]
    assert tp["model_flops_per_step"] == tp["flops_split"]["layers"] + tp["flops_split"]["attention"] + tp["flops_split"]["head"]
    # every real token passes the one layer (2 x 9216 FLOPs forward, x3 with the backward)
    assert tp["flops_split"]["layers"] == 6 * 9216 * tp["real_tokens_per_step"]
    assert tp["gflops"] == pytest.approx(tp["model_flops_per_step"] / tp["seconds_per_step"] / 1e9)
    assert tp["fraction_of_peak"] == pytest.approx(tp["gflops"] / tp["matmul_peak"]["gflops"])
    assert result["peak_rss_mb"] >= result["rss_before_steps_mb"] > 0
