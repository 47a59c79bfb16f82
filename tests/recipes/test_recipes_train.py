"""`longrl train` end to end on a tiny config, and exact resume."""

import json
import shutil

import pytest
import torch

from longrl.cli import main

TINY = [
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
    "task.n_train=200", "task.n_eval=12", "sft.steps=6", "sft.batch_size=8",
    "rl.steps=4", "rl.prompts_per_step=3", "rl.group_size=4", "rl.micro_batch_size=5",
    "rl.eval_every=2", "rollout.max_new_tokens=12", "eval.max_new_tokens=12",
    "run.save_every=2", "run.progress=false",
]


def _rl_records(path):
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in recs if r["phase"] == "rl"]


def test_train_writes_the_run_directory(tmp_path):
    # With a KL term every step updates (a step whose groups all score alike, as this
    # nearly untrained model's do, otherwise makes no update: tests/recipes/test_recipes_nosignal.py).
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=r", *TINY, "rl.kl_coef=0.05"]) == 0
    run = tmp_path / "r"
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png"):
        assert (run / f).is_file(), f
    summary = json.loads((run / "summary.json").read_text())
    for k in ("accuracy_after_sft", "accuracy_after_rl", "wall_seconds"):
        assert k in summary
    assert 0.0 <= summary["accuracy_after_rl"] <= 1.0
    recs = _rl_records(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    assert all("reward/mean" in r and "rollout/truncated_frac" in r and "loss/policy" in r for r in recs[1:])
    assert "eval/accuracy" in recs[2] and "eval/accuracy" in recs[4]
    # The engine and the trainer compute the same log-probs before the update.
    assert all(r["logprob/engine_trainer_gap"] < 1e-4 for r in recs[1:])
    # The checkpoint is plain Hugging Face format.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = run / "checkpoints" / "step_4"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("12+34=", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tok)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0", "step_2", "step_4"]


def _crashed_copy(full, crashed):
    """A copy of the finished 4-step run `full` as a crash right after the step-2 checkpoint
    would leave it: later checkpoints, the step-4 record and the summary never happened."""
    if crashed != full:
        shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_4")
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[: len(lines) - 1]) + "\n")
    (crashed / "summary.json").unlink(missing_ok=True)
    return crashed


@pytest.mark.parametrize("extra", [[], ["rl.kl_coef=0.05", "rl.dynamic_sampling=true", "rl.loss=gspo",
                                        "rl.advantage=rloo", "rl.ppo_epochs=2", "rl.overlong=soft"],
                                   ["rollout.partial=true", "rollout.offpolicy=tis", "rl.overlong=filter"],
                                   ["rollout.partial=true", "rollout.offpolicy=mask", "rollout.max_staleness=1"],
                                   ["rl.algorithm=dpo", "rl.dpo_beta=0.5", "sft.steps=30", "sft.lr=1e-2"]])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, extra):
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=full", *TINY, *extra]) == 0
    full = tmp_path / "full"
    crashed = _crashed_copy(full, tmp_path / "crashed")
    assert main(["train", f"resume={crashed}", "run.progress=false"]) == 0
    assert _rl_records(crashed / "metrics.jsonl") == _rl_records(full / "metrics.jsonl")
    if "rl.algorithm=dpo" in extra:  # the format reward varies after 30 SFT steps: there are pairs to train on
        assert sum(r["dpo/pairs"] for r in _rl_records(full / "metrics.jsonl")[1:]) > 0
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((crashed / "summary.json").read_text())
    assert a["accuracy_after_rl"] == b["accuracy_after_rl"] and a["accuracy_after_sft"] == b["accuracy_after_sft"]
    from safetensors.torch import load_file

    wa = load_file(full / "checkpoints" / "step_4" / "model.safetensors")
    wb = load_file(crashed / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _torchrun(*args):
    import os
    import subprocess
    import sys

    from longrl.parallel.local_spawn import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "longrl", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)



