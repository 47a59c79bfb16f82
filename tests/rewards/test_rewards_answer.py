import pytest

from longrl.rewards.answer import (extract_answer, extract_auto, extract_boxed, extract_choice_letter,
                                  extract_last_number, format_reward)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>42</answer>", "42"),
        ("<think>x</think><answer>  7 \n</answer>", "7"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # last block wins
        ("<answer>a<answer>b</answer>", "b"),  # nearest opening tag before the last close
        ("<answer></answer>", ""),  # present but empty
        ("<answer>42", None),  # truncated: never closed
        ("42</answer>", None),  # no opening tag
        ("no tags at all", None),
        ("", None),
        ("<Answer>42</Answer>", None),  # tags are case-sensitive
        ("<answer>line1\nline2</answer>", "line1\nline2"),
        ("<answer>x</answer><answer>unclosed", "x"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>add 3 and 4</think><answer>7</answer>", 1.0),
        ("<answer>7</answer>", 1.0),
        ("  \n<think>a</think>\n<answer>7</answer>\n ", 1.0),  # surrounding/between whitespace
        ("<think></think><answer>7</answer>", 1.0),  # empty think is allowed
        ("<think>multi\nline</think><answer>a b</answer>", 1.0),
        ("So: <answer>7</answer>", 0.5),  # text before
        ("<answer>7</answer> done", 0.5),  # text after
        ("<think>a</think> hmm <answer>7</answer>", 0.5),  # text between blocks
        ("<answer>7</answer><answer>8</answer>", 0.5),  # two answers
        ("<think>a <answer>6</answer></think><answer>7</answer>", 0.5),  # tag inside think
        ("<think>a<answer>7</answer>", 0.5),  # unclosed think
        ("<answer>7</think></answer>", 0.5),  # stray tag inside the answer
        ("<answer>7</answer></think>", 0.5),
        ("<think>a</think><think>b</think><answer>7</answer>", 0.5),
        ("<answer>  </answer>", 0.0),  # empty answer
        ("<think>a</think><answer></answer>", 0.0),
        ("<think>a</think><answer>7", 0.0),  # truncated
        ("7", 0.0),
        ("", 0.0),
        ("<ANSWER>7</ANSWER>", 0.0),
    ],
)
def test_format_reward(text, expected):
    assert format_reward(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # rule 1: the whole text is one letter
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("b", "B"),
        ("(c)", "C"),
        ("[D]", "D"),
        ("**C**", "C"),
        (" E \n", "E"),
        ("B)", "B"),
        # rule 2: explicit markers, the last one wins
        ("Answer: B", "B"),
        ("The answer is B) blue", "B"),
        ("The answer is: **B**", "B"),
        ("Final Answer: [C]", "C"),
        ("The correct option is (C).", "C"),
        ("my choice would be option E", "E"),
        ("\\boxed{D}", "D"),
        ("\\boxed{\\text{A}}", "A"),
        ("B is correct because the sky is blue", "B"),
        ("The answer is A because cats purr", "A"),
        ("A cat is on the mat. Answer: D", "D"),  # article ignored, explicit marker used
        ("I first thought the answer is A, but the final answer is C.", "C"),
        ("The answer is A or B. Final answer: C", "C"),
        ("The answer is A or B", None),  # every marker hedged
        ("Answer: A/B", None),
        ("Answer: Apple", None),  # A starts a word, not a choice
        # rule 3: a leading letter with punctuation
        ("C. a cat", "C"),
        ("(C) a cat on the mat", "C"),
        ("D: because it is red", "D"),
        # rule 4: bracketed letters that agree
        ("I think (B) fits best", "B"),
        ("Options (A) red (B) blue", None),  # listing options commits to nothing
        ("(B) ... yes, (B)", "B"),
        # rule 5: stand-alone capitals that agree; articles are words
        ("A cat is on the mat, so B", "B"),
        ("It is B.", "B"),
        ("It's B", "B"),
        ("A cat is on the mat.", None),
        ("A and B", None),
        ("Between A and B I pick B", None),
        ("B C", None),
        # no letter
        ("F", None),
        ("3D printing", None),
        ("", None),
        ("   ", None),
        ("answer: e", None),  # lowercase only in rule 1
        # an <answer> block is read on its own
        ("<think>A or C, maybe (D)</think><answer>(C)</answer>", "C"),
        ("<answer>The answer is E.</answer>", "E"),
    ],
)
def test_extract_choice_letter(text, expected):
    assert extract_choice_letter(text) == expected


def test_extract_choice_letter_custom_letters():
    letters = "ABCDEFGHIJ"
    assert extract_choice_letter("F", letters) == "F"
    assert extract_choice_letter("Answer: J", letters) == "J"
    assert extract_choice_letter("I think it's J", letters) == "J"  # pronoun I is a word
    assert extract_choice_letter("I think the answer is I", letters) == "I"
    assert extract_choice_letter("E", "ABCD") is None
    assert extract_choice_letter("Answer: E", "ABCD") is None


# ----------------------------------------------------------------------------------------
# Answers without tags (reward.extract). Each expected value is read off the text by hand.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the sum is \\boxed{7}.", "7"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces kept whole
        ("\\boxed{ {a}{b} }", "{a}{b}"),
        ("first \\boxed{3}, corrected: \\boxed{4}", "4"),  # the last box wins
        ("\\boxed{3} then \\boxed{\\frac{1}{", "3"),  # an unclosed last box is skipped
        ("\\boxed {12}", "12"),  # TeX allows a space before the brace
        ("\\fbox{x=2}", "x=2"),
        ("\\boxed{}", ""),  # present but empty
        ("boxed{7}", None),  # no backslash: prose, not a box
        ("the answer is 7", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 21.", "21"),  # trailing period is not a decimal point
        ("4 - 1 = 3, so 3 + 10 = 13", "13"),  # several numbers: the last
        ("5-3=2", "2"),
        ("The result is 5-3", "3"),  # minus after a digit is an operator
        ("The answer is -3.", "-3"),  # minus after a space is a sign
        ("= \u22127", "-7"),  # Unicode minus
        ("about 3.25 litres", "3.25"),
        ("1,000 apples", "1,000"),
        ("1,2,3", "3"),  # a list, not thousands groups
        ("it is 3/4", "3/4"),
        ("step2 is done", None),  # glued to a word: not a number
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>3+4</think><answer>7</answer>", "7"),  # tagged: the block
        ("<think>2+2=\\boxed{4}</think><answer>5</answer>", "5"),  # tags win over a box
        ("<answer>4", None),  # opened and cut off: not re-read as a box or a number
        ("<think>3+4=7</think> \\boxed{7", None),
        ("so \\boxed{\\frac{2}{3}}", "\\frac{2}{3}"),  # no tags: the box
        ("The answer is 7.", None),  # no tags, no box: no guessed number
    ],
)
def test_extract_auto(text, expected):
    assert extract_auto(text) == expected
