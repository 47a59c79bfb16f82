"""Scripted chain-of-thought teachers for reasoning-gym families.

reasoning-gym generates problems with answers but no reasoning, and CoT-SFT needs worked
solutions. Long-RL gets its CoT data from a strong model; with no model to download, longrl
ships small scripted teachers for a few families instead. Each writes a worked solution in
the response format (`<think>...</think><answer>...</answer>`) from the reasoning-gym entry.

Like the built-in `addition` task's teacher, each is imperfect: with probability `slip` a
demonstration makes a classic slip all the way through. SFT imitates the teacher, slips
included; the verifier (reasoning-gym's own scorer) checks the true answer, so RL has to
find that the careful way pays. Only demonstrations are affected, never `Example.answer`.

- chain_sum: column arithmetic on non-negative integer terms, left to right.
  `57 + 86 =` -> `<think>7+6=13 5+8+1=14</think><answer>143</answer>`;
  `52 - 17 =` -> `<think>12-7=5 5-1-1=3</think><answer>35</answer>` (a borrowed ten is
  written as a leading 1, the paid-back borrow as `-1`); a smaller minuend is swapped first
  (`17 - 52 =` -> `<think>swap 12-7=5 5-1-1=3</think><answer>-35</answer>`), and the sum
  of two negatives is `neg` + the columns of its magnitude; with more than two terms each
  step is one `a+b:` block and the blocks are joined by `;`.
  Slips: additions forget every carry, subtractions take the smaller digit from the larger
  one in every column (both are the textbook bugs of schoolbook arithmetic).
- simple_equations (with `operators: ["+", "-"]`, so the variable has no coefficient):
  move the constant across and compute, `x + 34 = 90` ->
  `<think>x=90-34: 10-4=6 9-1-3=5</think><answer>56</answer>`; a negative total is written
  `neg` + the columns of its magnitude. Slip: the constant crosses the `=` without
  changing its sign (`x=90+34`), the classic algebra slip; the columns are always careful.

Adding a family: a function `(entry, careful) -> solution text`, raising `UserError` for an
entry it cannot solve (say which kwargs keep entries in range), registered in `TEACHERS`.
"""

from __future__ import annotations

import random
import re
from typing import Callable

from longrl.data.builtin import addition_trace
from longrl.data.example import Example
from longrl.errors import UserError


def _subtraction_trace(a: int, b: int, careful: bool) -> tuple[str, str]:
    """Column subtraction a - b (a >= b) right to left: (trace, answer).

    Careless: every column takes the smaller digit from the larger and never borrows
    (52 - 17 -> 45)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, digits, borrow = [], [], 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        if not careful:
            d = abs(x - y)
            steps.append(f"{max(x, y)}-{min(x, y)}={d}")
        else:
            top = x - borrow
            head = f"{x}-1" if borrow else f"{x}"
            if top < y:
                head, top, borrow = "1" + head, top + 10, 1
            else:
                borrow = 0
            d = top - y
            steps.append(f"{head}-{y}={d}")
        digits.append(str(d))
    return " ".join(steps), "".join(reversed(digits)).lstrip("0") or "0"


def _binary_step(a: int, op: str, b: int, careful: bool) -> tuple[str, int]:
    if op == "+":
        trace, shown = addition_trace(a, b, carries=careful)
        return trace, int(shown)
    if a >= b:
        trace, shown = _subtraction_trace(a, b, careful)
        return trace, int(shown)
    trace, shown = _subtraction_trace(b, a, careful)
    return "swap " + trace, -int(shown)


def _signed_sum(p: int, q: int, careful: bool = True) -> tuple[str, int]:
    """Columns for p + q with signed terms: (trace, value). A negative total of two
    negative terms is written `neg` + the columns of its magnitude."""
    if p >= 0 and q >= 0:
        return _binary_step(p, "+", q, careful)
    if p >= 0:
        return _binary_step(p, "-", -q, careful)
    if q >= 0:
        return _binary_step(q, "-", -p, careful)
    trace, total = _binary_step(-p, "+", -q, careful)
    return "neg " + trace, -total


def chain_sum(entry: dict, careful: bool) -> str:
    tokens = entry["metadata"]["expression"].split()
    terms, ops = tokens[0::2], tokens[1::2]
    if not all(t.isdigit() for t in terms) or any(op not in "+-" for op in ops):
        raise UserError(
            f"the scripted chain_sum teacher handles non-negative integer terms, not {entry['metadata']['expression']!r}; "
            "set task.kwargs.allow_negation=false, or task.teacher=none for bare-answer demonstrations")
    acc = int(terms[0])
    blocks = []
    for op, term in zip(ops, terms[1:]):
        trace, acc_next = _signed_sum(acc, int(term) if op == "+" else -int(term), careful)
        blocks.append(trace if len(ops) == 1 else f"{acc}{op}{term}: {trace}")
        acc = acc_next
    return f"<think>{'; '.join(blocks)}</think><answer>{acc}</answer>"


def simple_equations(entry: dict, careful: bool) -> str:
    meta = entry["metadata"]
    var, equation = meta["variable"], meta["equation"]
    lhs, _, rhs = equation.replace(" ", "").partition("=")
    sign, const = 0, 0
    for term in re.findall(r"[+-]?[^+-]+", lhs):
        body = term.lstrip("+-")
        negative = term.startswith("-")
        if body == var:
            sign += -1 if negative else 1
        elif body.isdigit():
            const += -int(body) if negative else int(body)
        else:
            sign = 2  # a coefficient or another symbol: out of the teacher's range
            break
    if sign not in (1, -1) or not re.fullmatch(r"-?\d+", rhs):
        raise UserError(
            f"the scripted simple_equations teacher handles a variable without coefficient, not {equation!r}; "
            "set task.kwargs.operators=[\"+\", \"-\"] and task.kwargs.operators_weights=[0.5, 0.5], or task.teacher=none")
    c = int(rhs)
    # careful: sign*x + const = c  ->  x = sign*(c - const); the slip keeps const's sign.
    p, q = (c, -const) if careful else (c, const)
    if sign < 0:
        p, q = -p, -q
    trace, value = _signed_sum(p, q)
    return f"<think>{var}={p}{q:+d}: {trace}</think><answer>{value}</answer>"


TEACHERS: dict[str, Callable[[dict, bool], str]] = {"chain_sum": chain_sum, "simple_equations": simple_equations}


def teach(family: str, examples: list[Example], slip: float, seed: int) -> list[Example]:
    """Fill each example's `solution` with the family's scripted demonstration.

    Example i slips with probability `slip`, drawn from its own stream keyed by (seed, i),
    so `slip` never changes which problems are generated."""
    if not 0.0 <= slip <= 1.0:
        raise UserError(f"task.kwargs.slip={slip} must be a probability in [0, 1]")
    write = TEACHERS[family]
    for i, ex in enumerate(examples):
        careful = random.Random(f"{seed}:{i}:slip").random() >= slip
        ex.solution = write(ex.meta["rg_entry"], careful)
    return examples

