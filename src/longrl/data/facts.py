"""`facts`: a generated fact-lookup task for tool-using agents (search on demand).

A world of made-up entities, each with a colour and a pet, lives in a corpus of one-line
documents ("Vokari has color teal."). A question asks one attribute of one entity
("Vokari color?"). Some questions carry the fact in the prompt ("Vokari has color teal.
Vokari color?": answerable without a tool, `meta["eval_group"] = "no_search"`), the others
only with a search (`"needs_search"`). Held-out questions are about entities no training
question names (the last fifth of the world), so what RL teaches is when to search and how
to read a result, not the facts.

The demonstrations come from an imperfect teacher, so RL has room (MMSearch-R1's setting,
miniature): it searches on `search_rate` of the answerable questions and on every other one,
and on `slip` of its searches it stops before reading the result and answers its favourite
value of the attribute (the first of `ATTRIBUTES`: "red", "cat"), right or not. The slip is
systematic, like `addition`'s forgotten carries: at the default 0.6 the favourite is the
most likely answer after SFT whatever the result says, so greedy decoding is mostly wrong
on searched questions, while sampling reads the result 40% of the time and RL can find
that reading pays. Departure from the
issue's "searches on every question": a teacher that never answers directly leaves RL no
sampled direct answer to reinforce (a tiny model copies it with near certainty), so the
default teacher answers directly on 20% of the answerable questions.

The demonstration's tool result is exactly what `tools.search.BM25Search` returns for the
teacher's query over this corpus (top-1; checked by the tests), so SFT and RL see the same
results. Answers are scored by a normalised match of the `<answer>` block.

kwargs: entities (world size, default 500), answerable (fraction of questions with the fact
in the prompt, 0.5), search_rate (0.8), slip (0.6), world_seed (0: the world; task.seed
draws the questions).
"""

from __future__ import annotations

import random

from longrl.data.example import Example

ATTRIBUTES = {
    "color": ["red", "blue", "green", "gold", "pink", "gray", "teal", "plum"],
    "pet": ["cat", "dog", "owl", "fox", "yak", "eel", "bat", "ant"],
}
_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()


def world(entities: int = 500, world_seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    """[(name, {attribute: value})]: distinct three-syllable names, attributes drawn uniformly."""
    rng = random.Random(f"facts-world:{world_seed}")
    names: list[str] = []
    seen = set()
    while len(names) < entities:
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(3)).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return [(n, {a: rng.choice(vals) for a, vals in ATTRIBUTES.items()}) for n in names]


def fact(name: str, attribute: str, value: str) -> str:
    return f"{name} has {attribute} {value}."


def corpus(entities: int = 500, world_seed: int = 0, **_unused) -> list[str]:
    """The search corpus: one document per (entity, attribute)."""
    return [fact(n, a, v) for n, attrs in world(entities, world_seed) for a, v in attrs.items()]


def facts(n: int, seed: int, *, split: str = "train", entities: int = 500, answerable: float = 0.5,
          search_rate: float = 0.8, slip: float = 0.6, world_seed: int = 0) -> list[Example]:
    """`n` questions about the `split`'s entities ('train': the first four fifths of the world,
    'eval': the last fifth), each with the teacher's demonstration."""
    for key, p in [("answerable", answerable), ("search_rate", search_rate), ("slip", slip)]:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{key}={p} must be a probability in [0, 1]")
    if entities < 10:
        raise ValueError(f"entities={entities} must be at least 10")
    w = world(entities, world_seed)
    cut = entities - entities // 5
    pool = w[:cut] if split == "train" else w[cut:]
    rng = random.Random(f"facts:{seed}:{split}")
    out = []
    for i in range(n):
        name, attrs = rng.choice(pool)
        attribute = rng.choice(sorted(attrs))
        value = attrs[attribute]
        in_prompt = rng.random() < answerable
        prompt = (f"{fact(name, attribute, value)} " if in_prompt else "") + f"{name} {attribute}?"
        # The teacher's choices on their own stream, so they never change the questions.
        t = random.Random(f"facts:{seed}:{split}:{i}:teacher")
        searches = not in_prompt or t.random() < search_rate
        if searches:
            shown = ATTRIBUTES[attribute][0] if t.random() < slip else value  # the favourite, unread
            solution = (f"<call>search: {name} {attribute}</call><result>{fact(name, attribute, value)}</result>"
                        f"<answer>{shown}</answer>")
        else:
            solution = f"<answer>{value}</answer>"
        out.append(Example(id=f"facts:{split}:{seed}:{i}", prompt=prompt, answer=value, solution=solution,
                           meta={"eval_group": "no_search" if in_prompt else "needs_search"}))
    return out


facts.split_aware = True  # the registry passes split="train" / "eval" (disjoint entities)
facts.corpus = corpus  # the task's documents for the search tool
