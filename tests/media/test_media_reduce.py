"""Differential token dropping (media/reduce.py) on hand-made token grids."""

import math

import pytest
import torch

from longrl.media.reduce import METHODS, reduce_video_tokens


def unit(deg: float) -> list[float]:
    """A 2-d unit vector at `deg` degrees: cosine distance between two is 1 - cos(angle)."""
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def grid(angles: list[list[float]]) -> torch.Tensor:
    """[Tg][S] angles -> embeds [Tg*S, D=2] in (t, s) order."""
    return torch.tensor([unit(a) for row in angles for a in row])


def test_none_keeps_every_token():
    embeds = torch.randn(3 * 4, 5)
    assert reduce_video_tokens(embeds, (3, 4, 4), "none").all()  # grid 3 x 4 x 4 merged 2x2: S = 4


def test_diff_drops_repeats_and_compares_with_the_last_kept_token():
    # Two patches over five steps. Patch 0 drifts 10 degrees a step (cos distance of 10 deg
    # = 0.0152, of 20 deg = 0.0603); patch 1 is still, then jumps 90 degrees at step 3.
    embeds = grid([[0, 0], [10, 0], [20, 0], [30, 90], [40, 90]])
    keep = reduce_video_tokens(embeds, (5, 2, 4), "diff", threshold=0.05).view(5, 2)
    # Patch 0: step 1 is 10 deg from the kept step 0 (dropped), step 2 is 20 deg from it
    # (kept), step 3 10 deg from step 2 (dropped), step 4 20 deg from step 2 (kept). Against
    # the previous frame every step would be 10 deg away and dropped forever.
    assert keep[:, 0].tolist() == [True, False, True, False, True]
    assert keep[:, 1].tolist() == [True, False, False, True, False]


def test_diff_threshold_zero_drops_only_exact_repeats():
    embeds = grid([[0, 5], [0, 5.5], [0, 5.5]])
    keep = reduce_video_tokens(embeds, (3, 2, 4), "diff", threshold=0.0).view(3, 2)
    assert keep.tolist() == [[True, True], [False, True], [False, False]]


def test_the_first_step_is_always_kept_and_the_order_is_the_tokens_own():
    embeds = torch.randn(1, 4, 8).expand(6, 4, 8).reshape(24, 8)  # six identical steps of 4 tokens
    keep = reduce_video_tokens(embeds, torch.tensor([6, 4, 4]), "diff", threshold=0.01)
    assert keep.tolist() == [True] * 4 + [False] * 20


def test_bad_method_or_grid_is_refused():
    with pytest.raises(ValueError, match="unknown token reduction"):
        reduce_video_tokens(torch.randn(8, 2), (2, 4, 4), "query")
    with pytest.raises(ValueError, match="do not fill the grid"):
        reduce_video_tokens(torch.randn(7, 2), (2, 4, 4), "diff")
    assert {"none", "diff"} <= set(METHODS)


# ---- the keep floor (min_keep) --------------------------------------------------------------


def test_the_floor_puts_every_other_step_of_a_still_patch_back():
    from longrl.media.reduce import keep_at_least

    keep = torch.zeros(16, 1, dtype=torch.bool)
    keep[0] = True  # the threshold kept the first step only
    out = keep_at_least(keep, 0.5)  # the middle of the unseen run 1..15 (8), then of 1..7 and 9..15, ...
    assert out[:, 0].nonzero().view(-1).tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert torch.equal(keep_at_least(keep, 0.0), keep) and bool(keep_at_least(keep, 1.0).all())


def _longest_unseen(keep: torch.Tensor) -> int:
    best = 0
    for s in range(keep.shape[1]):
        run = 0
        for t in range(keep.shape[0]):
            run = 0 if keep[t, s] else run + 1
            best = max(best, run)
    return best


def test_the_floor_splits_the_longest_unseen_runs_first_and_never_drops_a_kept_token():
    from longrl.media.reduce import keep_at_least

    keep = torch.zeros(4, 2, dtype=torch.bool)
    keep[0] = True
    assert keep_at_least(keep, 0.5).tolist() == [[True, True], [False, False], [True, True], [False, False]]
    rich = torch.tensor([[True, True], [True, False], [True, False], [True, False]])  # 5 of 8 kept already
    assert torch.equal(keep_at_least(rich, 0.5), rich)
    changing = torch.tensor([[True, True], [True, False], [True, False], [False, False], [False, False],
                             [False, False], [False, False], [False, False]])  # patch 1 unseen for 7 steps
    out = keep_at_least(changing, 0.5)  # 4 more: the middles of 1..7 (patch 1), 3..7 (patch 0), 1..3, 5..7
    assert out[:, 1].tolist() == [True, False, True, False, True, False, True, False]
    assert out[:, 0].tolist() == [True, True, True, False, False, True, False, False]
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        k = torch.rand(9, 5, generator=gen) < 0.2
        for f in (0.1, 0.37, 0.5, 0.9):
            o = keep_at_least(k, f)
            assert bool(o[k].all()) and int(o.sum()) == max(int(k.sum()), math.ceil(f * 45 - 1e-9))
            assert _longest_unseen(o) <= _longest_unseen(k)


def test_reduce_video_tokens_keeps_at_least_the_floor_and_checks_it():
    from longrl.media.reduce import reduce_video_tokens

    still = torch.randn(1, 4, 8).expand(8, 4, 8).reshape(32, 8)  # 8 steps of 4 identical patches
    assert int(reduce_video_tokens(still, (8, 4, 4), "diff", 0.05).sum()) == 4  # the first step only
    assert int(reduce_video_tokens(still, (8, 4, 4), "diff", 0.05, min_keep=0.5).sum()) == 16
    with pytest.raises(ValueError, match="min_keep"):
        reduce_video_tokens(still, (8, 4, 4), "diff", 0.05, min_keep=1.5)
