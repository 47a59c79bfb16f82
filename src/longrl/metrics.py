"""Metrics: one JSON object per line in `metrics.jsonl`; `curves.png` drawn from it with
the panels the run's recipe calls for; what a person watching the run sees (progress-bar
fields, or plain log lines when there is no terminal)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from longrl.errors import UserError
from longrl.tracking import Tracker, tracker_view
from longrl.utils import atomic_write_text


class MetricsLog:
    """Appends records to `path`; `truncate_after` rewinds it for a resumed run."""

    def __init__(self, path: Path, tracker: Tracker | None = None):
        self.path = Path(path)
        self.tracker = tracker  # also receives each record (`longrl.tracking`, run.report_to)
        self.records: list[dict] = []
        if self.path.exists():
            self.records = read_records(self.path)

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tracker is not None:
            self.tracker.log(*tracker_view(record))

    def truncate_after(self, rl_step: int) -> None:
        """Keep every SFT record and the RL records up to and including `rl_step`."""
        self.records = [r for r in self.records if r.get("phase") != "rl" or r["step"] <= rl_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))


# ----------------------------------------------------------------------------------------
# Response lengths: the distribution, not only its mean
# ----------------------------------------------------------------------------------------


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Mean, 10th/50th/90th percentile (linear interpolation, numpy's default) and max of
    one step's response lengths, as `rollout/response_len{,_p10,_p50,_p90,_max}`."""
    if len(lengths) == 0:
        return {}
    import numpy as np

    a = np.asarray(lengths, dtype=np.float64)
    p10, p50, p90 = np.percentile(a, [10, 50, 90])
    return {"rollout/response_len": float(a.mean()), "rollout/response_len_p10": float(p10),
            "rollout/response_len_p50": float(p50), "rollout/response_len_p90": float(p90),
            "rollout/response_len_max": float(a.max())}


# ----------------------------------------------------------------------------------------
# curves.png: the panels the run's metrics call for
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    title: str
    lines: tuple[tuple[str, str], ...]  # (metric, legend label): the first solid, the rest dashed
    phase: str = "rl"
    band: tuple[str, str] | None = None  # (low, high) metrics of a shaded range


# In drawing order. A panel is drawn when its run logged any of its metrics, so each
# recipe gets its own: DPO its loss, margin and implicit-reward accuracy instead of
# (empty) clip and KL panels; APRIL its off-policy fraction, staleness and parked samples.
PANELS = (
    Panel("reward", (("reward/mean", "mean"), ("reward/correctness", "correctness"))),
    Panel("held-out accuracy (greedy)", (("eval/accuracy", "accuracy"),)),
    Panel("response length (tokens; band p10-p90)",
          (("rollout/response_len", "mean"), ("rollout/response_len_p50", "median"), ("rollout/response_len_max", "max")),
          band=("rollout/response_len_p10", "rollout/response_len_p90")),
    Panel("truncated responses (fraction)", (("rollout/truncated_frac", "truncated"),)),
    Panel("KL to reference", (("kl/mean", "KL"),)),
    Panel("|engine - trainer| log-prob", (("logprob/engine_trainer_gap", "gap"),)),
    Panel("clip fraction", (("clip/frac_high", "high"), ("clip/frac_low", "low"))),
    Panel("DPO loss", (("loss/dpo", "loss"),)),
    Panel("DPO margin (implicit reward chosen - rejected)", (("dpo/margin", "margin"),)),
    Panel("DPO implicit-reward accuracy", (("dpo/accuracy", "accuracy"),)),
    Panel("APRIL off-policy token fraction", (("rollout/offpolicy_frac", "off-policy"),)),
    Panel("APRIL staleness (policy versions)", (("rollout/staleness_mean", "mean"), ("rollout/staleness_max", "max"))),
    Panel("APRIL parked samples", (("rollout/parked_samples", "samples"),)),
    Panel("SFT loss", (("loss/sft", "loss"),), phase="sft"),
)


def curve_panels(records: list[dict]) -> list[Panel]:
    """The panels of `PANELS` whose metrics appear in `records`, in order."""
    present = {"rl": set(), "sft": set()}
    for r in records:
        present.setdefault(r.get("phase", "rl"), set()).update(r)
    return [p for p in PANELS if any(key in present.get(p.phase, ()) for key, _ in p.lines)]


