import json

import pytest

from longrl.data.reasoning_gym_task import ReasoningGymTask, reasoning_gym_names
from longrl.errors import UserError
from longrl.rewards.verifiers import extracted_answer_scorer

SMALL_CHAIN_SUM = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2)


def score(task, response_text, example):
    """The task's own check on a response, as a run scores it (reward.correctness=auto)."""
    return extracted_answer_scorer(task.score_answer)(response_text, example)


@pytest.fixture(scope="module")
def chain_sum():
    return ReasoningGymTask("chain_sum", seed=3, **SMALL_CHAIN_SUM)


def test_examples_fields(chain_sum):
    examples = chain_sum.examples(6, seed=11)
    assert chain_sum.name == "chain_sum"
    assert [ex.id for ex in examples] == [f"rg:chain_sum:11:{i}" for i in range(6)]
    for i, ex in enumerate(examples):
        # "State the final answer to the following arithmetic problem: 4 - 1 ="
        expression = ex.prompt.rsplit(":", 1)[1].rstrip("= ")
        assert int(ex.answer) == eval(expression)  # two terms, + and - only
        assert ex.meta["rg_entry"]["question"] == ex.prompt
        assert ex.meta["rg_source"] == {"task": "chain_sum", "seed": 11, "index": i}
        json.dumps(ex.meta)  # JSON-serialisable for this task


def test_examples_are_deterministic_and_seeds_differ(chain_sum):
    a = [ex.prompt for ex in chain_sum.examples(20, seed=11)]
    assert a == [ex.prompt for ex in chain_sum.examples(20, seed=11)]
    # reasoning-gym seeds item i with seed + i; adjacent seeds must not give shifted copies
    b = [ex.prompt for ex in chain_sum.examples(20, seed=12)]
    assert a[1:] != b[:-1]
    assert [ex.id for ex in chain_sum.examples(2)] == ["rg:chain_sum:3:0", "rg:chain_sum:3:1"]


def test_chain_sum_scores(chain_sum):
    for ex in chain_sum.examples(5, seed=0):
        assert score(chain_sum, f"<think>add</think><answer>{ex.answer}</answer>", ex) == 1.0
        assert score(chain_sum, f"<answer>{int(ex.answer) + 1}</answer>", ex) == 0.0
        assert score(chain_sum, ex.answer, ex) == 0.0  # no answer block
        assert score(chain_sum, f"<answer>{ex.answer}", ex) == 0.0  # truncated


def test_count_bits_scores():
    task = ReasoningGymTask("count_bits", seed=0, max_n=255)
    for ex in task.examples(5, seed=1):
        n = int(ex.prompt.rstrip("?").split()[-1])
        assert ex.answer == str(bin(n).count("1"))
        assert score(task, f"<answer>{ex.answer}</answer>", ex) == 1.0
        assert score(task, f"<answer>{int(ex.answer) + 3}</answer>", ex) == 0.0


def test_unknown_name_lists_close_names():
    with pytest.raises(UserError, match="chain_sum") as err:
        ReasoningGymTask("chain_summ", seed=0)
    assert "unknown reasoning-gym task 'chain_summ'" in str(err.value)
    with pytest.raises(UserError, match="some names: ab, "):
        ReasoningGymTask("zzzzzz", seed=0)
    assert "chain_sum" in reasoning_gym_names() and len(reasoning_gym_names()) > 50


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(foo=1), "valid keys: ['min_terms'"),
        (dict(min_terms=0), "min_terms must be positive"),
        (dict(size=4), "task.n_train"),
    ],
)
def test_bad_kwargs(kwargs, fragment):
    with pytest.raises(UserError, match="chain_sum") as err:
        ReasoningGymTask("chain_sum", seed=0, **kwargs)
    assert fragment in str(err.value)


def test_generator_prints_stay_off_stdout(capsys):
    # reasoning-gym's bf generator prints progress dots while compiling programs.
    task = ReasoningGymTask("bf", seed=0)
    (ex,) = task.examples(1)
    assert capsys.readouterr().out == ""
    assert score(task, f"<answer>{ex.answer}</answer>", ex) == 1.0


def test_the_task_scorer_reads_through_reward_extract():
    # A reasoning-gym task's own checker sees the answer the run's extraction reads: an
    # instruct model's prose answer scores by its last number, and not at all by the tags.
    from longrl.config import load_config
    from longrl.recipes.tasks import load_task

    cfg = load_config(None, ["task.name=rg:chain_sum", "task.n_train=20", "task.n_eval=5",
                             "reward.extract=last_number"])
    ex = load_task(cfg.task, "auto", cfg.reward.extract).eval[0]
    prose = f"The final answer to this arithmetic problem is {ex.answer}."
    assert load_task(cfg.task, "auto", "last_number").score(prose, ex) == 1.0
    assert load_task(cfg.task, "auto", "tags").score(prose, ex) == 0.0
    assert load_task(cfg.task, "auto", "boxed").score(f"so \\boxed{{{ex.answer}}}", ex) == 1.0
    assert load_task(cfg.task, "normalized", "last_number").score(prose, ex) == 1.0


@pytest.mark.parametrize("overrides, fragment", [
    (["reward.extract=first_number"], "reward.extract='first_number' is not one of"),
    (["reward.extract=boxed", "reward.correctness=code"], "reward.correctness=code reads the <answer> block"),
])
def test_bad_extract_settings_are_refused(overrides, fragment):
    from longrl.config import load_config

    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, overrides)
