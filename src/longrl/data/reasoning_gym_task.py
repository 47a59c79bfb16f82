"""A reasoning-gym dataset as a longrl task: generated examples plus the dataset's own scorer.

reasoning-gym (Stojanovski et al., arXiv 2505.24760) generates procedural reasoning
problems, each with a verifier `score_answer(answer, entry) -> float`. This adapter
turns entries into `Example`s and hands an answer to that verifier (which may give partial
credit); reading the answer out of a response is the reward code's job
(`rewards.verifiers.extracted_answer_scorer`), so this module imports none of it.

Notes:
- `Example.meta["rg_entry"]` is the raw entry the scorer needs, kept as generated (not
  JSON round-tripped) because some scorers compare tuples (arc_agi, rearc boards). It
  is JSON-serialisable for every task checked except gsm_symbolic, whose metadata holds
  `fractions.Fraction`s: write it with `json.dumps(..., default=str)` when saving.
  `meta["rg_source"]` is a small JSON-safe locator (task, seed, index).
- A few tasks (boxnet, graph_color, propositional_logic, rubiks_cube, rush_hour) have
  no single reference answer (`entry["answer"]` is None); their `Example.answer` is ""
  and only the scorer can judge them, so they cannot seed CoT-SFT demonstrations.
- The user's seed is hashed before it reaches reasoning-gym (`_spread`), because its
  generators seed item i with `seed + i`: adjacent seeds would give overlapping splits.
- reasoning_gym is imported lazily (it takes seconds), and its generators' stray prints
  (the bf task prints progress dots) are kept off stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import random
from typing import Any

from longrl.data.example import Example
from longrl.errors import UserError


def reasoning_gym_names() -> list[str]:
    """Every dataset name registered in reasoning_gym (its `factory.DATASETS`)."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


class ReasoningGymTask:
    """Examples and scorer of one reasoning-gym dataset.

    `seed` is the default for `examples`; `kwargs` go to the dataset's config class
    (e.g. chain_sum: min_terms, max_terms, min_digits, max_digits) and are checked here.
    """

    def __init__(self, name: str, seed: int = 0, **kwargs: Any):
        names = reasoning_gym_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
            hint = f"close names: {', '.join(close)}" if close else f"some names: {', '.join(names[:8])}, ... (list them all: python -c 'from longrl.data.reasoning_gym_task import reasoning_gym_names as n; print(n())')"
            raise UserError(f"unknown reasoning-gym task {name!r}; {hint} ({len(names)} tasks in all)")
        if "size" in kwargs:
            raise UserError(f"reasoning-gym task {name!r}: the number of examples comes from task.n_train/task.n_eval, not task.kwargs.size")
        self.name = name
        self.seed = seed
        self.kwargs = dict(kwargs)
        # Scorers read only the config (e.g. a board format), never the seed or size, so
        # one small instance scores examples of every seed. Building it checks kwargs now.
        self._scorer = self._dataset(size=1, seed=seed)

    def examples(self, n: int, seed: int | None = None) -> list[Example]:
        """`n` examples of the dataset generated with `seed` (default: the task's seed).

        Ids are "rg:<name>:<seed>:<i>"; the same (kwargs, seed, n) always gives the same
        examples. Nearby seeds give unrelated examples (see `_spread`).
        """
        if n < 1:
            raise ValueError(f"n={n} must be at least 1")
        seed = self.seed if seed is None else seed
        dataset = self._dataset(size=n, seed=seed)
        with contextlib.redirect_stdout(io.StringIO()):
            entries = [dataset[i] for i in range(n)]
        return [self._example(entry, seed, i) for i, entry in enumerate(entries)]

    def score_answer(self, answer: str, example: Example) -> float:
        """The dataset's own `score_answer` on an answer already read out of a response."""
        entry = example.meta.get("rg_entry")
        if entry is None:
            raise ValueError(f"example {example.id!r} has no meta['rg_entry']; it was not made by ReasoningGymTask")
        return float(self._scorer.score_answer(answer=answer, entry=entry))

    def _example(self, entry: dict, seed: int, i: int) -> Example:
        answer = entry.get("answer")
        return Example(
            id=f"rg:{self.name}:{seed}:{i}",
            prompt=entry["question"],
            answer="" if answer is None else str(answer),
            meta={"rg_entry": entry, "rg_source": {"task": self.name, "seed": seed, "index": i}},
        )

    def _dataset(self, size: int, seed: int):
        import reasoning_gym

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return reasoning_gym.create_dataset(self.name, size=size, seed=_spread(seed), **self.kwargs)
        except TypeError as e:
            raise UserError(
                f"reasoning-gym task {self.name!r}: bad task.kwargs {self.kwargs} ({e}); valid keys: {self._config_fields()}"
            ) from None
        except (AssertionError, ValueError) as e:
            raise UserError(
                f"reasoning-gym task {self.name!r}: task.kwargs {self.kwargs} rejected by its config: {e or 'invalid value'}"
            ) from None

    def _config_fields(self) -> list[str]:
        from reasoning_gym.factory import DATASETS

        return [f.name for f in dataclasses.fields(DATASETS[self.name][1]) if f.name not in ("seed", "size")]


def _spread(seed: int) -> int:
    """A well-mixed 32-bit generator seed for a user seed.

    Most reasoning-gym generators draw item i from `Random(seed + i)`, so seeds 1234 and
    1235 would share all but one item and an eval split seeded next to the train split
    would be the train split. Hashing the seed first keeps such splits disjoint.
    """
    return random.Random(seed).getrandbits(32)
