"""Reading a model response: the final answer, the format reward, a multiple-choice letter.

longrl responses follow the R1-style template `<think>...</think><answer>...</answer>`
(the think block optional), as in DeepSeek-R1 (arXiv 2501.12948) and LongVILA-R1
(arXiv 2507.07966). Tags are matched exactly and case-sensitively: `<Answer>` is not an
answer tag, so a model is only rewarded for the template it is trained to produce.

Departures from the papers: the format reward has a middle level (0.5) for responses
that hold a complete answer block inside a broken template, so a small model starting
from scratch gets a gradient toward the template before it masters it.
"""

from __future__ import annotations

import functools
import re

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (_THINK_OPEN, _THINK_CLOSE, _ANSWER_OPEN, _ANSWER_CLOSE)

# Whole response: optional think block, optional whitespace, one answer block.
_TEMPLATE = re.compile(r"(?:<think>(?P<think>.*?)</think>\s*)?<answer>(?P<answer>.*?)</answer>", re.S)


def extract_answer(text: str) -> str | None:
    """Content of the last complete `<answer>...</answer>` block, stripped; else None.

    "Last" means the block closed by the last `</answer>`, opened by the nearest
    `<answer>` before it, so `<answer>a<answer>b</answer>` gives "b". An unclosed block
    (a truncated response) gives None: a cut-off answer earns nothing. An empty block
    gives "" (present but empty), which every verifier scores 0.
    """
    end = text.rfind(_ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(_ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(_ANSWER_OPEN) : end].strip()


def format_reward(text: str) -> float:
    """1.0 for a clean template, 0.5 for an answer inside a broken one, else 0.0.

    - 1.0: after stripping surrounding whitespace the response is exactly
      `<think>X</think><answer>Y</answer>` or `<answer>Y</answer>`, with optional
      whitespace between the two blocks, Y non-empty after stripping, and no tag
      (`<think>`, `</think>`, `<answer>`, `</answer>`) inside X or Y. X may be empty.
    - 0.5: not the above, but `extract_answer` finds a non-empty answer (text before or
      after the blocks, repeated blocks, a stray tag, a missing `</think>` ...).
    - 0.0: no complete non-empty answer block.
    """
    m = _TEMPLATE.fullmatch(text.strip())
    if m is not None:
        think, answer = m.group("think") or "", m.group("answer")
        if answer.strip() and not _has_tag(think) and not _has_tag(answer):
            return 1.0
    return 0.5 if extract_answer(text) else 0.0


def _has_tag(s: str) -> bool:
    return any(tag in s for tag in _TAGS)


# ----------------------------------------------------------------------------------------
# Multiple-choice letters.
# ----------------------------------------------------------------------------------------


def extract_choice_letter(text: str, letters: str = "ABCDE") -> str | None:
    """The option letter a response commits to, or None when it commits to none or to several.

    If the text holds an `<answer>` block only its content is read. Markdown emphasis
    (`*`, `_`) is removed first. Then the first rule below that yields a letter wins:

    1. The whole text is one letter, upper or lower case, with optional brackets or a
       trailing `.`/`:`/`)`: "B", "(b)", "B.", "**C**", "[D]".
    2. An explicit marker, last occurrence wins: "answer is B", "Answer: B",
       "The answer is B) blue", "correct option is (C)", "choice D", "\\boxed{E}",
       "B is correct". A hedge right after it ("A or B", "A/B", "A and B") disqualifies
       that marker; if every marker is hedged the answer is None.
    3. A leading letter followed by `.`, `)`, `]` or `:`: "C. a cat", "(C) a cat".
    4. Bracketed letters anywhere, "(B)" / "[B]", if they all name the same letter.
    5. Stand-alone capital letters anywhere, if they all name the same letter; a letter
       followed by a space and a lowercase word (other than "or"/"and"/"nor") is read as
       a word, not a choice, so the article in "A cat is on the mat, so B" (or a pronoun
       "I" when `letters` reaches I) does not count.

    Rules 4-5 refuse to guess when several letters appear, so listing every option never
    earns credit. Lower case is accepted only in rule 1 (a bare "b" is unambiguous; a
    lowercase "a" in prose is not).
    """
    block = extract_answer(text)
    s = (block if block is not None else text).replace("*", "").replace("_", "").strip()
    if not s:
        return None
    rx = _choice_patterns(letters)

    m = rx["bare"].fullmatch(s)
    if m:
        return m.group(1).upper()
    markers = list(rx["marker"].finditer(s))
    for m in reversed(markers):
        if not rx["hedge"].match(s, m.end()):
            return next(g for g in m.groups() if g)
    if markers:
        return None  # every explicit answer hedges between letters
    m = rx["leading"].match(s)
    if m:
        return m.group(1)
    bracketed = {m.group(1) for m in rx["bracketed"].finditer(s)}
    if len(bracketed) == 1:
        return bracketed.pop()
    if bracketed:
        return None
    standalone = {m.group(1) for m in rx["standalone"].finditer(s)}
    return standalone.pop() if len(standalone) == 1 else None


@functools.lru_cache(maxsize=16)
def _choice_patterns(letters: str) -> dict[str, re.Pattern]:
    L = "[" + re.escape(letters) + "]"
    Lc = "[" + re.escape(letters + letters.lower()) + "]"
    end = r"(?![A-Za-z0-9'])"  # the letter is a whole token, not the start of a word
    keyword = r"(?i:(?:final\s+)?answer|option|choice)"
    marker = (
        rf"{keyword}\s*(?:(?i:is|would\s+be|should\s+be)\s*)?[:=\-]?\s*"
        rf"(?:(?i:option|choice)\s*)?[\(\[]?\s*({L}){end}"
        rf"|\\boxed\{{\s*(?:\\text\{{)?\s*({L})\s*\}}"
        rf"|(?<![A-Za-z0-9])[\(\[]?({L})[\)\]]?\s+is\s+(?i:the\s+)?(?i:correct|right|best|answer)"
    )
    return {
        "bare": re.compile(rf"[\(\[]?\s*({Lc})\s*[\)\]]?[.:)]?"),
        "marker": re.compile(marker),
        "hedge": re.compile(rf"[\)\]]?\s*(?:(?i:or|and)\s+|/\s*|,\s*)[\(\[]?{L}{end}"),
        "leading": re.compile(rf"[\(\[]?({L})[\)\]\.:]"),
        "bracketed": re.compile(rf"[\(\[]({L})[\)\]]"),
        "standalone": re.compile(rf"(?<![A-Za-z0-9'])({L}){end}(?!\s+(?!(?:or|and|nor)\b)[a-z])"),
    }
