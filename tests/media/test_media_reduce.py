"""Differential token dropping (media/reduce.py) on hand-made token grids."""

import math

import pytest
import torch

from longrl.media.reduce import METHODS, reduce_video_tokens, token_counts


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


# ---- the refresh (max_unseen) -------------------------------------------------------------


def _longest_unseen(keep: torch.Tensor) -> int:
    best = 0
    for s in range(keep.shape[1]):
        run = 0
        for t in range(keep.shape[0]):
            run = 0 if keep[t, s] else run + 1
            best = max(best, run)
    return best


def test_the_refresh_shows_a_still_patch_every_other_step():
    from longrl.media.reduce import refresh

    keep = torch.zeros(8, 1, dtype=torch.bool)
    keep[0] = True  # the threshold kept the first step only
    assert refresh(keep, 1)[:, 0].nonzero().view(-1).tolist() == [0, 2, 4, 6]
    assert refresh(keep, 2)[:, 0].nonzero().view(-1).tolist() == [0, 3, 6]
    assert torch.equal(refresh(keep, 0), keep)


def test_the_refresh_counts_from_the_last_kept_step_and_never_drops_a_kept_token():
    from longrl.media.reduce import refresh

    keep = torch.tensor([[True, True], [False, False], [True, False], [False, False], [False, False]])
    assert refresh(keep, 1).tolist() == [[True, True], [False, False], [True, True], [False, False],
                                         [True, True]]  # patch 0 counts from its step-2 token
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        k = torch.rand(12, 5, generator=gen) < 0.2
        k[0] = True
        for m in (1, 2, 3):
            o = refresh(k, m)
            assert bool(o[k].all()) and _longest_unseen(o) <= m
            assert torch.equal(refresh(o, m), o)  # nothing left to add


def test_reduce_video_tokens_applies_the_refresh_and_checks_it():
    from longrl.media.reduce import reduce_video_tokens

    still = torch.randn(1, 4, 8).expand(8, 4, 8).reshape(32, 8)  # 8 steps of 4 identical patches
    assert int(reduce_video_tokens(still, (8, 4, 4), "diff", 0.05).sum()) == 4  # the first step only
    assert int(reduce_video_tokens(still, (8, 4, 4), "diff", 0.05, max_unseen=1).sum()) == 16  # steps 0, 2, 4, 6
    with pytest.raises(ValueError, match="max_unseen"):
        reduce_video_tokens(still, (8, 4, 4), "diff", 0.05, max_unseen=-1)


def test_token_counts_give_each_kept_token_the_dropped_ones_after_it():
    """Grid 4 steps x 2 patches (merge 1): patch 0 kept at steps 0 and 2, patch 1 at step 0 only."""
    keep = torch.tensor([[True, True], [False, False], [True, False], [False, False]])  # [Tg, S]
    counts = token_counts(keep.reshape(-1), (4, 2, 1), merge=1)
    # kept tokens in (t, s) order: (0,0) stands for steps 0-1, (0,1) for 0-3, (2,0) for 2-3
    assert counts.tolist() == [2.0, 4.0, 2.0]
    assert counts.sum() == keep.numel()
    assert token_counts(torch.ones(6, dtype=torch.bool), (3, 2, 1), merge=1).tolist() == [1.0] * 6
    # tokens before a patch's first kept one count towards it
    late = torch.tensor([[True, False], [True, True]]).reshape(-1)
    assert token_counts(late, (2, 2, 1), merge=1).tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="at least one token"):
        token_counts(torch.tensor([True, False, True, False]), (2, 2, 1), merge=1)
