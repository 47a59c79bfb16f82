"""Response budgets and eval cadence derived from the task when left unset (issue 16, part 6)."""

import yaml
import pytest

from longrl.cli import main
from longrl.config import (BUDGET_FLOOR, Config, eval_cadence, load_config, resolve_response_budgets,
                           response_budget)
from longrl.data.registry import load_task_examples
from longrl.errors import UserError
from longrl.models.tiny import build_tiny_tokenizer
from longrl.recipes.train import demonstration_lengths, derive_response_budgets


@pytest.mark.parametrize(
    "lengths, expected",
    [
        ([], BUDGET_FLOOR),  # nothing to size it by
        ([10] * 100, 48),  # 10 + 8 = 18 -> the floor
        ([40] * 100, 48),  # 40 + 8 = 48, exactly the floor
        ([41] * 100, 49),  # 41 + max(8, 5) = 49
        ([100] * 99 + [500], 110),  # nearest rank 99 of 100 is 100 (the outlier is the 100th): 100 + 10
        (list(range(1, 201)), 218),  # rank ceil(0.99 * 200) = 198 -> 198 + max(8, 20) = 218
        ([100] * 98 + [300, 300], 330),  # two of 100 long: rank 99 is 300 -> 300 + 30
    ],
)
def test_response_budget_hand_worked(lengths, expected):
    assert response_budget(lengths) == expected


def _lengths(overrides):
    cfg = load_config(None, overrides)
    return demonstration_lengths(load_task_examples(cfg.task), build_tiny_tokenizer())


def test_the_default_task_keeps_its_budget_of_48():
    # addition's demonstrations are at most 33 tokens with EOS: p99 + 8 = 41 -> the floor 48,
    # the budget every default run had (0.305 -> 0.815 in BENCHMARKS.md was measured at 48).
    lengths = _lengths([])
    assert max(lengths) <= 40
    assert response_budget(lengths) == 48
    assert response_budget(_lengths(["task.name=sort"])) == 48


def test_a_longer_task_gets_a_budget_that_fits():
    # chain_sum with 3 terms: 35% of its demonstrations were longer than the fixed 48 (issue 16).
    lengths = _lengths(["task.name=rg:chain_sum", "task.kwargs={min_terms: 3, max_terms: 3}", "task.n_train=400"])
    budget = response_budget(lengths)
    assert sum(n > 48 for n in lengths) > 0.2 * len(lengths)
    assert sum(n <= budget for n in lengths) >= 0.99 * len(lengths)


def test_resolve_sets_only_the_unset_budgets():
    cfg = Config()
    assert (cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens) == (0, 0)  # the defaults mean "derive"
    line = resolve_response_budgets(cfg, [100] * 100)
    assert (cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens) == (110, 110)
    assert "rollout.max_new_tokens and eval.max_new_tokens = 110" in line and "99th percentile 100" in line
    cfg = Config()
    cfg.eval.max_new_tokens = 7
    line = resolve_response_budgets(cfg, [100] * 100)
    assert (cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens) == (110, 7)
    assert line.startswith("longrl: rollout.max_new_tokens = 110")
    assert resolve_response_budgets(cfg, [500] * 10) is None  # both set now: nothing changes
    assert (cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens) == (110, 7)
    cfg = Config()
    assert "floor" in resolve_response_budgets(cfg, []) and cfg.rollout.max_new_tokens == BUDGET_FLOOR


def test_derive_from_a_task_and_its_tokenizer():
    cfg = load_config(None, ["task.n_train=300"])
    line = derive_response_budgets(cfg, load_task_examples(cfg.task), build_tiny_tokenizer())
    assert cfg.rollout.max_new_tokens == cfg.eval.max_new_tokens == 48 and "300 demonstrations" in line


@pytest.mark.parametrize("steps, every, expected", [(60, -1, 20), (12, -1, 4), (10, -1, 4), (1, -1, 1),
                                                    (0, -1, 1), (60, 0, 0), (60, 7, 7)])
def test_eval_cadence(steps, every, expected):
    cfg = Config()
    cfg.rl.steps, cfg.rl.eval_every = steps, every
    assert eval_cadence(cfg) == expected


@pytest.mark.parametrize("override, key", [("rollout.max_new_tokens=-1", "rollout.max_new_tokens"),
                                           ("eval.max_new_tokens=-3", "eval.max_new_tokens"),
                                           ("rl.eval_every=-2", "rl.eval_every")])
def test_negative_values_are_refused(override, key):
    with pytest.raises(UserError, match=key):
        load_config(None, [override])


def test_train_reports_and_writes_the_derived_values(tmp_path, capsys):
    tiny = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
            "task.n_train=60", "task.n_eval=4", "sft.steps=1", "sft.batch_size=4", "rl.steps=3",
            "rl.prompts_per_step=2", "rl.group_size=2", "rl.kl_coef=0.05", "run.progress=false"]
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=b", *tiny]) == 0
    out = capsys.readouterr().out
    assert out.count("rollout.max_new_tokens and eval.max_new_tokens = 48 tokens, derived from") == 1
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["rollout"]["max_new_tokens"] == saved["eval"]["max_new_tokens"] == 48
    assert saved["rl"]["eval_every"] == 1  # a third of 3 steps


def test_eval_resolves_only_its_own_budget():
    cfg = Config()
    line = resolve_response_budgets(cfg, [100] * 100, ("eval",))
    assert (cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens) == (0, 110)
    assert line.startswith("longrl: eval.max_new_tokens = 110")