def read_records(path: Path) -> list[dict]:
    """The records of an existing metrics.jsonl. A last line cut short (the process was
    killed mid-write) is dropped from the file with a warning; a bad line before it is a
    UserError naming it, since that is not what a crash leaves."""
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i + 1:]):
                raise UserError(f"{path} line {i + 1} is not JSON; fix or delete that line") from None
            print(f"longrl: warning: dropping the cut-off last line of {path} (line {i + 1})", file=sys.stderr)
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def plot_curves(records: list[dict], out: Path) -> list[str]:
    """Draw `curve_panels(records)` to `out` (PNG, replaced atomically, so it can be redrawn
    at every eval while a run goes on); returns the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = curve_panels(records)
    ncols = max(1, min(3, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.3 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, panel, [r for r in records if r.get("phase", "rl") == panel.phase])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no metrics yet", ha="center", va="center")
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)
    return [p.title for p in panels]


def _draw_panel(ax, panel: Panel, recs: list[dict]) -> None:
    from matplotlib.ticker import MaxNLocator

    if panel.band:
        low, high = panel.band
        pts = [(r["step"], r[low], r[high]) for r in recs if low in r and high in r]
        if pts:
            xs, lo, hi = zip(*pts)
            ax.fill_between(xs, lo, hi, alpha=0.2, lw=0)
    drawn = 0
    for i, (key, label) in enumerate(panel.lines):
        pts = [(r["step"], r[key]) for r in recs if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, ls="-" if i == 0 else "--", lw=1.5 if i == 0 else 1,
                    marker="o" if len(pts) < 30 and i == 0 else None, ms=3, label=label)
            drawn += 1
    if drawn > 1:
        ax.legend(fontsize=7)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("SFT step" if panel.phase == "sft" else "RL step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(alpha=0.3)


# ----------------------------------------------------------------------------------------
# Watching a run: the bar's fields, or plain log lines without a terminal
# ----------------------------------------------------------------------------------------

# (short name, metric) in display order; "clip" is the sum of the two clip fractions.
FIELDS = (
    ("loss", "loss/sft"), ("reward", "reward/mean"), ("dpo_loss", "loss/dpo"), ("margin", "dpo/margin"),
    ("dpo_acc", "dpo/accuracy"), ("acc", "eval/accuracy"), ("kl", "kl/mean"), ("len", "rollout/response_len"),
    ("trunc", "rollout/truncated_frac"), ("clip", "clip/frac"), ("offpol", "rollout/offpolicy_frac"),
    ("stale", "rollout/staleness_mean"), ("parked", "rollout/parked_samples"),
)


def progress_fields(metrics: dict) -> dict[str, str]:
    """The metrics worth watching, short-named and formatted, in `FIELDS` order; only those
    present (APRIL and DPO counters appear when the run logs them)."""
    metrics = dict(metrics)
    if "clip/frac_high" in metrics or "clip/frac_low" in metrics:
        metrics["clip/frac"] = metrics.get("clip/frac_high", 0.0) + metrics.get("clip/frac_low", 0.0)
    return {name: _fmt(metrics[key]) for name, key in FIELDS if isinstance(metrics.get(key), (int, float))}


def _fmt(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def log_line(phase: str, step: int, metrics: dict, total: int | None = None) -> str:
    """One plain line for a log file: `rl step 20/60: reward 0.512, acc 0.64, ... 3.21 s/step`."""
    where = f"{phase} step {step}" + (f"/{total}" if total else "")
    parts = [f"{k} {v}" for k, v in progress_fields(metrics).items()]
    if isinstance(metrics.get("time/step"), (int, float)):
        parts.append(f"{metrics['time/step']:.2f} s/step")
    return f"{where}: " + ", ".join(parts) if parts else where


def plain_lines(progress: bool, stream=None) -> bool:
    """True when a run prints log lines instead of a bar: run.progress=false, or the bar's
    stream (stderr) is not a terminal (a file, a pipe, CI), where a bar is a mess of
    carriage returns."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not progress or not (isatty is not None and isatty())


def log_line_due(step: int, every: int, total: int | None = None) -> bool:
    """Every `every` steps (0: never), and the last step."""
    return every > 0 and (step % every == 0 or step == total)


class Progress:
    """A tqdm bar with `progress_fields` as its postfix on a terminal; otherwise one
    `log_line` every `every` steps on the same stream. Nothing at all when not `enabled`
    (ranks other than the main one)."""

    def __init__(self, total: int, phase: str, progress: bool, every: int, enabled: bool = True,
                 initial: int = 0, stream=None):
        from tqdm.auto import tqdm

        self.total, self.phase, self.every, self.enabled = total, phase, every, enabled
        self.stream = sys.stderr if stream is None else stream
        self.lines = enabled and plain_lines(progress, self.stream)
        self.bar = tqdm(total=total, desc=phase, initial=initial, disable=not enabled or self.lines,
                        dynamic_ncols=True, leave=True, file=self.stream)

    def update(self, step: int, metrics: dict) -> None:
        """After step `step` (counted from 1) with its metrics."""
        if self.lines:
            if log_line_due(step, self.every, self.total):
                print(log_line(self.phase, step, metrics, self.total), file=self.stream, flush=True)
            return
        self.bar.set_postfix(progress_fields(metrics), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
