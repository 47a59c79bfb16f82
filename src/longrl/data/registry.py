"""Task registry: `task.name` -> train examples and held-out examples.

- a built-in family (`addition`, `sort`): generated in code, CoT demonstrations included;
- `rg:<name>`: a reasoning-gym dataset, which brings its own answer check (`score_answer`);
  its CoT-SFT demonstrations come from a scripted teacher (`data/teachers.py`) where the
  family has one;
- `jsonl`: the user's files;
- `hf:<source>`: a data set read with the `datasets` library (local files, a saved data set,
  a hub id in the local cache), columns mapped by `task.*_column` (`data/hf_datasets.py`).

Which scorer a run uses (`reward.correctness`, the dataset's own check, code tests) is
chosen above this package, in `recipes/tasks.py`: data/ imports no reward code.

Held-out examples use a different generator seed, and any training example whose prompt
also appears in the held-out set is dropped, so accuracy is measured on unseen prompts.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass
from typing import Callable

from longrl.config import TaskConfig
from longrl.data.builtin import GENERATORS
from longrl.data.example import Example
from longrl.errors import UserError

Scorer = Callable[[str, Example], float]
AnswerCheck = Callable[[str, Example], float]


@dataclass
class TaskExamples:
    name: str
    train: list[Example]
    eval: list[Example]
    corpus: list[str] | None = None
    """Documents the task brings for the search tool (the `facts` task); None: none."""
    check_answer: AnswerCheck | None = None
    """The dataset's own check of an extracted answer, (answer, example) -> [0, 1] (reasoning-gym's
    `score_answer`, partial credit allowed); None when the task has none (built-in, jsonl)."""


@dataclass
class TaskData:
    name: str
    train: list[Example]
    eval: list[Example]
    score: Scorer
    """correctness(response_text, example) in [0, 1]"""
    corpus: list[str] | None = None
    """The task's documents for the search tool (see TaskExamples.corpus)."""
    environment: object | None = None
    """The multi-turn environment of tool-using runs (`rollout.episodes.ToolEnvironment`);
    None: single-turn."""


def load_task_examples(cfg: TaskConfig, check: Callable[[Example], None] | None = None) -> TaskExamples:
    """The task's examples, held-out prompts removed from the training set.

    `check(example)` raises UserError for an example the run's reward cannot score (the tests
    of reward.correctness=code); it sees every example, so a bad file fails now, not mid-run."""
    name = cfg.name
    check_answer = corpus = None
    if name in GENERATORS:
        gen = GENERATORS[name]
        # A generator with its own split (disjoint entities) is told which one it makes.
        split = ({"split": "train"}, {"split": "eval"}) if getattr(gen, "split_aware", False) else ({}, {})
        try:
            train = gen(cfg.n_train, cfg.seed, **split[0], **cfg.kwargs)
            held = gen(cfg.n_eval, cfg.seed + 7919, **split[1], **cfg.kwargs)
            corpus = gen.corpus(**cfg.kwargs) if hasattr(gen, "corpus") else None
        except (TypeError, ValueError) as e:
            raise UserError(f"task '{name}': bad task.kwargs {cfg.kwargs} ({e})") from None
    elif name.startswith("rg:"):
        from longrl.data.reasoning_gym_task import ReasoningGymTask

        if "seed" in cfg.kwargs:
            raise UserError("task.kwargs.seed: set the generator seed with task.seed, not task.kwargs")
        from longrl.data.teachers import TEACHERS, teach

        if cfg.teacher not in ("auto", "none"):
            raise UserError(f"task.teacher={cfg.teacher!r}: choose 'auto' or 'none'")
        family, kwargs = name[3:], dict(cfg.kwargs)
        taught = cfg.teacher == "auto" and family in TEACHERS
        slip = kwargs.pop("slip", 0.6) if taught else None
        if "slip" in kwargs:
            why = "task.teacher=none" if family in TEACHERS else f"rg:{family} has no scripted teacher (those with one: {', '.join(sorted(TEACHERS))})"
            raise UserError(f"task.kwargs.slip is a scripted teacher's setting, but {why}; drop it")
        task = ReasoningGymTask(family, seed=cfg.seed, **kwargs)
        train = task.examples(cfg.n_train, cfg.seed)
        held = task.examples(cfg.n_eval, cfg.seed + 7919)
        if taught:
            train = teach(family, train, float(slip), cfg.seed)
        check_answer = task.score_answer
    elif name == "jsonl":
        from longrl.data.jsonl import load_jsonl_examples

        train = load_jsonl_examples(cfg.train_file)
        if cfg.eval_file:
            held = load_jsonl_examples(cfg.eval_file)[: cfg.n_eval]
        else:
            shuffled = train[:]
            random.Random(cfg.seed).shuffle(shuffled)
            n_eval = min(cfg.n_eval, len(shuffled) // 5)
            if n_eval < 1:
                raise UserError(f"task.train_file '{cfg.train_file}' has {len(train)} examples: too few to split off a held-out set; give task.eval_file")
            held, train = shuffled[:n_eval], shuffled[n_eval:]
    elif name.startswith("hf:"):
        from longrl.data.hf_datasets import load_hf_examples

        train, held = load_hf_examples(cfg)
    else:
        options = list(GENERATORS) + ["jsonl", "rg:<reasoning-gym name>", "hf:<data file, saved dataset or cached hub id>"]
        near = difflib.get_close_matches(name, options, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise UserError(f"unknown task '{name}'{hint} Choose one of {options}")
    if check is not None:
        for ex in train + held:
            check(ex)
    held_prompts = {ex.prompt for ex in held}
    train = [ex for ex in train if ex.prompt not in held_prompts]
    if not train:
        raise UserError(f"task '{name}' has no training examples (after removing held-out prompts); raise task.n_train or check the data")
    if not held:
        raise UserError(f"task '{name}' has no held-out examples; raise task.n_eval or give task.eval_file")
    return TaskExamples(name=name, train=train, eval=held, corpus=corpus, check_answer=check_answer)


def demonstration(ex: Example) -> str:
    """The SFT target for an example: its CoT solution, or the bare answer in the format."""
    return ex.solution or f"<answer>{ex.answer}</answer>"
