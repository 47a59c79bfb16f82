import threading

import pytest

from longrl.data.example import Example
from longrl.errors import UserError
from longrl.rewards import verifiers
from longrl.rewards.verifiers import (
    EXTRACTORS,
    VERIFIERS,
    answer_extractor,
    answer_scorer,
    extract_math_verify,
    extracted_answer_scorer,
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


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 7.", "7"),
        ("3 + 4 = 7, then 7 * 2 = 14", "14"),  # the last expression's value
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),  # a box first
        ("no numbers", None),
        ("1" * 2000, None),  # over MATH_MAX_CHARS: not parsed
    ],
)
def test_extract_math_verify(text, expected):
    assert extract_math_verify(text) == expected


def test_extractor_table():
    assert sorted(EXTRACTORS) == ["auto", "boxed", "last_number", "math_verify", "tags"]
    with pytest.raises(UserError, match="reward.extract"):
        answer_extractor("first_number")


# One tagged, one boxed (nested braces), one with several numbers, one with none: what each
# extraction mode gives the normalized verifier against the reference 7/2 (or 13).
_RESPONSES = {
    "tagged": "<think>3 + 4 = 7</think><answer>13</answer>",
    "boxed": "We get \\boxed{\\frac{7}{2}}",
    "numbers": "3 + 4 = 7 and 7 + 6 = 13",
    "none": "I do not know.",
}


@pytest.mark.parametrize(
    "extract, expected",
    [
        ("tags", {"tagged": 1.0, "boxed": 0.0, "numbers": 0.0, "none": 0.0}),
        ("auto", {"tagged": 1.0, "boxed": 1.0, "numbers": 0.0, "none": 0.0}),
        ("boxed", {"tagged": 0.0, "boxed": 1.0, "numbers": 0.0, "none": 0.0}),
        ("last_number", {"tagged": 1.0, "boxed": 0.0, "numbers": 1.0, "none": 0.0}),  # tagged ends in "13</answer>"
        # math_verify reads the whole text and does not see a number glued to "</answer>":
        # its last expression there is the 7 of the reasoning.
        ("math_verify", {"tagged": 0.0, "boxed": 1.0, "numbers": 1.0, "none": 0.0}),
    ],
)
def test_every_scorer_reads_through_the_extraction(extract, expected):
    refs = {"tagged": "13", "boxed": "\\frac{7}{2}", "numbers": "13", "none": "7"}
    for name, text in _RESPONSES.items():
        ex = Example(id=name, prompt="?", answer=refs[name])
        # The math verifier and a task's own check (here: exact string equality) see the same answer.
        check = extracted_answer_scorer(lambda answer, e: float(answer == e.answer), extract)
        got = (answer_scorer("math", extract)(text, ex), check(text, ex))
        assert got == (expected[name], expected[name]), (name, got)
    mcq = answer_scorer("mcq", extract)
    ex = Example(id="m", prompt="?", answer="B")
    # A boxed letter: tags and the last number find no answer; the box and math_verify read "B".
    assert mcq("so the answer is \\boxed{B}", ex) == (0.0 if extract in ("tags", "last_number") else 1.0)
