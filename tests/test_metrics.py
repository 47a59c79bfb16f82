"""metrics.jsonl with a tracker, the recipe-dependent curves, and what a watcher sees."""

import io
import json

import matplotlib.image
import pytest

from longrl.metrics import (MetricsLog, Progress, curve_panels, length_stats, log_line, log_line_due, plain_lines,
                            plot_curves, progress_fields)

SFT = [{"phase": "sft", "step": s, "loss/sft": 2.0 / s, "grad/norm": 1.0} for s in (1, 2, 3)]
GRPO = [{"phase": "rl", "step": s, "reward/mean": 0.1 * s, "reward/correctness": 0.1 * s, "eval/accuracy": 0.5,
         "rollout/response_len": 20.0 + s, "rollout/truncated_frac": 0.25, "kl/mean": 0.01,
         "clip/frac_high": 0.02, "clip/frac_low": 0.01, "loss/policy": 0.1} for s in (1, 2, 3)]
DPO = [{"phase": "rl", "step": s, "loss/dpo": 0.6, "dpo/margin": 0.1 * s, "dpo/accuracy": 0.75,
        "dpo/pairs": 4.0, "eval/accuracy": 0.5} for s in (1, 2)]
APRIL = [{**r, "rollout/offpolicy_frac": 0.3, "rollout/staleness_mean": 0.5, "rollout/staleness_max": 1.0,
          "rollout/parked_samples": 3} for r in GRPO]


class Recorder:
    """A tracker that keeps what it was given."""

    def __init__(self):
        self.calls = []

    def log(self, step, metrics):
        self.calls.append((step, metrics))


def test_length_stats_hand_worked():
    # 1..10: mean 5.5; linear percentiles at (n-1)*q: p10 = 1 + 0.9 = 1.9, p50 = 5.5, p90 = 9.1.
    got = length_stats(list(range(1, 11)))
    assert got == pytest.approx({"rollout/response_len": 5.5, "rollout/response_len_p10": 1.9,
                                 "rollout/response_len_p50": 5.5, "rollout/response_len_p90": 9.1,
                                 "rollout/response_len_max": 10.0})
    assert length_stats([7]) == {"rollout/response_len": 7.0, "rollout/response_len_p10": 7.0,
                                 "rollout/response_len_p50": 7.0, "rollout/response_len_p90": 7.0,
                                 "rollout/response_len_max": 7.0}
    assert length_stats([]) == {}


def test_metrics_log_feeds_its_tracker_with_phase_names(tmp_path):
    rec = Recorder()
    log = MetricsLog(tmp_path / "metrics.jsonl", tracker=rec)
    log({"phase": "sft", "step": 4, "loss/sft": 1.5, "grad/norm": 0.5, "lr": 1e-3})
    log({"phase": "rl", "step": 2, "reward/mean": 0.25, "eval/accuracy": 0.5, "note": "text", "ok": True})
    assert rec.calls == [(4, {"sft/loss": 1.5, "sft/grad/norm": 0.5, "sft/lr": 1e-3}),
                         (2, {"reward/mean": 0.25, "eval/accuracy": 0.5})]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["phase"] for x in lines] == ["sft", "rl"]  # the file itself is unchanged


def test_panels_fit_the_recipe():
    grpo = curve_panels(SFT + GRPO)
    assert [p.title for p in grpo] == ["reward", "held-out accuracy (greedy)", "response length (tokens; band p10-p90)",
                                       "truncated responses (fraction)", "KL to reference", "clip fraction", "SFT loss"]
    dpo = [p.title for p in curve_panels(SFT + DPO)]
    assert dpo == ["held-out accuracy (greedy)", "DPO loss", "DPO margin (implicit reward chosen - rejected)",
                   "DPO implicit-reward accuracy", "SFT loss"]  # no empty clip / KL panels
    april = [p.title for p in curve_panels(APRIL)]
    assert april[-3:] == ["APRIL off-policy token fraction", "APRIL staleness (policy versions)", "APRIL parked samples"]
    assert not any(t.startswith(("APRIL", "DPO")) for t in (p.title for p in grpo))
    # An SFT-phase key does not bring in the RL panel of the same name.
    assert [p.title for p in curve_panels([{"phase": "sft", "step": 1, "eval/accuracy": 0.1}])] == []


