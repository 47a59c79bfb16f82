"""Metrics: one JSON object per line in `metrics.jsonl`, and `curves.png` drawn from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from longrl.utils import atomic_write_text


class MetricsLog:
    """Appends records to `path`; `truncate_after` rewinds it for a resumed run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            self.records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, rl_step: int) -> None:
        """Keep every SFT record and the RL records up to and including `rl_step`."""
        self.records = [r for r in self.records if r.get("phase") != "rl" or r["step"] <= rl_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))


def plot_curves(records: list[dict], out: Path) -> None:
    """reward, held-out accuracy, response length and KL / log-prob gap over RL steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl = [r for r in records if r.get("phase") == "rl"]
    sft = [r for r in records if r.get("phase") == "sft"]
    panels = [
        ("reward/mean", "reward (mean; dashed: correctness)", rl),
        ("eval/accuracy", "held-out accuracy (greedy)", rl),
        ("rollout/response_len", "response length (tokens)", rl),
        ("kl/mean" if any("kl/mean" in r for r in rl) else "logprob/engine_trainer_gap",
         "KL to reference" if any("kl/mean" in r for r in rl) else "|engine - trainer| log-prob", rl),
        ("loss/sft", "SFT loss", sft),
        ("clip/frac_high", "clip fraction (high)", rl),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title, recs) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in recs if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3)
        if key == "reward/mean":
            extra = [(r["step"], r["reward/correctness"]) for r in recs if "reward/correctness" in r]
            if extra:
                ax.plot(*zip(*extra), ls="--", lw=1)
        ax.set_title(title)
        ax.set_xlabel("SFT step" if recs is sft else "RL step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)
