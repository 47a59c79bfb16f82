"""Issue 13, bad input: values the config accepts but no run survives, and files and models
that used to crash instead of answering. One table; every case must exit with status 2,
print one line on stderr, show no traceback and leave the working directory as it was.

Most cases call `longrl.cli.main` in this process (a config error is refused before any
recipe is imported, so they are cheap); the few where the process itself is the point run
`python -m longrl` in a subprocess: a Rust abort or a slow import only shows there.
`pytest -m reliability -q` reports how many cases were tried and how many were handled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import longrl.config
from longrl.cli import main

pytestmark = pytest.mark.reliability


# ----------------------------------------------------------------------------------------
# Inputs: each builder writes what its case needs under `d` and returns the argv.
# ----------------------------------------------------------------------------------------


def _random_weights(d: Path, model_type: str = "qwen2") -> Path:
    model = d / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": model_type}))
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    return model


def _truncated_weights(d: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    model = d / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    save_file({"w": torch.zeros(256)}, str(model / "model.safetensors"))
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return model


def _bert(d: Path) -> Path:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(d / "bert")
    return d / "bert"


def _annotations(d: Path) -> Path:
    (d / "videos").mkdir()
    ann = d / "ann.json"
    ann.write_text(json.dumps([{"video_id": "v", "question": "Q?", "answer": "A", "options": ["A. x", "B. y"]}]))
    return ann


def _big_jsonl(d: Path) -> Path:
    path = d / "big.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
        f.write(json.dumps({"prompt": "x" * (5 << 20), "answer": "y"}) + "\n")  # 5 MiB: over the 4 MiB cap
    return path


def _latin1_yaml(d: Path) -> Path:
    (d / "c.yaml").write_bytes("rl:\n  steps: 1  # caf\xe9\n".encode("latin-1"))
    return d / "c.yaml"


def _yaml(d: Path) -> Path:
    (d / "ok.yaml").write_text("rl:\n  steps: 1\n")
    return d / "ok.yaml"


def _file(d: Path) -> Path:
    (d / "plain").write_text("x")
    return d / "plain"


def _parquet_junk(d: Path) -> Path:
    (d / "videos").mkdir()
    (d / "ann.parquet").write_bytes(b"PAR1" + os.urandom(64))
    return d / "ann.parquet"


T = ["train"]
CASES = [
    # --- values the config accepts but the run cannot survive
    ("save_every=0", lambda d: T + ["run.save_every=0"], "run.save_every=0 must be at least 1"),
    ("rl.steps<0", lambda d: T + ["rl.steps=-3"], "rl.steps=-3 must be at least 0"),
    ("sft.steps<0", lambda d: T + ["sft.steps=-1"], "sft.steps=-1 must be at least 0"),
    ("rl.lr<0", lambda d: T + ["rl.lr=-0.1"], "rl.lr=-0.1 must be positive"),
    ("sft.lr=0", lambda d: T + ["sft.lr=0"], "sft.lr=0.0 must be positive"),
    ("rl.lr=nan", lambda d: T + ["rl.lr=nan"], "rl.lr=nan is not a finite number"),
    ("rl.lr=inf", lambda d: T + ["rl.lr=inf"], "rl.lr=inf is not a finite number"),
    ("reward weight nan", lambda d: T + ["reward.format_weight=.nan"], "reward.format_weight=nan is not a finite"),
    ("kl_coef<0", lambda d: T + ["rl.kl_coef=-1"], "rl.kl_coef=-1.0 must be >= 0"),
    ("clip_low=5", lambda d: T + ["rl.clip_low=5"], "rl.clip_low=5.0 must be in (0, 1)"),
    ("clip_high<0", lambda d: T + ["rl.clip_high=-0.2"], "rl.clip_high=-0.2 must be positive"),
    ("group_size=1e8", lambda d: T + ["rl.group_size=100000000"], "rl.group_size=100000000 is more than 1024"),
    ("rows per step", lambda d: T + ["rl.prompts_per_step=20000", "rl.group_size=64"], "sequences decoded together"),
    ("slots", lambda d: T + ["rollout.slots=10000000"], "rollout.slots = 10000000"),
    ("device=cuda, no GPU", lambda d: T + ["model.device=cuda"], "no GPU is visible"),
    ("device=tpu", lambda d: T + ["model.device=tpu"], "model.device='tpu' is not one of"),
    ("hidden_size=0", lambda d: T + ["model.tiny.hidden_size=0"], "model.tiny.hidden_size=0 must be at least 1"),
    ("num_layers=-1", lambda d: T + ["model.tiny.num_layers=-1"], "model.tiny.num_layers=-1 must be at least 1"),
    ("heads do not divide", lambda d: T + ["model.tiny.num_heads=3"], "must divide by model.tiny.num_heads=3"),
    ("kv heads do not divide", lambda d: T + ["model.tiny.num_kv_heads=3"], "multiple of model.tiny.num_kv_heads=3"),
    ("run.name=../../x", lambda d: T + ["run.name=../../x"], "run.name='../../x' must be a plain directory name"),
    ("run.name absolute", lambda d: T + [f"run.name={d / 'abs'}"], "must be a plain directory name"),
    ("non-UTF-8 YAML", lambda d: T + ["--config", str(_latin1_yaml(d))], "is not UTF-8 text"),
    ("override after --config", lambda d: T + ["rl.steps=2", "--config", str(_yaml(d)), "run.save_every=0"],
     "run.save_every=0 must be at least 1"),  # applied, not "unrecognized arguments"
    # --- files and models that crash instead of answering
    ("train: random safetensors", lambda d: T + [f"model.path={_random_weights(d)}"], "model.safetensors: not a readable safetensors file"),
    ("train: truncated safetensors", lambda d: T + [f"model.path={_truncated_weights(d)}"], "file not fully covered"),
    ("eval: random safetensors", lambda d: ["eval", f"model={_random_weights(d)}", "task=addition"], "not a readable safetensors file"),
    ("--videomme: random safetensors", lambda d: ["eval", "--videomme", str(_annotations(d)), "--videos", str(d / "videos"),
                                                  f"model={_random_weights(d, 'qwen2_5_vl')}"], "not a readable safetensors file"),
    ("model_type bert", lambda d: T + [f"model.path={_bert(d)}"], "is a 'bert' model; this loader runs model types qwen2"),
    ("VLM for a text task", lambda d: ["eval", f"model={_random_weights(d, 'qwen2_5_vl')}", "task=addition"], "train it with task.name=videos"),
    ("text model for --videomme", lambda d: ["eval", "--videomme", str(_annotations(d)), "--videos", str(d / "videos"),
                                             f"model={_random_weights(d, 'qwen2')}"], "runs model types qwen2_5_vl"),
    ("JSONL line over the cap", lambda d: T + ["task.name=jsonl", f"task.train_file={_big_jsonl(d)}"], "big.jsonl:2: line longer than 4 MiB"),
    ("eval --out is a directory", lambda d: ["eval", "model=/nonexistent", "task=addition", "--out", str(d)], "is a directory; give a file path"),
    ("eval --out under a file", lambda d: ["eval", "model=/nonexistent", "--out", str(_file(d) / "r.jsonl")], "is a file, not a directory"),
    ("--videomme --out is a file", lambda d: ["eval", "--videomme", str(_annotations(d)), "--videos", str(d / "videos"),
                                              "--out", str(_file(d))], "is a file; give a directory"),
    ("--max-frames 0", lambda d: ["eval", "--videomme", str(_annotations(d)), "--videos", str(d / "videos"),
                                  "--max-frames", "0"], "--max-frames 0: sample at least 1 frame"),
    ("Video-MME parquet corrupt", lambda d: ["eval", "--videomme", str(_parquet_junk(d)), "--videos", str(d / "videos")],
     "not a readable parquet file"),
]


def _snapshot(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


@pytest.mark.parametrize("build, message", [pytest.param(b, m, id=i) for i, b, m in CASES])
def test_bad_input_exits_2_with_one_line(build, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(longrl.config, "gpu_visible", lambda: False)  # "cuda, no GPU" holds on GPU machines too
    argv = build(tmp_path)
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before  # nothing written, not even an empty run directory


# ----------------------------------------------------------------------------------------
# Where the process is the point: `python -m longrl`, a fresh interpreter.
# ----------------------------------------------------------------------------------------

SUBPROCESS_CASES = [
    ("rl.steps<0", lambda d: ["train", "rl.steps=-3"], "rl.steps=-3 must be at least 0"),
    ("device=cuda, GPUs hidden", lambda d: ["train", "model.device=cuda"], "no GPU is visible"),
    ("non-UTF-8 YAML", lambda d: ["train", "--config", str(_latin1_yaml(d))], "is not UTF-8 text"),
    ("JSONL line over the cap", lambda d: ["train", "task.name=jsonl", f"task.train_file={_big_jsonl(d)}"], "line longer than 4 MiB"),
]


def _longrl(args: list[str], cwd: Path, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "longrl", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("build, message", [pytest.param(b, m, id=i) for i, b, m in SUBPROCESS_CASES])
def test_bad_input_in_a_fresh_process(build, message, tmp_path):
    args = build(tmp_path)
    before = _snapshot(tmp_path)
    r = _longrl(args, tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and message in err, (r.returncode, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err and r.stdout == ""
    assert _snapshot(tmp_path) == before


NO_TORCH = "import sys; from longrl.cli import main; rc = main(sys.argv[1:]); print(sorted({'torch', 'transformers'} & set(sys.modules))); sys.exit(rc)"


@pytest.mark.parametrize("args", [["train", "rl.grup_size=4"], ["train", "rl.clip_low=5"], ["train", "run.name=../x"],
                                  ["eval", "model=m", "task.n_evl=3"]],
                         ids=["typo", "range", "run.name", "eval-typo"])
def test_config_errors_answer_before_torch_is_imported(args, tmp_path):
    """A typo answers in well under 2 s because nothing heavy is imported to refuse it."""
    r = _longrl(args, tmp_path, code=NO_TORCH)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout.strip() == "[]"
