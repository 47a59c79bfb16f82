"""Built-in verifiable task families, generated in code (no download).

Each generator is deterministic in its seed and returns `Example`s whose `solution` is a
short chain of thought in the response format `<think>...</think><answer>...</answer>`,
used as the CoT-SFT demonstration.

- addition: `347+285=` -> `<think>7+5=12 4+8+1=13 3+2+1=6</think><answer>632</answer>`
  (column addition right to left with carries; kwargs: min_digits, max_digits).
- sort: `sort 5 2 9 1` -> `<think>1 2 5 9</think><answer>1 2 5 9</answer>`... with the
  reasoning being the selection order (kwargs: min_len, max_len).
"""

from __future__ import annotations

import random

from longrl.data.example import Example


def _addition_trace(a: int, b: int) -> str:
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
        carry = total // 10
    return " ".join(steps)


def addition(n: int, seed: int, min_digits: int = 2, max_digits: int = 3) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a = rng.randint(10 ** (rng.randint(min_digits, max_digits) - 1), 10 ** max_digits - 1)
        b = rng.randint(10 ** (rng.randint(min_digits, max_digits) - 1), 10 ** max_digits - 1)
        ans = str(a + b)
        out.append(Example(
            id=f"addition:{seed}:{i}", prompt=f"{a}+{b}=", answer=ans,
            solution=f"<think>{_addition_trace(a, b)}</think><answer>{ans}</answer>",
        ))
    return out


def sort(n: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        xs = [rng.randint(0, 99) for _ in range(rng.randint(min_len, max_len))]
        ans = " ".join(map(str, sorted(xs)))
        trace = " ".join(f"min={v}" for v in sorted(xs))
        out.append(Example(
            id=f"sort:{seed}:{i}", prompt=f"sort {' '.join(map(str, xs))}:", answer=ans,
            solution=f"<think>{trace}</think><answer>{ans}</answer>",
        ))
    return out


GENERATORS = {"addition": addition, "sort": sort}
