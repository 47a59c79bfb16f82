"""Experiment trackers, read back through each library's own reader: TensorBoard's
EventAccumulator, the W&B offline run file (its protobuf records) and media files, MLflow's
client on the file store. A tracker whose library is not installed skips its test."""

import glob
import json
import struct
import time

import pytest

from longrl import tracking
from longrl.config import Config, config_to_dict
from longrl.errors import UserError
from longrl.metrics import MetricsLog
from longrl.tracking import (check_report_to, eval_samples, flatten_config, make_tracker, parse_report_to,
                             sample_table, tracker_name)

RECORDS = [
    {"phase": "sft", "step": 1, "loss/sft": 2.0, "grad/norm": 1.0},
    {"phase": "sft", "step": 2, "loss/sft": 1.5, "grad/norm": 0.5},
    {"phase": "rl", "step": 0, "eval/accuracy": 0.25},
    {"phase": "rl", "step": 1, "reward/mean": 0.5, "kl/mean": 0.01},
    {"phase": "rl", "step": 2, "reward/mean": 0.75, "kl/mean": 0.02, "eval/accuracy": 0.5},
]
SAMPLES = [{"prompt": "1+1=", "response": "2 | two\nok", "reward": 1.0, "answer": "2"},
           {"prompt": "2+2=", "response": "5", "reward": 0.0, "answer": "4"}]


@pytest.fixture
def cfg_dict():
    cfg = Config()
    cfg.rl.lr = 3e-6
    cfg.run.report_to = ["tensorboard", "mlflow"]
    return config_to_dict(cfg)


def _run(names, run_dir, cfg_dict):
    """Log RECORDS through MetricsLog and SAMPLES at RL step 2, as a run would."""
    tracker = make_tracker(names, run_dir, cfg_dict)
    log = MetricsLog(run_dir / "metrics.jsonl", tracker=tracker)
    for r in RECORDS:
        log(r)
    tracker.log_samples(2, SAMPLES)
    tracker.close()


# ----------------------------------------------------------------------------------------
# Choosing trackers
# ----------------------------------------------------------------------------------------


def test_report_to_list_or_comma_string():
    assert parse_report_to("tensorboard, WandB,tensorboard") == ["tensorboard", "wandb"]
    assert parse_report_to(["mlflow", "wandb"]) == ["mlflow", "wandb"]
    assert parse_report_to("") == parse_report_to([]) == parse_report_to("none") == parse_report_to(None) == []
    with pytest.raises(UserError, match=r"'tensorbord' is not one of .*\(did you mean 'tensorboard'\?\)"):
        parse_report_to("tensorbord")
    with pytest.raises(UserError, match="comma-separated"):
        parse_report_to(3)


