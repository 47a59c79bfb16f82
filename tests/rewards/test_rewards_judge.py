"""Model-as-judge reward: the judge's p(yes) / (p(yes) + p(no)) on the filled template,
computed here by hand from the same local model, and the wiring through `longrl train`."""

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from longrl.cli import main
from longrl.data.example import Example
from longrl.errors import UserError
from longrl.models.tiny import build_tiny_tokenizer
from longrl.rewards.judge import DEFAULT_TEMPLATE, Judge, judge_scorer


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    tok = build_tiny_tokenizer()
    torch.manual_seed(5)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("judge")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_is_the_judges_yes_probability(judge_dir):
    judge = Judge(str(judge_dir), torch.device("cpu"))
    ex = Example("e", "What colour is the ball?", "red")
    text = DEFAULT_TEMPLATE.format(question=ex.prompt, reference="red", response="crimson") + "\n"
    assert judge.prompt(ex.prompt, "red", "crimson") == text  # no chat template: the raw filled template
    # by hand: the next-token distribution after the prompt, first tokens of yes/Yes/no/No
    tok, model = judge.tokenizer, judge.model
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[0, -1], -1)
    first = lambda w: {tok(v, add_special_tokens=False)["input_ids"][0] for v in (w, w.capitalize(), " " + w, " " + w.capitalize())}  # noqa: E731
    y, n = first("yes"), first("no")
    assert y - n == {tok.convert_tokens_to_ids("y"), tok.convert_tokens_to_ids("Y")}  # the shared space is dropped
    yes, no = float(p[list(y - n)].sum()), float(p[list(n - y)].sum())
    score = judge_scorer(judge)
    assert score("<think>dark</think><answer>crimson</answer>", ex) == pytest.approx(yes / (yes + no), rel=1e-6)
    assert 0.0 < score("<answer>crimson</answer>", ex) < 1.0
    assert score("<answer>blue</answer>", ex) != score("<answer>crimson</answer>", ex)
    assert score("crimson, no tags", ex) == 0.0  # no answer block: not judged


def test_bad_judge_settings_are_clear_errors(judge_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="judge_template must contain"):
        Judge(str(judge_dir), torch.device("cpu"), template="Is {response} right?")
    assert main(["train", f"run.out_dir={tmp_path}", "reward.correctness=judge"]) == 2
    assert "reward.judge_model=PATH" in capsys.readouterr().err
    assert main(["train", f"run.out_dir={tmp_path}", "reward.correctness=judge", f"reward.judge_model={tmp_path}"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_training_with_a_judge_logs_its_rewards(judge_dir, tmp_path):
    args = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
            "task.n_train=50", "task.n_eval=4", "sft.steps=30", "sft.lr=1e-2", "sft.batch_size=8", "rl.steps=2",
            "rl.prompts_per_step=2", "rl.group_size=3", "rollout.max_new_tokens=12", "eval.max_new_tokens=12",
            "run.progress=false", "reward.correctness=judge", f"reward.judge_model={judge_dir}"]
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=j", *args]) == 0
    recs = [json.loads(x) for x in (tmp_path / "j" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in recs if r["phase"] == "rl" and r["step"] > 0]
    assert all(0.0 <= r["reward/correctness"] <= 1.0 for r in rl)
    assert any(0.0 < r["reward/correctness"] < 1.0 for r in rl)  # judged answers: fractional probabilities
