"""Scripted CoT teachers for reasoning-gym families: true traces, the slips, and the wiring."""

import re

import pytest

from longrl.config import TaskConfig
from longrl.recipes.tasks import load_task
from longrl.data.teachers import _subtraction_trace, chain_sum, simple_equations
from longrl.errors import UserError
from longrl.rewards.answer import extract_answer

CHAIN = {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 3}
CHAIN3 = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 2}
EQ = {"min_terms": 2, "max_terms": 3, "operators": ["+", "-"], "operators_weights": [0.5, 0.5]}


def _task(name, kwargs, slip, n=400, teacher="auto"):
    return load_task(TaskConfig(name=name, n_train=n, n_eval=5, kwargs=dict(kwargs, slip=slip), teacher=teacher))


def _chain(expr):
    return {"metadata": {"expression": expr}}


def _eq(equation, var="x"):
    return {"metadata": {"equation": equation, "variable": var}}


@pytest.mark.parametrize("name,kwargs", [("rg:chain_sum", CHAIN), ("rg:chain_sum", CHAIN3), ("rg:simple_equations", EQ)])
def test_careful_teacher_is_right_by_reasoning_gyms_own_scorer(name, kwargs):
    task = _task(name, kwargs, slip=0.0)
    for ex in task.train:
        assert ex.solution.startswith("<think>") and ex.solution.endswith("</answer>")
        assert extract_answer(ex.solution) == ex.answer
        assert task.score(ex.solution, ex) == 1.0


def test_hand_worked_column_traces():
    assert chain_sum(_chain("347 + 285"), True) == "<think>7+5=12 4+8+1=13 3+2+1=6</think><answer>632</answer>"
    assert chain_sum(_chain("347 + 285"), False) == "<think>7+5=12 4+8=12 3+2=5</think><answer>522</answer>"
    assert chain_sum(_chain("52 - 17"), True) == "<think>12-7=5 5-1-1=3</think><answer>35</answer>"
    assert chain_sum(_chain("52 - 17"), False) == "<think>7-2=5 5-1=4</think><answer>45</answer>"
    assert chain_sum(_chain("17 - 52"), True) == "<think>swap 12-7=5 5-1-1=3</think><answer>-35</answer>"
    assert chain_sum(_chain("3 - 9 - 4"), True) == "<think>3-9: swap 9-3=6; -6-4: neg 6+4=10</think><answer>-10</answer>"
    assert chain_sum(_chain("12 + 9 - 4"), True) == "<think>12+9: 2+9=11 1+0+1=2; 21-4: 11-4=7 2-1-0=1</think><answer>17</answer>"
    assert _subtraction_trace(305, 298, True) == ("15-8=7 10-1-9=0 3-1-2=0", "7")


def test_hand_worked_equation_traces():
    assert simple_equations(_eq("x + 34 = 90"), True) == "<think>x=90-34: 10-4=6 9-1-3=5</think><answer>56</answer>"
    assert simple_equations(_eq("x + 34 = 90"), False) == "<think>x=90+34: 0+4=4 9+3=12</think><answer>124</answer>"
    assert simple_equations(_eq("72 - d = -17", "d"), True) == "<think>d=17+72: 7+2=9 1+7=8</think><answer>89</answer>"
    assert simple_equations(_eq("e - 52 = -16", "e"), True) == "<think>e=-16+52: 12-6=6 5-1-1=3</think><answer>36</answer>"
    assert simple_equations(_eq("e - 52 = -16", "e"), False) == "<think>e=-16-52: neg 6+2=8 1+5=6</think><answer>-68</answer>"


def test_sloppy_teachers_make_the_textbook_slips():
    sums = _task("rg:chain_sum", CHAIN, slip=1.0).train
    for ex in sums:
        trace = re.search(r"<think>(.*)</think>", ex.solution).group(1)
        steps = trace.removeprefix("swap ").split()
        assert all(re.fullmatch(r"\d[+-]\d=\d+", step) for step in steps), trace  # no carry, no borrow
    wrong = sum(extract_answer(ex.solution) != ex.answer for ex in sums)
    assert 0.3 * len(sums) < wrong < 0.8 * len(sums)  # carry/borrow-free problems stay right
    equations = _task("rg:simple_equations", EQ, slip=1.0).train
    for ex in equations:  # the sign slip is wrong unless the constants cancel out
        has_constant = re.search(r"\d", ex.meta["rg_entry"]["metadata"]["equation"].split("=")[0])
        assert (extract_answer(ex.solution) != ex.answer) == bool(has_constant)


@pytest.mark.parametrize("name,kwargs", [("rg:chain_sum", CHAIN), ("rg:simple_equations", EQ)])
def test_slip_rate_and_problems_unchanged(name, kwargs):
    careful = _task(name, kwargs, slip=0.0, n=3000).train
    sloppy = _task(name, kwargs, slip=0.6, n=3000).train
    assert [e.prompt for e in careful] == [e.prompt for e in sloppy]
    assert [e.answer for e in careful] == [e.answer for e in sloppy]
    slipped = [s.solution != c.solution for s, c in zip(sloppy, careful)]
    could_slip = [c.solution != s.solution for c, s in zip(careful, _task(name, kwargs, slip=1.0, n=3000).train)]
    assert sum(slipped) == pytest.approx(0.6 * sum(could_slip), rel=0.08)


def test_default_slip_is_point_six_and_teacher_none_gives_bare_answers():
    auto = load_task(TaskConfig(name="rg:simple_equations", n_train=3000, n_eval=5, kwargs=EQ)).train
    assert sum(extract_answer(e.solution) != e.answer for e in auto) == pytest.approx(0.6 * 3000, rel=0.08)
    bare = load_task(TaskConfig(name="rg:simple_equations", n_train=20, n_eval=5, kwargs=EQ, teacher="none")).train
    assert all(e.solution == "" for e in bare)


@pytest.mark.parametrize("cfg,fragment", [
    (dict(name="rg:chain_sum", kwargs={"allow_negation": True, "max_terms": 2}), "allow_negation=false"),
    (dict(name="rg:simple_equations", kwargs={}), "operators"),
    (dict(name="rg:count_bits", kwargs={"slip": 0.5}), "has no scripted teacher"),
    (dict(name="rg:chain_sum", kwargs={"slip": 0.5}, teacher="none"), "task.teacher=none"),
    (dict(name="rg:chain_sum", kwargs={"slip": 2.0}), "probability"),
    (dict(name="rg:chain_sum", teacher="gpt"), "'auto' or 'none'"),
])
def test_out_of_range_settings_are_user_errors(cfg, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_task(TaskConfig(n_train=300, n_eval=5, **cfg))