def test_torchrun_data_parallel_trains_and_only_rank0_writes(tmp_path):
    r = _torchrun(f"run.out_dir={tmp_path}", "run.name=dp", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = _rl_records(tmp_path / "dp" / "metrics.jsonl")
    assert [x["step"] for x in recs] == [0, 1, 2, 3, 4]  # one writer: no duplicated records
    assert recs[1]["rollout/groups"] == 3  # the 3 prompts of a step split over 2 ranks
    assert (tmp_path / "dp" / "checkpoints" / "step_4" / "model.safetensors").is_file()
    assert r.stdout.count("held-out accuracy, after RL") == 1  # one rank prints the summary table


def test_streambp_training_path_matches_the_chunked_one(tmp_path):
    runs = {}
    for mode in ("chunked", "streambp"):
        args = [a for a in TINY if not a.startswith("rl.steps")] + ["rl.steps=2", "train.stream_chunk=5"]
        assert main(["train", f"run.out_dir={tmp_path}", f"run.name={mode}", f"train.backprop={mode}", *args]) == 0
        runs[mode] = _rl_records(tmp_path / mode / "metrics.jsonl")
    for a, b in zip(runs["chunked"], runs["streambp"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (b[k] if isinstance(b[k], str) else pytest.approx(b[k], rel=1e-3, abs=1e-5)), k


def test_demonstrations_longer_than_the_generation_limit_are_warned_about(tmp_path, capsys):
    from longrl.config import load_config
    from longrl.recipes.tasks import load_task
    from longrl.models.tiny import build_tiny_tokenizer
    from longrl.recipes.train import demonstration_length_warning

    cfg = load_config(None, ["task.n_train=50", "task.n_eval=5"])
    task, tok = load_task(cfg.task), build_tiny_tokenizer()
    assert demonstration_length_warning(task, tok, cfg) is None  # the default's demonstrations fit
    longest = max(len(tok(ex.solution)["input_ids"]) for ex in task.train) + 1
    cfg = load_config(None, ["task.n_train=50", "task.n_eval=5", f"rollout.max_new_tokens={longest - 1}"])
    warning = demonstration_length_warning(task, tok, cfg)
    assert f"longer than the {longest - 1} new tokens" in warning and f"longest {longest} tokens" in warning
    assert demonstration_length_warning(task, tok, load_config(None, ["sft.steps=0"])) is None
    # The CLI prints it once, to stderr, and still runs.
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=w", *TINY]) == 0
    assert capsys.readouterr().err.count("SFT demonstrations are longer than the 12 new tokens") == 1


def test_april_under_torchrun_resumes_every_rank_exactly(tmp_path):
    april = ["rollout.partial=true", "rollout.over_provision=2.0", "rollout.offpolicy=tis", "rl.prompts_per_step=4"]
    r = _torchrun(f"run.out_dir={tmp_path}", "run.name=full", *TINY, *april)
    assert r.returncode == 0, r.stderr[-2000:]
    full = tmp_path / "full"
    recs = _rl_records(full / "metrics.jsonl")
    assert [x["step"] for x in recs] == [0, 1, 2, 3, 4]
    assert all(x["rollout/groups"] == 4 for x in recs[1:])  # 2 complete groups on each rank
    saved = torch.load(full / "checkpoints" / "step_2" / "trainer_state.pt", weights_only=False)
    a, b = saved["ranks"]
    assert not torch.equal(a["sampler"], b["sampler"])  # each rank keeps its own streams
    parked = [{s.prompt_id for s in r["april"]["buffer"]} for r in saved["ranks"]]
    assert all(parked) and not parked[0] & parked[1]  # each rank parks its own; the ranks draw disjoint prompts
    crashed = _crashed_copy(full, tmp_path / "crashed")
    r = _torchrun(f"resume={crashed}", "run.progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _rl_records(crashed / "metrics.jsonl") == recs
    from safetensors.torch import load_file

    wa = load_file(full / "checkpoints" / "step_4" / "model.safetensors")
    wb = load_file(crashed / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # One process cannot take over two ranks' APRIL streams.
    assert main(["train", f"resume={crashed}", "run.progress=false"]) == 2


def test_zero_optimizer_under_torchrun_matches_plain_adamw_and_resumes(tmp_path):
    from safetensors.torch import load_file

    r = _torchrun(f"run.out_dir={tmp_path}", "run.name=plain", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _torchrun(f"run.out_dir={tmp_path}", "run.name=zero", *TINY, "parallel.zero_optimizer=true")
    assert r.returncode == 0, r.stderr[-2000:]
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    # The SFT and RL updates are the same: identical metrics and bit-equal weights.
    strip = lambda recs: [{k: v for k, v in x.items() if not k.startswith("time/")} for x in recs]  # noqa: E731
    read = lambda run: strip(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())  # noqa: E731
    assert read(zero) == read(plain)
    wa, wb = (load_file(run / "checkpoints" / "step_4" / "model.safetensors") for run in (plain, zero))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The checkpoint holds the whole optimizer state (gathered), and a resume is exact.
    saved = torch.load(zero / "checkpoints" / "step_2" / "trainer_state.pt", weights_only=False)
    plain_saved = torch.load(plain / "checkpoints" / "step_2" / "trainer_state.pt", weights_only=False)
    assert len(saved["optimizer"]["state"]) == len(plain_saved["optimizer"]["state"])
    _crashed_copy(zero, zero)
    r = _torchrun(f"resume={zero}", "run.progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert read(zero) == read(plain)
    wb = load_file(zero / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_zero_optimizer_without_torchrun_is_one_clear_error(tmp_path, capsys):
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=z", *TINY, "parallel.zero_optimizer=true"]) == 2
    assert "torchrun --nproc-per-node" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def _zero_rank(rank, world, out):
    from longrl.recipes.common import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    opt = make_optimizer(model, 1e-2, 0.0, shard=True)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    held = [i for i, p in enumerate(model.parameters()) if p in opt.optim.state]  # this rank's moments
    (out / f"{rank}.json").write_text(json.dumps({"type": type(opt).__name__, "held": held}))


def test_zero_optimizer_keeps_each_ranks_share_of_the_moments(tmp_path):
    from longrl.parallel.local_spawn import spawn_local

    spawn_local(_zero_rank, 2, tmp_path, start_method="fork")
    a, b = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert a["type"] == b["type"] == "ZeroRedundancyOptimizer"
    assert a["held"] and b["held"] and not set(a["held"]) & set(b["held"])
    assert sorted(a["held"] + b["held"]) == list(range(6))
