"""Ulysses for the Qwen2.5-VL language model on cached video embeddings (MR-SP stage 2).

"Scaling RL to Long Videos" (LongVILA-R1, arXiv 2507.07966, §4): after the video is
encoded once (stage 1, `mrsp_encode.mrsp_encode_video`), each rank of a
sequence-parallel group runs the language model on its T/P slice of every
sequence, with all-to-all around attention (`ulysses.py`). These are the SP twins
of `models.vlm.video_logprobs` and `video_loss_and_backward`:

    full rows:  inputs_embeds [B, T, D] (video pads replaced by the embeddings)
                multimodal rotary positions [3, B, T] (the model's own get_rope_index)
    rank r:     both sliced to [B, L, D] / [3, B, L], L = ceil(T / P); the body runs
                sharded, the chunked head on the slice, log-probs all-gathered -> [B, T]

Departures: the embeddings and positions of the whole rows are built on every rank
(cheap next to the layers; get_rope_index needs whole rows), and padding at the
end of a row takes position 0 (causal attention keeps real tokens from seeing it).

Gradients: a rank back-propagates only through its own positions, into the model
parameters and into `video.embeds`; sum both over the group (parameters with
`dist.all_reduce_gradients`; a trainable tower encoded with `mrsp_encode_video`
sums the embedding gradient in its own backward).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from longrl.models.vlm import VideoEmbeds, key_bias_columns, mrope_position_ids, video_inputs_embeds
from longrl.parallel.ulysses import enable_ulysses, gather_sequence, shard_batch, shard_for_sp, sp_body_loss_and_backward
from longrl.streambp.logprobs import LossFn, TokenBatch, chunked_logprobs, lm_head_params


def _video_shard(model, videos, batch: TokenBatch, group):
    """This rank's (TokenBatch shard, inputs_embeds [B, L, D], positions [3, B, L], key_bias).
    `videos`: one VideoEmbeds for every row, or a list with each row's own. `key_bias`: None,
    or with proportional attention (videos with a key bias) [B, P*L] over the whole padded
    rows, which Ulysses' attention adds after its all-to-all (`models.key_bias`)."""
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    B, T = batch.input_ids.shape
    per_row = [videos] * B if isinstance(videos, VideoEmbeds) else list(videos)
    if len(per_row) != B:
        raise ValueError(f"{len(per_row)} videos for {B} rows")
    if isinstance(videos, VideoEmbeds):
        positions = mrope_position_ids(model, batch.input_ids, videos)  # [3, B, T]
        embeds = video_inputs_embeds(model, batch.input_ids, videos)  # [B, T, D]
    else:
        rows = [batch.input_ids[i : i + 1] for i in range(B)]
        positions = torch.cat([mrope_position_ids(model, r, v) for r, v in zip(rows, per_row)], dim=1)  # [3, B, T]
        embeds = torch.cat([video_inputs_embeds(model, r, v) for r, v in zip(rows, per_row)])  # [B, T, D]
    key_bias = None
    if any(getattr(v, "key_bias", None) is not None for v in per_row):
        bias = torch.zeros(B, -(-T // P) * P, device=embeds.device, dtype=embeds.dtype)  # [B, P*L]; padding: none
        for i, v in enumerate(per_row):
            b = key_bias_columns(model, batch.input_ids[i : i + 1], v)
            if b is not None:
                bias[i, :T] = b[0]
        key_bias = bias
    shard, _ = shard_batch(batch, rank, P)
    pos = shard_for_sp(positions.permute(1, 2, 0), rank, P).permute(2, 0, 1).contiguous()  # [3, B, L]
    return shard, shard_for_sp(embeds, rank, P), pos, key_bias


def _language_model(model, embeds, positions, key_bias=None):  # [B, L, D], [3, B, L] -> [B, L, D]
    kwargs = {} if key_bias is None else {"key_bias": key_bias}  # read by Ulysses' attention
    return model.model.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False,
                                      **kwargs).last_hidden_state


@torch.no_grad()
def sp_video_logprobs(model, videos, batch: TokenBatch, group=None, chunk: int = 256,
                      temperature: float = 1.0) -> torch.Tensor:
    """`models.vlm.video_logprobs`, sequence-parallel: every rank of the group passes the same
    rows and videos (one for all rows, or one per row) and gets the full [B, T] log-probs
    (0 where unmasked)."""
    T = batch.input_ids.shape[1]
    shard, embeds, positions, mask = _video_shard(model, videos, batch, group)
    with enable_ulysses(model, group):
        hidden = _language_model(model, embeds, positions, mask)  # [B, L, D]
    weight, bias = lm_head_params(model)
    logp = chunked_logprobs(hidden, weight, bias, shard.targets, shard.mask, chunk, temperature)  # [B, L]
    return gather_sequence(logp, group)[:, :T]  # [B, T]


def sp_video_loss_and_backward(model, videos, batch: TokenBatch, loss_fn: LossFn, group=None, *,
                               chunk: int = 256, temperature: float = 1.0):
    """`models.vlm.video_loss_and_backward`, sequence-parallel; `videos` as in `sp_video_logprobs`
    (rows of several videos in one micro-batch share one loss). Gradients are this rank's share
    (see the module docstring). -> (loss, metrics, logprobs [B, T]), the same on every rank."""
    T = batch.input_ids.shape[1]
    shard, embeds, positions, mask = _video_shard(model, videos, batch, group)
    return sp_body_loss_and_backward(model, lambda: _language_model(model, embeds, positions, mask), shard, T, loss_fn,
                                     group, chunk=chunk, temperature=temperature)
