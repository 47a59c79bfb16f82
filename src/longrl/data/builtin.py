"""Built-in verifiable task families, generated in code (no download).

Each generator is deterministic in its seed and returns `Example`s whose `solution` is a
short chain of thought in the response format `<think>...</think><answer>...</answer>`,
used as the CoT-SFT demonstration.

- addition: `347+285=` -> `<think>7+5=12 4+8+1=13 3+2+1=6</think><answer>632</answer>`
  (column addition right to left with carries; kwargs: min_digits, max_digits, slip).
  The demonstrations come from an imperfect teacher: with probability `slip` (default
  0.6) a demonstration forgets every carry (`<think>7+5=12 4+8=12 3+2=5</think>
  <answer>522</answer>`), the classic schoolbook slip. SFT imitates the teacher, so its
  greedy answer drops carries and is right only on carry-free sums; the verifier checks the
  true sum, and RL has to find that carrying pays. This keeps room for RL that does not
  depend on stopping SFT at a lucky step (set `task.kwargs.slip=0` for a perfect teacher).
  Only `solution` is affected: `answer` is always the true sum.
- facts: tool-using agents; see `data/facts.py`.
- sort: `sort 5 2 9 5` -> `<think>2<5=5<9</think><answer>2 5 5 9</answer>`: the reasoning
  is the chain of comparisons that puts the numbers in order (kwargs: min_len, max_len).
  The chain is kept this terse so that every default demonstration (3 to 6 numbers below
  100) fits the default 48-token response budget with the tiny tokenizer; the earlier
  `min=1 min=2 ...` trace made half of them too long to be generated whole.
"""

from __future__ import annotations

import itertools
import random

from longrl.data.example import Example


def addition_trace(a: int, b: int, carries: bool = True) -> tuple[str, str]:
    """Column addition right to left: (trace, answer). Without `carries`, each column's
    carry is forgotten and the last column's total is written out whole (347+285 -> 522)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, digits, carry = [], [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
        digits.append(str(total % 10))
        carry = total // 10 if carries else 0
        last = total
    answer = str(last) + "".join(reversed(digits[:-1]))
    return " ".join(steps), answer


def addition(n: int, seed: int, min_digits: int = 2, max_digits: int = 3, slip: float = 0.6) -> list[Example]:
    if not 0.0 <= slip <= 1.0:
        raise ValueError(f"slip={slip} must be a probability in [0, 1]")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a = rng.randint(10 ** (rng.randint(min_digits, max_digits) - 1), 10 ** max_digits - 1)
        b = rng.randint(10 ** (rng.randint(min_digits, max_digits) - 1), 10 ** max_digits - 1)
        # A separate stream for the teacher's slips, so `slip` never changes the problems.
        careful = random.Random(f"{seed}:{i}:slip").random() >= slip
        trace, shown = addition_trace(a, b, carries=careful)
        out.append(Example(
            id=f"addition:{seed}:{i}", prompt=f"{a}+{b}=", answer=str(a + b),
            solution=f"<think>{trace}</think><answer>{shown}</answer>",
        ))
    return out


def sort(n: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        xs = [rng.randint(0, 99) for _ in range(rng.randint(min_len, max_len))]
        ys = sorted(xs)
        ans = " ".join(map(str, ys))
        trace = str(ys[0]) + "".join(("=" if a == b else "<") + str(b) for a, b in itertools.pairwise(ys))
        out.append(Example(
            id=f"sort:{seed}:{i}", prompt=f"sort {' '.join(map(str, xs))}:", answer=ans,
            solution=f"<think>{trace}</think><answer>{ans}</answer>",
        ))
    return out


def _facts():
    from longrl.data.facts import facts

    return facts


GENERATORS = {"addition": addition, "sort": sort, "facts": _facts()}
