import pytest
import torch

from longrl.data.example import Example
from longrl.rewards.combine import score_responses
from longrl.rewards.verifiers import answer_scorer


def _examples(answers):
    return [Example(id=str(i), prompt="q", answer=a) for i, a in enumerate(answers)]


def test_hand_worked_rewards():
    responses = [
        "<think>3+4</think><answer>7</answer>",  # correct, clean: 1 * 1 + 0.1 * 1
        "<answer>8</answer>",  # wrong, clean: 0 + 0.1
        "so <answer>7</answer>",  # correct, messy: 1 + 0.05
        "7",  # no answer: 0
        "<answer>12</answer>",  # correct for the second example
    ]
    examples = _examples(["7", "7", "7", "7", "12"])
    reward, parts = score_responses(responses, examples, answer_scorer("exact"), 1.0, 0.1)
    assert reward.dtype == torch.float32 and reward.shape == (5,)
    torch.testing.assert_close(parts["correctness"], torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(parts["format"], torch.tensor([1.0, 1.0, 0.5, 0.0, 1.0]))
    torch.testing.assert_close(reward, torch.tensor([1.1, 0.1, 1.05, 0.0, 1.1]))
    assert set(parts) == {"correctness", "format"}


def test_weights_and_partial_credit_match_brute_force():
    import random

    rng = random.Random(0)
    texts = ["<answer>x</answer>", "x", "a <answer>x</answer>", "<think>t</think><answer>y</answer>"]
    responses = [rng.choice(texts) for _ in range(64)]
    examples = _examples([str(i) for i in range(64)])
    partial = {ex.id: rng.random() for ex in examples}

    def correctness_fn(text, ex):  # a task scorer with partial credit
        return partial[ex.id]

    fmt = {texts[0]: 1.0, texts[1]: 0.0, texts[2]: 0.5, texts[3]: 1.0}
    reward, parts = score_responses(responses, examples, correctness_fn, 0.7, 0.3)
    expected = [0.7 * partial[ex.id] + 0.3 * fmt[r] for r, ex in zip(responses, examples)]
    torch.testing.assert_close(reward, torch.tensor(expected, dtype=torch.float32))


def test_mismatched_lengths_and_bad_scores_raise():
    with pytest.raises(ValueError, match="2 responses but 1 examples"):
        score_responses(["a", "b"], _examples(["1"]), lambda t, e: 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="weights must be finite"):
        score_responses(["a"], _examples(["1"]), lambda t, e: 1.0, float("nan"), 0.0)


def test_empty_batch():
    reward, parts = score_responses([], [], lambda t, e: 1.0, 1.0, 1.0)
    assert reward.shape == (0,) and parts["format"].shape == (0,)
