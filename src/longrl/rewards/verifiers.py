"""Answer checks: `(predicted, reference) -> float in [0, 1]`.

`predicted` is what the run's answer extraction (`answer_extractor`, `reward.extract`:
the `<answer>` block by default) pulled out of a response; None when it found no answer,
which always scores 0. `reference` is the task's answer string.
These are the rule-based verifiers of RLVR (Tulu 3, arXiv 2411.15124; DeepSeek-R1,
arXiv 2501.12948); `math_match` delegates to Hugging Face `math_verify`.

Departures: none of these give partial credit; tasks that want it (reasoning-gym
scorers) bring their own scorer instead.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation
from typing import Callable

from longrl.data.example import Example
from longrl.errors import UserError
from longrl.rewards.answer import extract_answer, extract_auto, extract_boxed, extract_choice_letter, extract_last_number

MATH_TIMEOUT_SECONDS = 3
"""Per-call limit for math_verify's parse and verify, enforced only in the main thread."""

MATH_MAX_CHARS = 1000
"""Longer predictions score 0 without being parsed: sympy on model garbage can be slow."""

_SPACES = re.compile(r"\s+")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def exact_match(predicted: str | None, reference: str) -> float:
    """1.0 when the two strings are equal after stripping surrounding whitespace."""
    if predicted is None:
        return 0.0
    return float(predicted.strip() == reference.strip())


def normalized_match(predicted: str | None, reference: str) -> float:
    """1.0 when equal after `normalize_text`, or when both are the same finite number.

    Numbers compare by value, so "7.0" == "7" == "+07" and "1,000" == "1000".
    """
    if predicted is None:
        return 0.0
    p, r = normalize_text(predicted), normalize_text(reference)
    if not p:
        return 0.0
    if p == r:
        return 1.0
    p_num, r_num = _as_number(p), _as_number(r)
    return float(p_num is not None and r_num is not None and p_num == r_num)


def normalize_text(s: str) -> str:
    """Lowercase, collapse whitespace, and peel (repeatedly) surrounding quotes, `$`
    delimiters and one trailing period: `  "Paris". ` -> `paris`, `$7$` -> `7`."""
    s = _SPACES.sub(" ", s.lower()).strip()
    while True:
        before = s
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1].rstrip()
        if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`$":
            s = s[1:-1].strip()
        if s == before:
            return s


def _as_number(s: str) -> Decimal | None:
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def math_match(predicted: str | None, reference: str) -> float:
    """1.0 when math_verify finds the prediction equal to the reference, else 0.0.

    Both sides are parsed as LaTeX math (wrapped in `$...$` unless they already carry
    `$` or `\\boxed`), falling back to math_verify's plain parse, so "\\frac12",
    "0.5" and "1/2" all match "\\frac{1}{2}". Any exception or timeout scores 0.

    math_verify enforces its timeouts with `signal.alarm`, which only works in the main
    thread; elsewhere (a reward worker thread) the timeouts are switched off
    (`parsing_timeout=None`, `timeout_seconds=None`) and only `MATH_MAX_CHARS` guards
    against slow inputs.
    """
    if predicted is None or not predicted.strip() or len(predicted) > MATH_MAX_CHARS:
        return 0.0
    from math_verify import verify  # lazy: sympy import costs seconds

    limit = _math_time_limit()
    try:
        gold, pred = _math_parse(reference, limit), _math_parse(predicted, limit)
        if not gold or not pred:
            return 0.0
        return float(verify(gold, pred, timeout_seconds=limit))
    except Exception:  # math_verify and sympy raise many types on malformed input
        return 0.0


def _math_parse(s: str, limit: int | None) -> list:
    from math_verify import parse

    s = s.strip()
    if "$" in s or "\\boxed" in s:
        return parse(s, parsing_timeout=limit)
    return parse(f"${s}$", parsing_timeout=limit) or parse(s, parsing_timeout=limit)


def _math_time_limit() -> int | None:
    return MATH_TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def extract_math_verify(text: str) -> str | None:
    """math_verify's own reading of a whole response (its LaTeX and expression extraction:
    a boxed answer first, else the last expression or number), as the string it
    extracted; None when it finds nothing or the response is over `MATH_MAX_CHARS`.
    Timeouts as in `math_match`."""
    if len(text) > MATH_MAX_CHARS:
        return None
    from math_verify import parse  # lazy: sympy import costs seconds

    try:
        parsed = parse(text, parsing_timeout=_math_time_limit())
    except Exception:  # math_verify and sympy raise many types on malformed input
        return None
    return str(parsed[1]).strip() if len(parsed) > 1 else None


def mcq_match(predicted: str | None, reference: str) -> float:
    """1.0 when the letter read from the prediction equals the reference letter.

    The prediction is read with `extract_choice_letter`; the reference may be "B",
    "(B)" or "b". A reference that is not a single letter scores everything 0.
    """
    if predicted is None:
        return 0.0
    ref = reference.strip().strip("()[]. ").upper()
    if len(ref) != 1 or not ref.isalpha():
        return 0.0
    letters = "ABCDE" if ref in "ABCDE" else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: ord(ref) - ord("A") + 1]
    return float(extract_choice_letter(predicted, letters) == ref)


VERIFIERS: dict[str, Callable[[str | None, str], float]] = {
    "exact": exact_match,
    "normalized": normalized_match,
    "math": math_match,
    "mcq": mcq_match,
}
"""Verifier by the name used in `reward.correctness`."""


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "auto": extract_auto,
    "tags": extract_answer,
    "boxed": extract_boxed,
    "last_number": extract_last_number,
    "math_verify": extract_math_verify,
}
"""How the answer is read out of a response, by the name used in `reward.extract`
(`rewards.answer`: 'auto' is the tags when the response has an answer tag, else a box)."""


def answer_extractor(mode: str) -> Callable[[str], str | None]:
    """`read(response_text) -> answer or None` for a `reward.extract` value."""
    if mode not in EXTRACTORS:
        raise UserError(f"reward.extract={mode!r} is not one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[mode]


def extracted_answer_scorer(check: Callable[[str, Example], float],
                            extract: str = "auto") -> Callable[[str, Example], float]:
    """A `correctness_fn(response_text, example)` from a check of the extracted answer
    (a task's own verifier, e.g. reasoning-gym's): `check(answer, example)` on the answer
    `extract` reads (`answer_extractor`); a response without one scores 0."""
    read = answer_extractor(extract)

    def score(response_text: str, example: Example) -> float:
        answer = read(response_text)
        return 0.0 if answer is None else float(check(answer, example))

    return score


def answer_scorer(name: str, extract: str = "auto") -> Callable[[str, Example], float]:
    """A `correctness_fn(response_text, example)` for `score_responses`: the named
    verifier applied to the answer `extract` reads (`answer_extractor`) and
    `example.answer`. 'code' reads its program from the `<answer>` block whatever
    `extract` says (`rewards.code.program_of`)."""
    if name == "code":  # runs the program against the example's tests (rewards/code.py)
        from longrl.rewards.code import code_scorer

        return code_scorer()
    if name not in VERIFIERS:
        raise UserError(f"reward.correctness={name!r} is not one of {sorted([*VERIFIERS, 'code'])}")
    verifier, read = VERIFIERS[name], answer_extractor(extract)

    def score(response_text: str, example: Example) -> float:
        return verifier(read(response_text), example.answer)

    return score
