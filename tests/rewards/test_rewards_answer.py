import pytest

from longrl.rewards.answer import extract_answer, extract_choice_letter, format_reward


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
