"""Which rule numbers a video prompt's rotary positions: the installed transformers' or vLLM's.

Qwen2.5-VL gives every token three rotary positions (time, height, width). Video tokens take
their grid coordinates, offset by the text before them. Two implementations disagree on the
text AFTER a video:

    transformers (>= 5.x, `get_rope_index`)  continues from the video's start plus a spatial
                                             extent (e.g. position 13 for the tiny test prompt)
    vLLM 0.32 (`get_mrope_input_positions`)  continues at 1 + the largest position so far, the
                                             original Qwen2.5-VL rule (18 for the same prompt)

and the time axis of both is grid step x seconds per step x `vision_config.tokens_per_second`
(floored): vLLM's embeddings input (`{"video_embeds", "video_grid_thw", "second_per_grid_ts"}`,
what MR-SP hands it: the vision tower has already run) takes the clip's real seconds per
step beside the embeddings (without it vLLM assumes 1 s). A policy trained under one
numbering and rolled out under the other samples
from a different distribution, and the gap would show up only as a large
`rollout/logprob_gap`.

So with `rollout.backend=vllm` the video policy numbers positions the way the engine does
(`set_numbering(model, "vllm")`): every teacher-forced pass, the native sampler and the
engine then agree, and the vLLM backend checks each request's positions against
`vllm_rope_index` before it sends it. The model learns vLLM's numbering, which is also the
numbering it is served with. Default ("transformers"): the model's own `get_rope_index`, so
the passes match its ordinary forward (tests/models/test_models_vlm.py).

The choice is kept in the model's config (`longrl_rope_numbering`), so a checkpoint's
config.json carries it: `longrl eval` of a model trained on vLLM numbers its prompts the way
it was trained whichever backend evaluates it.

Letters: B rows, T columns, Nv video tokens, (t, h, w) the merged grid.
"""

from __future__ import annotations

import torch

NUMBERINGS = ("transformers", "vllm")
CONFIG_KEY = "longrl_rope_numbering"
"""The config attribute (and config.json key) that holds a model's numbering."""


def set_numbering(model, numbering: str) -> None:
    """Choose the rule `models.vlm.mrope_position_ids` uses for this model; saved with its
    config (a LoRA or FSDP2 wrapper shares the base model's config object)."""
    if numbering not in NUMBERINGS:
        raise ValueError(f"rope numbering {numbering!r}: one of {NUMBERINGS}")
    setattr(model.config, CONFIG_KEY, numbering)


def numbering(model) -> str:
    return getattr(model.config, CONFIG_KEY, "transformers")


def merged_grid(config, grid_thw: torch.Tensor) -> tuple[int, int, int]:
    """The patch grid (T, H/patch, W/patch) -> the video tokens' grid (t, h, w) after merging
    (`config`: the Qwen2.5-VL model's config)."""
    merge = config.vision_config.spatial_merge_size
    t, h, w = (int(x) for x in grid_thw.view(3).tolist())
    return t, h // merge, w // merge


def video_grid_positions(t: int, h: int, w: int, tokens_per_second: float, second_per_grid: float = 1.0) -> torch.Tensor:
    """[3, t*h*w] positions of a video's tokens from their grid, before the text offset: time
    is the grid step times seconds-per-step times tokens-per-second, floored."""
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
    grid[0] = (grid[0].double() * (second_per_grid * tokens_per_second)).long()
    return grid


def vllm_rope_index(config, input_ids: torch.Tensor, video_mask: torch.Tensor, grid_thw: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, second_per_grid: float = 1.0) -> torch.Tensor:
    """Positions [3, B, T] by vLLM's rule for rows that hold one video at `video_mask` [B, T]
    (`config`: the model's config, for the merge size and tokens per second;
    `second_per_grid`: the seconds one temporal grid step spans, sent to the engine with the
    embeddings).

    Per row, over its attended columns: text before the video 0..k-1 on all three axes; the
    video's grid positions + k; text after from 1 + the largest position so far. Columns
    outside the attention mask get 1, as transformers gives them."""
    B, T = input_ids.shape
    tps = float(getattr(config.vision_config, "tokens_per_second", 1.0))
    grid = video_grid_positions(*merged_grid(config, grid_thw), tokens_per_second=tps,
                                second_per_grid=second_per_grid)  # [3, Nv]
    nv = grid.shape[1]
    out = torch.ones(3, B, T, dtype=torch.long)
    for b in range(B):
        cols = torch.arange(T) if attention_mask is None else attention_mask[b].bool().cpu().nonzero().view(-1)
        is_video = video_mask[b].cpu()[cols]  # over the attended columns
        k = int(is_video.int().argmax())
        if int(is_video.sum()) != nv or not bool(is_video[k : k + nv].all()):
            raise ValueError(f"row {b}: the video's {nv} tokens must be contiguous (as video_prompt_ids writes them)")
        after = len(cols) - k - nv
        start = int(grid.max()) + k + 1
        pos = torch.cat([torch.arange(k).expand(3, k), grid + k, torch.arange(start, start + after).expand(3, after)], 1)
        out[:, b, cols] = pos
    return out.to(input_ids.device)
