"""Experiment trackers: every metric of `metrics.jsonl`, the resolved config and sample
responses also go to TensorBoard, Weights & Biases and/or MLflow (`run.report_to`).

Each tracker is the library's own writer, and the default never needs a network:

- tensorboard: `torch.utils.tensorboard.SummaryWriter`, event files in `<run>/tensorboard/`.
- wandb: `wandb.init(mode="offline", dir=<run>)`, run files in `<run>/wandb/`; set
  WANDB_MODE=online (and log in) to stream to a server instead, or `wandb sync` later.
- mlflow: `MlflowClient` on a file store in `<run>/mlruns/` (`mlflow ui --backend-store-uri
  <run>/mlruns`); MLFLOW_TRACKING_URI, when set, wins. MLflow 3 refuses its file store
  unless MLFLOW_ALLOW_FILE_STORE=true; the default sets it for this process, because the
  database store needs SQLAlchemy, which the light `mlflow-skinny` extra does not bring.

Steps: RL records keep their metric names and RL step; SFT records go under `sft/` with the
SFT step (`loss/sft` -> `sft/loss`, `grad/norm` -> `sft/grad/norm`), so the two phases never
write one name at two meanings. W&B wants one increasing step per run, so there each row
carries its phase's step as the `step` key, the x-axis of every metric (`define_metric`).

Only the main rank reports (`make_tracker` returns a no-op tracker on the others), and a
name asked for whose library is missing fails before the run starts (`check_report_to`),
naming the pip extra.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Protocol

from longrl.errors import UserError

# name -> the module that must import, for the message when it does not.
BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
SAMPLE_COLUMNS = ("prompt", "response", "reward")  # first, in this order; other keys follow


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_config(self, config: dict) -> None: ...
    def log_samples(self, step: int, rows: list[dict]) -> None: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------
# Choosing trackers
# ----------------------------------------------------------------------------------------


def parse_report_to(value) -> list[str]:
    """`run.report_to` as a list of tracker names: a list, or one comma-separated string;
    '' / 'none' / [] mean no tracker. Unknown names raise UserError."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        raise UserError(f"run.report_to={value!r} must be a list or a comma-separated string of {list(BACKENDS)}")
    names = []
    for item in (s.strip().lower() for s in items):
        if item in ("", "none"):
            continue
        if item not in BACKENDS:
            near = difflib.get_close_matches(item, list(BACKENDS), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise UserError(f"run.report_to: '{item}' is not one of {list(BACKENDS)}{hint}")
        if item not in names:
            names.append(item)
    return names


def check_report_to(value) -> list[str]:
    """The names in `run.report_to`, each with its library importable; raise UserError
    naming the pip extra otherwise. Cheap (no import), so config validation can call it."""
    names = parse_report_to(value)
    for name in names:
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise UserError(f"run.report_to={name} needs the {BACKENDS[name]} library: "
                            f"pip install -e \".[{name}]\" (or drop '{name}' from run.report_to)")
    return names


def make_tracker(report_to, run_dir: Path, config: dict | None = None) -> Tracker:
    """One tracker over every name in `report_to`, writing under `run_dir`, with `config`
    (the resolved config as a dict) logged as hyper-parameters. A no-op tracker when the
    list is empty or this is not the main rank under torchrun."""
    names = check_report_to(report_to)
    from longrl.parallel import dist

    if not names or not dist.is_main():
        return NullTracker()
    run_dir = Path(run_dir)
    makers = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
    tracker = FanOut([makers[name](run_dir) for name in names])
    if config is not None:
        tracker.log_config(config)
    return tracker


class NullTracker:
    def log(self, step, metrics) -> None:
        pass

    def log_config(self, config) -> None:
        pass

    def log_samples(self, step, rows) -> None:
        pass

    def close(self) -> None:
        pass


class FanOut:
    """Several trackers as one; `close` closes each even if one fails."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, step, metrics) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def log_config(self, config) -> None:
        for t in self.trackers:
            t.log_config(config)

    def log_samples(self, step, rows) -> None:
        for t in self.trackers:
            t.log_samples(step, rows)

    def close(self) -> None:
        errors = []
        for t in self.trackers:
            try:
                t.close()
            except Exception as e:  # noqa: BLE001 - the others still get closed; re-raised below
                errors.append(e)
        if errors:
            raise errors[0]


# ----------------------------------------------------------------------------------------
# What a tracker receives
# ----------------------------------------------------------------------------------------


def tracker_view(record: dict) -> tuple[int, dict[str, float]]:
    """A metrics.jsonl record -> (step, {name: number}) for the trackers: numbers only (no
    'phase', 'step', strings or lists); SFT names under `sft/` (see the module docstring)."""
    phase = record.get("phase", "rl")
    metrics = {}
    for key, value in record.items():
        if key in ("phase", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metrics[tracker_name(phase, key)] = float(value)
    return int(record.get("step", 0)), metrics


def tracker_name(phase: str, key: str) -> str:
    if phase == "rl":
        return key
    rest = [part for part in key.split("/") if part != phase]  # "loss/sft" -> ["loss"]
    return "/".join([phase, *rest])


def flatten_config(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested config dict -> {"rl.lr": 1e-5, ...}; lists and None as text (hyper-parameter
    values must be scalars in TensorBoard and MLflow)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def eval_samples(items: list[dict], n: int = 8) -> list[dict]:
    """The first `n` of an evaluation's per-item records (`evaluate(..., return_items=True)`
    ["items"]) as sample rows: prompt, response, reward (the item's correctness), answer."""
    return [{"prompt": it.get("prompt"), "response": it.get("response"), "reward": it.get("correct"),
             "answer": it.get("answer")} for it in items[:n]]


def sample_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Rows of {prompt, response, reward, ...} -> (columns, data): prompt, response and
    reward first, then any other keys in first-seen order; a missing cell is None."""
    columns = [c for c in SAMPLE_COLUMNS if any(c in r for r in rows)]
    for r in rows:
        columns += [k for k in r if k not in columns]
    return columns, [[r.get(c) for c in columns] for r in rows]


# ----------------------------------------------------------------------------------------
# The three libraries
# ----------------------------------------------------------------------------------------


class TensorBoardTracker:
    """Scalars per metric, the config as hparams (and as text), samples as a text table."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, step, metrics) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crashed run keeps what it logged

    def log_config(self, config) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = flatten_config(config)
        # Into this run's own event file: SummaryWriter.add_hparams would open a sub-run.
        for summary in hparams(flat, {}):
            self.writer.file_writer.add_summary(summary)
        lines = "\n".join(f"    {k}: {v}" for k, v in flat.items())  # indented: a markdown code block
        self.writer.add_text("config", lines, 0)
        self.writer.flush()

    def log_samples(self, step, rows) -> None:
        columns, data = sample_table(rows)
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731 - markdown table cell
        table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        table += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
        self.writer.add_text("samples", "\n".join(table), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """An offline W&B run in `<run>/wandb/` (WANDB_MODE overrides); the config as the run
    config, samples as a `wandb.Table` under `samples`."""

    def __init__(self, run_dir: Path):
        import wandb

        run_dir = Path(run_dir)
        self.wandb = wandb
        # console="off": our stdout stays ours; no system-metrics sampler on a small CPU.
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "longrl"), name=run_dir.name,
                              dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=settings)
        self.run.define_metric("step")
        self._keys: set[str] = set()

    def log(self, step, metrics) -> None:
        for key in metrics.keys() - self._keys:  # every metric plotted against its phase's step
            self.run.define_metric(key, step_metric="step")
            self._keys.add(key)
        self.run.log({**metrics, "step": step})

    def log_config(self, config) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_samples(self, step, rows) -> None:
        columns, data = sample_table(rows)
        if "samples" not in self._keys:
            self.run.define_metric("samples", step_metric="step")
            self._keys.add("samples")
        self.run.log({"samples": self.wandb.Table(columns=columns, data=data), "step": step})

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run through `MlflowClient` (no global active run to leak between runs):
    metrics with their step, the flattened config as params, samples as JSON tables
    (`samples/step_<N>.json`, MLflow's table layout)."""

    def __init__(self, run_dir: Path):
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            if not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):  # see the module docstring
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "longrl")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id

    def log(self, step, metrics) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_config(self, config) -> None:
        from mlflow.entities import Param

        # Params are write-once in MLflow: a second call with other values would fail.
        params = [Param(k, str(v)[:6000]) for k, v in flatten_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_samples(self, step, rows) -> None:
        columns, data = sample_table(rows)
        self.client.log_dict(self.run_id, {"columns": columns, "data": data}, f"samples/step_{step:06d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
