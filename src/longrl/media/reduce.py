"""Video token reduction: drop the tokens of a patch that has not changed since it was last seen.

TimeChat-Online (arXiv 2504.17343) observes that about 80% of the visual tokens of streaming
video are redundant and drops them with its Differential Token Drop (DTD): a token whose
vision feature barely differs from the same spatial patch in the previous frame is removed,
and the tokens that stay keep their original (time, height, width) positions, so the
language model sees a shorter sequence that still knows when and where each token was.

This module decides WHICH tokens stay (pure tensor code, no model): `reduce_video_tokens`
returns a keep mask over a video's merged tokens. `models.vlm.reduce_video` applies it to a
`VideoEmbeds` and `models.vlm.mrope_position_ids` gives the kept tokens their positions in
the unreduced sequence.

Letters: Tg temporal grid steps (a pair of frames each in Qwen2.5-VL), S merged tokens per
step (= H/patch/merge * W/patch/merge), Nv = Tg*S video tokens, D hidden.

Departures from TimeChat-Online:
- A token is compared with the last KEPT token of its patch, not with the previous frame.
  Against the previous frame, a slow change (a drift of less than the threshold per
  frame) is dropped forever while the patch drifts arbitrarily far from what the model
  last saw; against the last kept token every dropped token is within `threshold` of a
  token the model does see at the same place.
- The distance is the cosine distance 1 - cos(e, ref) of the merged tokens the language
  model receives (after the merger), not of the ViT's patch features; the first temporal
  step is always kept whole.
- The unit is the merged token of one temporal step (2 frames in Qwen2.5-VL), since that is
  the smallest thing the language model sees.
- Proportional attention (`video.proportional_attention`, on by default with a reduction;
  from ToMe, arXiv 2210.09461): each kept token stands for itself and the dropped tokens of
  its patch that follow it (`token_counts`), and its attention logit as a key gets
  + log(count), so a query gives a patch about the attention mass its unreduced copies had
  (exactly so for identical copies at one position: tested on a 1-layer model). Why: on the
  tiny example model at 32 frames the threshold alone kept 26% of the tokens and RL reached
  the unreduced runs' accuracy on none of 2 seeds (a still shape shown once competed with
  the text as one token where the unreduced video had many copies); with proportional
  attention the same 27% kept the unreduced gain within seed noise (BENCHMARKS.md).
- An optional refresh (`max_unseen`, `video.max_unseen`, default 0 = off): a patch dropped
  for `max_unseen` steps in a row is kept at the next step whatever the threshold says, like
  a codec's periodic keyframe (`refresh`). It was the first remedy tried for the lost gain
  (58% kept at 1: the unreduced accuracy on 2 of 3 seeds); proportional attention does
  better at half the tokens.
- The query-aware budget of QuoTA (arXiv 2503.08689) is not implemented; methods are
  registered by name (`METHODS`) so one can be added without touching the callers.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

METHODS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {}
"""Reduction method name -> fn(tokens [Tg, S, D], threshold) -> keep [Tg, S] bool."""


def register(name: str):
    def wrap(fn):
        METHODS[name] = fn
        return fn

    return wrap


@register("none")
def keep_all(tokens: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every token stays (today's behaviour)."""
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # [Tg, S]


@register("diff")
def keep_changed(tokens: torch.Tensor, threshold: float) -> torch.Tensor:
    """Differential dropping: keep a token when its cosine distance to the last kept token
    of the same patch exceeds `threshold`. -> keep [Tg, S] bool (step 0 all True)."""
    x = tokens.detach().float()  # [Tg, S, D]; the decision is a constant, never differentiated
    keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # [Tg, S]
    ref = x[0].clone()  # [S, D] last kept token of each patch
    for t in range(1, x.shape[0]):  # sequential: each step's reference depends on the last decision
        dist = 1.0 - F.cosine_similarity(x[t], ref, dim=-1, eps=1e-12)  # [S]
        keep[t] = (dist > threshold) & (x[t] != ref).any(-1)  # an exact repeat is dropped despite rounding
        ref[keep[t]] = x[t][keep[t]]
    return keep


def refresh(keep: torch.Tensor, max_unseen: int) -> torch.Tensor:
    """keep [Tg, S] with a patch kept at every step that would make it unseen for more than
    `max_unseen` steps in a row (0: unchanged). Applied after the method's own decision,
    whose references are not moved by it."""
    if max_unseen <= 0:
        return keep
    out = keep.clone()
    run = torch.zeros(keep.shape[1], dtype=torch.long, device=keep.device)  # [S] steps unseen so far
    for t in range(keep.shape[0]):
        run = torch.where(out[t], torch.zeros_like(run), run + 1)
        over = run > max_unseen
        out[t] |= over
        run[over] = 0
    return out


def token_counts(keep: torch.Tensor, grid_thw, merge: int = 2) -> torch.Tensor:
    """How many of the unreduced video's tokens each kept token stands for: itself and the
    dropped tokens of its patch after it, up to the patch's next kept token (tokens dropped
    before a patch's first kept one count towards that one). keep [Nv] bool -> [Nk] float,
    in the kept tokens' order; the counts sum to Nv."""
    t, h, w = (int(v) for v in grid_thw)
    S = (h // merge) * (w // merge)
    k = keep.view(t, S)  # [Tg, S]
    if not bool(k.any(0).all()):
        raise ValueError("every patch must keep at least one token")
    group = (k.long().cumsum(0) - 1).clamp(min=0)  # [Tg, S] which kept token of its patch each belongs to
    sizes = torch.zeros(t, S, dtype=torch.float32, device=keep.device).scatter_add_(
        0, group, torch.ones(t, S, dtype=torch.float32, device=keep.device))  # [Tg, S]: row g = group g's size
    return sizes.gather(0, group)[k]  # [Nk]


def reduce_video_tokens(embeds: torch.Tensor, grid_thw, method: str = "diff", threshold: float = 0.05,
                        merge: int = 2, max_unseen: int = 0) -> torch.Tensor:
    """Which of a video's merged tokens stay. -> keep [Nv] bool, in the tokens' own order.

    `embeds` [Nv, D]: the vision tower's output for one video, ordered (t, h-block, w-block)
    as Qwen2.5-VL's merger emits it; `grid_thw` (T, H, W) its patch grid before merging
    (`VideoEmbeds.grid_thw`); `merge` the spatial merge size. `method` is a name in
    `METHODS` ('none' keeps all, 'diff' the differential dropping above, at cosine
    distance `threshold`); with `max_unseen` > 0 no patch is dropped for more than that many
    steps in a row (`refresh`).
    Deterministic in its inputs, so rollouts, training passes and the embedding cache all
    see the same reduced sequence.
    """
    if method not in METHODS:
        raise ValueError(f"unknown token reduction {method!r}; choose from {sorted(METHODS)}")
    t, h, w = (int(v) for v in grid_thw)
    S = (h // merge) * (w // merge)
    if embeds.shape[0] != t * S:
        raise ValueError(f"{embeds.shape[0]} tokens do not fill the grid {t}x{h}x{w} merged by {merge}")
    if max_unseen < 0:
        raise ValueError(f"max_unseen={max_unseen} must be >= 0 (0: no limit)")
    keep = METHODS[method](embeds.view(t, S, -1), float(threshold))  # [Tg, S]
    return refresh(keep, int(max_unseen)).reshape(-1)
