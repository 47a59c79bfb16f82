"""Non-finite values: a NaN/inf loss or gradient skips the update, three in a row stop the
run, a NaN reward is refused per sample, and no NaN weight reaches a checkpoint."""

import io
import json
import math

import pytest
import torch

from longrl.cli import main
from longrl.data.example import Example
from longrl.errors import UserError
from longrl.recipes.common import (
    MAX_NONFINITE_STEPS,
    clip_and_step,
    make_scheduler,
    skipped_steps,
)
from longrl.rewards.combine import score_responses


def _setup(lr=0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return model, opt, make_scheduler(opt, 0, 10, decay=False)


def _backward(model, scale=1.0):
    (model(torch.ones(1, 3)).sum() * scale).backward()


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_a_non_finite_gradient_skips_the_update_and_is_counted():
    model, opt, sched = _setup()
    before = _weights(model)
    _backward(model, float("nan"))
    norm = clip_and_step(model, opt, sched, grad_clip=1.0)
    assert math.isnan(norm)  # the NaN norm is still returned (logged as it was)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))  # weights unchanged
    assert not opt.state  # AdamW never ran: no moments, no step count
    assert all(p.grad is None for p in model.parameters())  # nothing carried into the next step
    assert skipped_steps(opt) == 1 and sched.last_epoch == 1  # the schedule still advances
    _backward(model)
    assert clip_and_step(model, opt, sched, grad_clip=1.0) > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, _weights(model)))
    assert skipped_steps(opt) == 1 and opt.param_groups[0]["skipped_in_a_row"] == 0


def test_a_non_finite_loss_skips_even_when_the_gradient_is_finite():
    model, opt, sched = _setup()
    before = _weights(model)
    _backward(model)
    clip_and_step(model, opt, sched, grad_clip=1.0, loss=torch.tensor(float("inf")))
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model))) and skipped_steps(opt) == 1


def test_three_skips_in_a_row_stop_the_run_naming_the_step_and_the_cause():
    model, opt, sched = _setup()
    for i in range(MAX_NONFINITE_STEPS - 1):
        _backward(model, float("inf"))
        clip_and_step(model, opt, sched, 1.0, where=f"RL step {i + 1}")
    _backward(model, float("inf"))
    with pytest.raises(UserError, match=r"^RL step 3: the loss or gradient norm was NaN or inf for 3 steps in a row "
                                        r".*learning rate too high \(sft.lr / rl.lr\) or a NaN reward weight"):
        clip_and_step(model, opt, sched, 1.0, where="RL step 3")
    model, opt, sched = _setup()
    for _ in range(MAX_NONFINITE_STEPS):
        try:
            _backward(model, float("nan"))
            clip_and_step(model, opt, sched, 1.0)
        except UserError as e:
            assert str(e).startswith("optimizer step 3:")  # without `where`: the optimizer's own count


def test_the_skip_count_is_saved_with_the_optimizer():
    from longrl.checkpoint import decode_state, encode_state

    model, opt, sched = _setup()
    _backward(model, float("nan"))
    clip_and_step(model, opt, sched, 1.0)
    buf = io.BytesIO()
    torch.save(encode_state(opt.state_dict()), buf)
    buf.seek(0)
    _, opt2, _ = _setup()
    opt2.load_state_dict(decode_state(torch.load(buf, weights_only=True)))
    assert skipped_steps(opt2) == 1 and opt2.param_groups[0]["skipped_in_a_row"] == 1


def test_a_non_finite_reward_is_refused_for_that_sample_only():
    examples = [Example(id=f"e{i}", prompt="q", answer="1") for i in range(3)]
    scores = {"a": 1.0, "b": float("nan"), "c": float("inf")}
    with pytest.warns(RuntimeWarning, match=r"2 of 3 rewards were not finite .* correctness nan for example 'e1'"):
        reward, parts = score_responses(["a", "b", "c"], examples, lambda r, ex: scores[r], 1.0, 0.5)
    # 'a' has no <answer> block: format reward 0, so reward = 1.0 * 1.0 + 0.5 * 0.
    torch.testing.assert_close(reward, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(parts["correctness"], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="reward weights must be finite"):
        score_responses(["a"], examples[:1], lambda r, ex: 1.0, float("nan"), 0.0)


TINY = [
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
    "task.n_train=40", "task.n_eval=4", "sft.batch_size=8", "sft.steps=12", "rl.steps=0",
    "eval.max_new_tokens=6", "rollout.max_new_tokens=6", "run.progress=false",
]


@pytest.mark.parametrize("hot", [["sft.lr=1e6"],
                                 # 30 SFT steps at a sane rate give rewards that vary, so RL has a gradient;
                                 # the KL term keeps every later step a real update (a step without any
                                 # signal makes none, and the broken model's rewards are all 0)
                                 ["sft.steps=30", "sft.lr=1e-2", "rl.steps=6", "rl.prompts_per_step=3",
                                  "rl.group_size=4", "rl.lr=1e6", "rl.kl_coef=0.1", "eval.max_new_tokens=12",
                                  "rollout.max_new_tokens=12"]])
def test_a_learning_rate_that_blows_up_stops_cleanly_and_writes_no_nan_weights(tmp_path, capsys, hot):
    code = main(["train", f"run.out_dir={tmp_path}", "run.name=hot", *TINY, *hot, "train.grad_clip=0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "3 steps in a row" in err and "learning rate too high" in err
    ckpts = tmp_path / "hot" / "checkpoints"
    from safetensors.torch import load_file

    for weights in ckpts.glob("step_*/model.safetensors"):  # whatever was written is finite
        assert all(bool(torch.isfinite(t).all()) for t in load_file(weights).values())
    records = [json.loads(line) for line in (tmp_path / "hot" / "metrics.jsonl").read_text().splitlines()]
    phase = "rl" if "rl.lr=1e6" in hot else "sft"
    norms = [r["grad/norm"] for r in records if r["phase"] == phase and "grad/norm" in r]
    assert norms and math.isfinite(norms[0])  # the phase's first step was finite: the blow-up came from its update
    assert sum(math.isnan(n) for n in norms) == 2  # then skipped steps (the third stopped the run before its record)
