"""Reading a model response: the final answer, the format reward, a multiple-choice letter.

longrl responses follow the R1-style template `<think>...</think><answer>...</answer>`
(the think block optional), as in DeepSeek-R1 (arXiv 2501.12948) and LongVILA-R1
(arXiv 2507.07966). Tags are matched exactly and case-sensitively: `<Answer>` is not an
answer tag, so a model is only rewarded for the template it is trained to produce.

Instruct checkpoints rarely write the tags (SmolLM2-135M-Instruct: 1 of 128 samples, issue
16), so the answer a verifier reads can also be taken without them (`reward.extract`; the
modes by name in `rewards.verifiers.EXTRACTORS`): the last `\\boxed{...}` (the convention of
math-tuned models), or the last number in the response (math_verify's own extraction lives
beside its verifier). The format reward always reads the tags.

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


# ----------------------------------------------------------------------------------------
# Answers without tags (`reward.extract`).
# ----------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number not glued to a word or a decimal point before it: "x2" holds none, "5-3" ends in
# "3" (a minus right after a digit is an operator, not a sign), "-3." is "-3". Thousands
# groups ("1,000"), decimals and a plain fraction ("3/4") are kept whole.
_NUMBER = re.compile(r"(?<![\w.])(?:(?<![\w)\]])[-\u2212])?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), stripped; else None.

    Braces nest: `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`. A box whose braces never
    close (a truncated response) is skipped, as an unclosed answer block is.
    """
    for m in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[m.end():i].strip()
    return None


def extract_last_number(text: str) -> str | None:
    """The last number written in the response ("so 3 + 4 = 7." -> "7"), as written
    (a Unicode minus becomes "-"); None when there is none."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace("\u2212", "-") if numbers else None


def extract_auto(text: str) -> str | None:
    """The tags when the response has an answer tag, otherwise a `\\boxed{}` answer.

    Why boxed and not the last number: a box, like the tags, is the model committing to an
    answer, and math-tuned instruct models write it unasked. The last number is a guess
    (it credits a list of numbers, or a truncated chain of thought whose last partial
    result happens to be right), so it is only used when asked for. A response that opened
    `<answer>` and was cut off is not re-read as something else: it scores 0, as before.
    The built-in tiny model is taught the tags, so for it this is `tags`.
    """
    if _ANSWER_OPEN in text or _ANSWER_CLOSE in text:
        return extract_answer(text)
    return extract_boxed(text)


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