def test_plot_curves_writes_a_png_atomically_with_a_grid_per_panel(tmp_path):
    out = tmp_path / "curves.png"
    titles = plot_curves(SFT + APRIL, out)
    assert len(titles) == 10
    img = matplotlib.image.imread(out)
    h, w = img.shape[:2]
    assert (round(w / 90 / 4.4), round(h / 90 / 3.3)) == (3, 4)  # 10 panels: 3 columns x 4 rows at dpi 90
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]  # no temp file left
    # Redrawn in place (every eval): a later call replaces it.
    assert plot_curves(SFT, out) == ["SFT loss"]
    h1, w1 = matplotlib.image.imread(out).shape[:2]
    assert (round(w1 / 90 / 4.4), round(h1 / 90 / 3.3)) == (1, 1)
    assert plot_curves([], out) == []  # nothing logged yet still draws
    assert out.stat().st_size > 0


def test_progress_fields_grpo_april_dpo():
    assert progress_fields(APRIL[0]) == {"reward": "0.1", "acc": "0.5", "kl": "0.01", "len": "21", "trunc": "0.25",
                                         "clip": "0.03", "offpol": "0.3", "stale": "0.5", "parked": "3"}
    assert progress_fields(DPO[1]) == {"dpo_loss": "0.6", "margin": "0.2", "dpo_acc": "0.75", "acc": "0.5"}
    assert progress_fields(SFT[2]) == {"loss": "0.667"}
    assert progress_fields({"rollout/response_len": 1234.56, "kl/mean": 1.23456e-5}) == {"kl": "1.23e-05",
                                                                                        "len": "1235"}


def test_log_line():
    line = log_line("grpo", 20, {**GRPO[0], "time/step": 3.214}, total=60)
    assert line == ("grpo step 20/60: reward 0.1, acc 0.5, kl 0.01, len 21, trunc 0.25, clip 0.03, "
                    "3.21 s/step")
    assert log_line("sft", 5, {}) == "sft step 5"


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_plain_lines_decision_and_cadence():
    assert plain_lines(True, _Stream(tty=True)) is False
    assert plain_lines(True, _Stream(tty=False)) is True  # redirected to a file, a pipe, CI
    assert plain_lines(False, _Stream(tty=True)) is True  # run.progress=false
    assert [s for s in range(1, 13) if log_line_due(s, 5, total=12)] == [5, 10, 12]
    assert not any(log_line_due(s, 0, total=12) for s in range(1, 13))


def test_progress_prints_lines_without_a_terminal():
    out = _Stream(tty=False)
    bar = Progress(12, "grpo", progress=True, every=5, stream=out)
    for s in range(1, 13):
        bar.update(s, {"reward/mean": s / 10})
    bar.close()
    assert out.getvalue().splitlines() == ["grpo step 5/12: reward 0.5", "grpo step 10/12: reward 1",
                                           "grpo step 12/12: reward 1.2"]  # no carriage-return bar


def test_progress_bar_on_a_terminal_shows_the_fields():
    out = _Stream(tty=True)
    bar = Progress(3, "dpo", progress=True, every=1, stream=out)
    for s in range(1, 4):
        bar.update(s, DPO[0])
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "3/3" in text and "dpo_loss=0.6" in text and "dpo_acc=0.75" in text
    assert "dpo step" not in text  # the bar, not log lines


def test_progress_off_rank_is_silent():
    out = _Stream(tty=False)
    bar = Progress(3, "grpo", progress=True, every=1, enabled=False, stream=out)
    bar.update(1, {"reward/mean": 0.5})
    bar.close()
    assert out.getvalue() == ""