def test_missing_library_names_the_extra(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(UserError, match=r'run.report_to=wandb needs the wandb library: pip install -e "\.\[wandb\]"'):
        check_report_to("wandb")
    with pytest.raises(UserError, match=r"\[wandb\]"):
        make_tracker(["wandb"], "unused", {})


def test_names_config_and_samples_layout():
    assert [tracker_name(p, k) for p, k in [("sft", "loss/sft"), ("sft", "grad/norm"), ("sft", "lr"),
                                            ("rl", "loss/policy"), ("rl", "grad/norm")]] == [
        "sft/loss", "sft/grad/norm", "sft/lr", "loss/policy", "grad/norm"]
    assert flatten_config({"rl": {"lr": 1e-5, "x": None}, "run": {"report_to": ["a", "b"]}, "resume": ""}) == {
        "rl.lr": 1e-5, "rl.x": "null", "run.report_to": '["a", "b"]', "resume": ""}
    columns, data = sample_table([{"response": "r", "prompt": "p", "extra": 1}, {"prompt": "q", "reward": 0.5}])
    assert columns == ["prompt", "response", "reward", "extra"]
    assert data == [["p", "r", None, 1], ["q", None, 0.5, None]]
    items = [{"id": i, "prompt": f"p{i}", "answer": "a", "response": "r", "correct": 1.0} for i in range(10)]
    rows = eval_samples(items, n=3)
    assert rows[0] == {"prompt": "p0", "response": "r", "reward": 1.0, "answer": "a"} and len(rows) == 3


def test_only_the_main_rank_reports(tmp_path, monkeypatch, cfg_dict):
    pytest.importorskip("tensorboard")
    from longrl.parallel import dist

    monkeypatch.setattr(dist, "is_main", lambda: False)
    tracker = make_tracker(["tensorboard"], tmp_path, cfg_dict)
    tracker.log(1, {"a": 1.0})
    tracker.log_samples(1, SAMPLES)
    tracker.close()
    assert list(tmp_path.iterdir()) == []
    assert isinstance(make_tracker([], tmp_path, cfg_dict), tracking.NullTracker)


# ----------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------


def test_tensorboard_events_read_back(tmp_path, cfg_dict):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _run("tensorboard", tmp_path, cfg_dict)
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    scalars = lambda tag: [(e.step, pytest.approx(e.value)) for e in ea.Scalars(tag)]  # noqa: E731
    assert scalars("reward/mean") == [(1, 0.5), (2, 0.75)]
    assert scalars("eval/accuracy") == [(0, 0.25), (2, 0.5)]
    assert scalars("sft/loss") == [(1, 2.0), (2, 1.5)]
    assert scalars("sft/grad/norm") == [(1, 1.0), (2, 0.5)]
    assert "loss/sft" not in ea.Tags()["scalars"]
    # Samples as a markdown table at their step; '|' and newlines escaped inside cells.
    (text,) = ea.Tensors("samples/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert text.step == 2
    assert table.splitlines()[0] == "| prompt | response | reward | answer |"
    assert "| 1+1= | 2 \\| two<br>ok | 1.0 | 2 |" in table.splitlines()
    # The config as hparams: the session-start info lists every flattened key and value.
    content = ea.PluginTagToContent("hparams")
    info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert info.hparams["rl.lr"].number_value == pytest.approx(3e-6)
    assert info.hparams["run.report_to"].string_value == '["tensorboard", "mlflow"]'
    assert info.hparams["model.dtype"].string_value == "float32"


# ----------------------------------------------------------------------------------------
# Weights & Biases (offline)
# ----------------------------------------------------------------------------------------


def _wandb_records(path):
    """The protobuf Records of a .wandb file: a 7-byte header (':W&B', magic, version),
    then LevelDB-log framing in 32 KiB blocks (7-byte chunk headers: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_run_files_read_back(tmp_path, monkeypatch, cfg_dict):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    _run(["wandb"], tmp_path, cfg_dict)
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    # wandb-core writes the file behind `finish()`: wait for the run's exit record.
    deadline = time.time() + 60
    records = _wandb_records(run_file)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.time() < deadline, "the W&B run file never got its exit record"
        time.sleep(0.1)
        records = _wandb_records(run_file)
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row = {"/".join(it.nested_key) or it.key: json.loads(it.value_json) for it in rec.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_") and not k.startswith("samples")})
    assert rows[:5] == [{"sft/loss": 2.0, "sft/grad/norm": 1.0, "step": 1}, {"sft/loss": 1.5, "sft/grad/norm": 0.5, "step": 2},
                        {"eval/accuracy": 0.25, "step": 0}, {"reward/mean": 0.5, "kl/mean": 0.01, "step": 1},
                        {"reward/mean": 0.75, "kl/mean": 0.02, "eval/accuracy": 0.5, "step": 2}]
    # Every metric is plotted against its phase's step (W&B's own _step only increases).
    defined = {rec.metric.name: rec.metric.step_metric for rec in records if rec.WhichOneof("record_type") == "metric"}
    assert defined["reward/mean"] == defined["sft/loss"] == "step"
    config = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "config":
            config.update({it.key: json.loads(it.value_json) for it in rec.config.update})
    assert config["rl"]["lr"] == pytest.approx(3e-6) and config["run"]["report_to"] == ["tensorboard", "mlflow"]
    (table_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "samples_*.table.json"))
    table = json.loads(open(table_file).read())
    assert table["columns"] == ["prompt", "response", "reward", "answer"]
    assert table["data"] == [[r["prompt"], r["response"], r["reward"], r["answer"]] for r in SAMPLES]


# ----------------------------------------------------------------------------------------
# MLflow (file store under the run directory)
# ----------------------------------------------------------------------------------------


def test_mlflow_file_store_read_back(tmp_path, monkeypatch, cfg_dict):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # the tracker sets it; monkeypatch restores it
    _run(["mlflow"], tmp_path, cfg_dict)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("longrl").experiment_id])
    assert run.info.run_name == tmp_path.name and run.info.status == "FINISHED"
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert history("reward/mean") == [(1, 0.5), (2, 0.75)]
    assert history("sft/loss") == [(1, 2.0), (2, 1.5)]
    assert sorted(history("eval/accuracy")) == [(0, 0.25), (2, 0.5)]
    params = run.data.params
    assert float(params["rl.lr"]) == pytest.approx(3e-6) and params["run.report_to"] == '["tensorboard", "mlflow"]'
    assert len(params) == len(flatten_config(cfg_dict))
    local = client.download_artifacts(run.info.run_id, "samples/step_000002.json", str(tmp_path / "dl"))
    table = json.loads(open(local).read())
    assert table["columns"] == ["prompt", "response", "reward", "answer"] and table["data"][1] == ["2+2=", "5", 0.0, "4"]


def test_several_at_once(tmp_path, monkeypatch, cfg_dict):
    for lib in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(lib)
    for var in ("WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    _run("tensorboard,wandb,mlflow", tmp_path, cfg_dict)
    assert {"tensorboard", "wandb", "mlruns", "metrics.jsonl"} <= {p.name for p in tmp_path.iterdir()}
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
