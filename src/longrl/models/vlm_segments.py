"""Rows that hold several videos: the prompt's video and the segments a tool spliced in.

The `video_frames` tool (`tools/video_frames.py`) answers a call with a video mark whose pad
tokens stand for a segment's embeddings (encoded once, `policy/video.py`). A row then holds
the prompt's video and one or more segments, each at a known column. `VideoSequence` is
that layout; it gives the row's token embeddings with every video spliced in and its
M-RoPE positions from the model's own `get_rope_index`, which numbers several videos in
order when given one grid per video (the same numbers as the model's ordinary forward with
`pixel_values_videos` for all of them; tested).

The columns are explicit, not "the first n pad tokens": a policy can sample the pad token
itself in its own turn, and such a token is ordinary text here, in rollouts and training
passes alike.

Letters: B rows, T sequence length, D hidden.

Departures: reduced videos (`video.token_reduction`) are not combined with segments (refused
in config); every row of one call to these functions shares one layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longrl.models.vlm import VideoEmbeds


@dataclass
class VideoSequence:
    """Videos of one row in order, each with the column of its first token."""

    videos: list[VideoEmbeds]
    starts: list[int]

    def __post_init__(self):
        if any(v.keep is not None for v in self.videos):
            raise ValueError("a row with several videos cannot hold a reduced video (video.token_reduction=none)")
        ends = [s + v.n_tokens for s, v in zip(self.starts, self.videos)]
        if any(e > s for e, s in zip(ends, self.starts[1:])):
            raise ValueError(f"videos overlap: starts {self.starts}, ends {ends}")

    @property
    def n_tokens(self) -> int:
        return sum(v.n_tokens for v in self.videos)

    @property
    def embeds(self) -> torch.Tensor:
        """Every video's embeddings in column order. [Nv, D]"""
        return torch.cat([v.embeds for v in self.videos])

    def detached(self) -> "VideoSequence":
        return VideoSequence([v.detached() for v in self.videos], list(self.starts))

    def video_mask(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: the videos' columns (which must hold the video pad token)."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for s, v in zip(self.starts, self.videos):
            mask[:, s : s + v.n_tokens] = True
        if mask.sum(1).max() > 0 and not bool((input_ids[mask] == model.config.video_token_id).all()):
            raise ValueError(f"a video's columns (starts {self.starts}) do not all hold {model.config.video_token_id}")
        if int(mask[0].sum()) != self.n_tokens:
            raise ValueError(f"rows of {input_ids.shape[1]} tokens cannot hold videos at {self.starts}")
        return mask

    def inputs_embeds(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, D] with every video's embeddings at its columns."""
        emb = model.get_input_embeddings()(input_ids)  # [B, T, D]
        fill = self.embeds.to(emb.dtype)  # [Nv, D] in column order
        return emb.masked_scatter(self.video_mask(model, input_ids)[..., None], fill.repeat(input_ids.shape[0], 1))

    def positions(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """M-RoPE positions [3, B, T]: `get_rope_index` with one grid per video, in order."""
        B = input_ids.shape[0]
        types = self.video_mask(model, input_ids).int() * 2  # [B, T]; 2 = video
        grids = torch.stack([v.grid_thw.view(3) for v in self.videos])  # [n, 3]
        spg = torch.tensor([v.second_per_grid for v in self.videos], dtype=torch.float64)  # [n]
        positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=types,
                                                  video_grid_thw=grids.repeat(B, 1), second_per_grid_ts=spg.repeat(B))
        return positions  # [3, B, T]


def rows_hidden(model, rows: list[VideoSequence], prompt_ids: list[int], prompt_positions: torch.Tensor,
                input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced hidden states of rows [n, T] that share the prompt (its P ids, with the
    first video of every row) and hold their own segments after it: the prompt runs once
    (`vlm.shared_prompt_hidden`), each row's responses with its segments spliced in at their
    own M-RoPE positions. -> (prompt hidden [1, P, D], response hidden [n, T - P, D])"""
    from longrl.models.vlm import shared_prompt_hidden

    P = len(prompt_ids)
    embeds, positions = [], []
    for seq, ids in zip(rows, input_ids):
        ids = ids[None]  # [1, T]
        embeds.append(seq.inputs_embeds(model, ids)[0, P:])  # [T-P, D]
        positions.append(seq.positions(model, ids)[:, 0, P:])  # [3, T-P]
    return shared_prompt_hidden(model, rows[0].videos[0], prompt_ids, prompt_positions, input_ids[:, P:],
                                response_embeds=torch.stack(embeds), response_positions=torch.stack(positions, 1))
