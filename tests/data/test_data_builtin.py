"""Built-in task generators: true answers, demonstration traces and the imperfect teacher."""

import itertools
import re

import pytest

from longrl.config import TaskConfig
from longrl.data.builtin import addition, sort
from longrl.data.registry import load_task_examples
from longrl.errors import UserError
from longrl.rewards.answer import extract_answer


def _operands(prompt: str) -> tuple[int, int]:
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


def _replay(trace: str) -> str:
    """Rebuild the answer a trace implies: each column's last digit, the last column whole."""
    totals = [int(step.split("=")[1]) for step in trace.split()]
    return str(totals[-1]) + "".join(str(t % 10) for t in reversed(totals[:-1]))


def test_addition_answers_are_true_sums_whatever_the_teacher():
    for slip in (0.0, 0.7, 1.0):
        for ex in addition(300, seed=3, slip=slip):
            a, b = _operands(ex.prompt)
            assert ex.answer == str(a + b)


def test_perfect_teacher_demonstrates_correct_carrying():
    for ex in addition(300, seed=4, slip=0.0):
        trace = re.search(r"<think>(.*)</think>", ex.solution).group(1)
        assert extract_answer(ex.solution) == ex.answer == _replay(trace)


def test_sloppy_teacher_drops_every_carry():
    assert addition(1, 0, slip=1.0)[0].solution  # generator runs at the boundary
    from longrl.data.builtin import addition_trace

    assert addition_trace(347, 285, carries=False) == ("7+5=12 4+8=12 3+2=5", "522")
    assert addition_trace(847, 285, carries=False) == ("7+5=12 4+8=12 8+2=10", "1022")
    assert addition_trace(847, 285) == ("7+5=12 4+8+1=13 8+2+1=11", "1132")
    wrong = 0
    for ex in addition(300, seed=5, slip=1.0):
        trace = re.search(r"<think>(.*)</think>", ex.solution).group(1)
        assert not re.search(r"\d\+\d\+1=", trace)  # no column adds a carried 1
        assert extract_answer(ex.solution) == _replay(trace)
        wrong += extract_answer(ex.solution) != ex.answer
    assert 100 < wrong < 300  # carry-free sums stay right, the rest are wrong


def test_slip_rate_is_the_fraction_of_sloppy_demonstrations_and_keeps_the_problems():
    sloppy = addition(4000, seed=6, slip=0.7)
    careful = addition(4000, seed=6, slip=0.0)
    assert [e.prompt for e in sloppy] == [e.prompt for e in careful]
    differs = sum(s.solution != c.solution for s, c in zip(sloppy, careful))
    carries = sum(bool(re.search(r"\d\+\d\+1=", c.solution)) for c in careful)  # sums with a carry
    assert differs == pytest.approx(0.7 * carries, rel=0.08)


def test_bad_slip_is_a_user_error():
    with pytest.raises(UserError, match="slip"):
        load_task_examples(TaskConfig(name="addition", n_train=10, n_eval=5, kwargs={"slip": 1.5}))


def test_sort_demonstrations_are_sorted():
    for ex in sort(100, seed=1):
        assert extract_answer(ex.solution) == ex.answer
        assert [int(x) for x in ex.answer.split()] == sorted(int(x) for x in ex.prompt[5:-1].split())


def test_sort_trace_is_the_chain_of_comparisons():
    """`2<5=5<9`: the sorted numbers joined by the comparison between neighbours (a list with
    a repeated number, so `=` is exercised)."""
    (ex,) = [e for e in sort(200, seed=3) if len(set(e.answer.split())) < len(e.answer.split())][:1]
    ys = [int(x) for x in ex.answer.split()]
    trace = re.search(r"<think>(.*)</think>", ex.solution).group(1)
    assert [int(x) for x in re.split("[<=]", trace)] == ys
    assert re.findall("[<=]", trace) == ["=" if a == b else "<" for a, b in itertools.pairwise(ys)]


def test_sort_defaults_fit_the_default_response_budget():
    """task.name=sort with every other setting at its default: no demonstration is longer
    than the tokens rollouts and evaluation may generate (half of them were)."""
    from longrl.config import Config
    from longrl.models.tiny import build_tiny_tokenizer
    from longrl.recipes.train import demonstration_length_warning

    cfg = Config()
    cfg.task.name = "sort"
    task = load_task_examples(cfg.task)
    assert len(task.train) > 3000
    tok = build_tiny_tokenizer()
    assert demonstration_length_warning(task, tok, cfg) is None
    cfg.rollout.max_new_tokens = cfg.eval.max_new_tokens = 30  # the check still bites on a tighter budget
    assert demonstration_length_warning(task, tok, cfg) is not None
