import threading

import pytest

from longrl.data.example import Example
from longrl.errors import UserError
from longrl.rewards import verifiers
from longrl.rewards.verifiers import (
    VERIFIERS,
    answer_scorer,
    exact_match,
    math_match,
    mcq_match,
    normalize_text,
    normalized_match,
)


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("42", "42", 1.0),
        (" 42\n", "42", 1.0),
        ("42", " 42 ", 1.0),
        ("42.0", "42", 0.0),
        ("Paris", "paris", 0.0),
        ("", "", 1.0),
        (None, "42", 0.0),
        (None, "", 0.0),
    ],
)
def test_exact_match(pred, ref, expected):
    assert exact_match(pred, ref) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  Paris  ", "paris"),
        ("New   York\n City", "new york city"),
        ('"Paris".', "paris"),
        ("'Paris'", "paris"),
        ("$7$", "7"),
        ("`x`", "x"),
        ('"$7$"', "7"),
        ("7.", "7"),
        ("wait...", "wait..."),  # an ellipsis is not a full stop
        ("a.", "a"),
        ('"', '"'),  # a lone quote is not a pair
    ],
)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("Paris", "paris", 1.0),
        ("  the  Eiffel tower. ", "The Eiffel Tower", 1.0),
        ('"yes"', "yes", 1.0),
        ("$42$", "42", 1.0),
        ("7.0", "7", 1.0),
        ("7", "7.00", 1.0),
        ("+7", "7", 1.0),
        ("07", "7", 1.0),
        ("1,000", "1000", 1.0),
        ("1,000,000.5", "1000000.50", 1.0),
        ("-0", "0", 1.0),
        ("7.", "7", 1.0),
        ("-3", "3", 0.0),
        ("7.01", "7", 0.0),
        ("1,00", "100", 0.0),  # not a thousands grouping, and not equal as text
        ("12,3", "123", 0.0),
        ("nan", "nan", 1.0),  # equal as text
        ("inf", "infinity", 0.0),  # non-finite numbers do not compare by value
        ("Lyon", "Paris", 0.0),
        ("", "", 0.0),  # an empty answer never scores
        ("  ", "", 0.0),
        (None, "7", 0.0),
    ],
)
def test_normalized_match(pred, ref, expected):
    assert normalized_match(pred, ref) == expected


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("0.5", "\\frac{1}{2}", 1.0),
        ("1/2", "\\frac{1}{2}", 1.0),
        ("\\frac12", "\\frac{1}{2}", 1.0),
        ("\\dfrac{1}{2}", "1/2", 1.0),
        ("$\\frac{1}{2}$", "0.5", 1.0),
        ("\\boxed{3}", "3", 1.0),
        ("x = 2", "2", 1.0),
        ("1,000", "1000", 1.0),
        ("2.0", "2", 1.0),
        ("(x+1)^2", "x^2+2x+1", 1.0),
        ("\\sqrt 2", "\\sqrt{2}", 1.0),
        ("2^{1/2}", "\\sqrt{2}", 1.0),
        ("\\{2,1\\}", "\\{1,2\\}", 1.0),
        ("the answer is 5 apples", "5", 1.0),
        ("3", "4", 0.0),
        ("2 and 3", "2", 0.0),
        ("-1/2", "1/2", 0.0),
        ("banana", "7", 0.0),
        ("", "7", 0.0),
        ("   ", "7", 0.0),
        (None, "7", 0.0),
        ("7", "", 0.0),  # an unparseable reference scores everything 0
        ("\\frac{", "1", 0.0),  # malformed latex: no exception escapes
        ("1" * 2000, "1" * 2000, 0.0),  # over MATH_MAX_CHARS: not parsed
    ],
)
def test_math_match(pred, ref, expected):
    assert math_match(pred, ref) == expected


def test_math_match_timeout_is_zero(monkeypatch):
    # A power tower makes sympy's comparison run for a long time; the alarm stops it.
    monkeypatch.setattr(verifiers, "MATH_TIMEOUT_SECONDS", 1)
    assert math_match("5", "2^{2^{2^{2^{2^{20}}}}}") == 0.0


def test_math_match_in_worker_thread():
    # math_verify's signal-based timeouts fail outside the main thread; ours are off there.
    results = []
    t = threading.Thread(target=lambda: results.append((math_match("1/2", "0.5"), math_match("3", "4"))))
    t.start()
    t.join()
    assert results == [(1.0, 0.0)]


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("B", "B", 1.0),
        ("(b)", "B", 1.0),
        ("The answer is B) blue", "B", 1.0),
        ("B", "(B)", 1.0),
        ("B", "b", 1.0),
        ("C", "B", 0.0),
        ("A or B", "B", 0.0),  # hedging earns nothing
        ("Options (A) red (B) blue", "B", 0.0),
        ("G", "G", 1.0),  # letters beyond E when the reference needs them
        ("Answer: H", "G", 0.0),
        ("B", "blue", 0.0),  # the reference must be one letter
        (None, "B", 0.0),
    ],
)
def test_mcq_match(pred, ref, expected):
    assert mcq_match(pred, ref) == expected


def test_verifier_table():
    assert VERIFIERS == {"exact": exact_match, "normalized": normalized_match, "math": math_match, "mcq": mcq_match}


def test_answer_scorer_reads_the_answer_block():
    ex = Example(id="0", prompt="3+4?", answer="7")
    score = answer_scorer("normalized")
    assert score("<think>3+4</think><answer>7.0</answer>", ex) == 1.0
    assert score("<answer>8</answer>", ex) == 0.0
    assert score("7", ex) == 0.0  # no answer block, no credit
    with pytest.raises(UserError, match="reward.correctness"):
        answer_scorer("fuzzy")
