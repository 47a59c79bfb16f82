"""MR-SP stage 1 across ranks: the frames of one video are encoded in parallel, gathered once.

"Scaling RL to Long Videos" (LongVILA-R1, arXiv 2507.07966, §4) splits the frames of
a long video over the ranks of a sequence-parallel group; each rank runs the vision
tower on its slice and the embeddings are all-gathered once, then reused by every
rollout and training pass of the step (`models/vlm.py` does the reuse on one rank).

    frames [F, ...] -> rank r: vision_fn(frames[slice_r]) -> [N_r, ...]
                    -> all-gather, rank order -> embeddings [N_0 + ... + N_{P-1}, ...] on every rank

`vision_fn` is any callable (a vision tower, or a tiny module in tests); frames are
split in whole `unit`s (Qwen2.5-VL merges 2 consecutive frames into one temporal
patch: unit = 2), contiguously, sizes differing by at most one unit. N_r may differ
from the frame count (tokens per frame) and between ranks.

Gradient (trainable vision tower): every rank uses the gathered embeddings in its
own part of the sequence, so the gradient of a rank's rows is the SUM of all ranks'
gradients for them: the backward all-reduces the embedding gradient and keeps this
rank's rows. Parameter gradients of the vision tower are then per-rank shares,
summed with the rest of the model (`parallel.dist.all_reduce_gradients`).

Departures: the paper pads frames so every rank gets the same count; here the
split is uneven by at most one unit and a rank may get no frames (F < P units).
A rank with no frames does not call `vision_fn`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from longrl.parallel.dist import shard_indices


def frame_slice(n_frames: int, rank: int, world: int, unit: int = 1) -> slice:
    """The frames rank `rank` encodes: a contiguous run of whole units."""
    if n_frames % unit:
        raise ValueError(f"{n_frames} frames do not split into units of {unit} (pad the video to a multiple)")
    units = shard_indices(n_frames // unit, rank, world)
    return slice(units[0] * unit, (units[-1] + 1) * unit) if units else slice(0, 0)


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's [N_r, ...] rows in rank order; backward: all-reduce, keep own rows."""

    @staticmethod
    def forward(ctx, x, counts, group):
        rank = dist.get_rank(group)
        ctx.group, ctx.start, ctx.count = group, sum(counts[:rank]), counts[rank]
        most = max(counts)
        padded = x.new_zeros((most, *x.shape[1:]))  # all_gather needs equal sizes
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])  # [sum(counts), ...]

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # every rank's use of these rows
        return grad[ctx.start : ctx.start + ctx.count], None, None


def mrsp_encode(frames: torch.Tensor, vision_fn, group=None, unit: int = 1) -> torch.Tensor:
    """Encode `frames` [F, ...] split over the ranks of `group`; every rank gets all embeddings.

    Call on every rank with the same frames. Returns vision_fn(frames) as one process
    would compute it, provided vision_fn treats units independently (true for a
    vision tower given per-slice grids). Differentiable when vision_fn's output is;
    then every rank of the group must run a backward through the result (its
    gradient is all-reduced), including a rank that encoded no frames.
    """
    if frames.shape[0] == 0:
        raise ValueError("mrsp_encode needs at least one frame")
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    part = frame_slice(frames.shape[0], rank, P, unit)
    local = vision_fn(frames[part]) if part.stop > part.start else None  # [N_r, ...]
    # Row counts, row shape, dtype, and whether a backward will come: a rank without frames
    # learns them here, and joins the backward's all-reduce through an empty leaf.
    mine = None if local is None else (local.shape[0], tuple(local.shape[1:]), local.dtype, local.requires_grad)
    meta = [None] * P
    dist.all_gather_object(meta, mine, group=group)
    _, row_shape, dtype, needs_grad = next(m for m in meta if m is not None)
    if local is None:
        local = torch.zeros((0, *row_shape), dtype=dtype, device=frames.device, requires_grad=needs_grad)
    counts = [0 if m is None else m[0] for m in meta]
    if P == 1:
        return local
    return _GatherRows.apply(local, counts, group)


def mrsp_encode_video(visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor, group=None) -> torch.Tensor:
    """Qwen2.5-VL's vision tower over one video, its temporal patches split over `group`.

    pixel_values [L, C*t*p*p] and grid_thw [3] as `models.vlm.patchify` makes them
    (rows t-major: gt blocks of gh*gw patches) -> embeddings [Nv, D] on every rank,
    equal to `visual(pixel_values, grid_thw)` in one process. The tower's attention
    (windowed and full) never crosses a temporal patch and its rotary positions are
    (h, w) only, so a contiguous run of n temporal patches is a video of grid
    (n, gh, gw) on its own. The gradient rule is `mrsp_encode`'s.
    """
    gt, gh, gw = (int(x) for x in grid_thw.view(3))
    per_t = pixel_values.view(gt, gh * gw, -1)  # [gt, gh*gw, C*t*p*p]

    def encode(chunk):  # [n, gh*gw, C*t*p*p] -> [n * gh*gw / merge^2, D]
        grid = torch.tensor([[chunk.shape[0], gh, gw]], device=grid_thw.device)
        return visual(chunk.reshape(-1, chunk.shape[-1]).to(visual.dtype), grid_thw=grid).pooler_output

    return mrsp_encode(per_t, encode, group)


def mrsp_encode_frames(model, frames: torch.Tensor, second_per_grid: float, group=None, chunk_frames: int = 0):
    """A Qwen2.5-VL model's video from its uint8 frames [F, H, W, 3] -> `VideoEmbeds` of the
    whole video on every rank of `group`.

    Each rank patchifies and encodes only its own run of temporal steps, `chunk_frames`
    frames at a time (`models.vlm.encode_frames`), so neither the float pixel values nor the
    tower's activations of the whole video exist on any rank (`mrsp_encode_video` takes the
    whole clip's pixel values on every rank: ~4 bytes x 3 channels per pixel of every
    frame). An odd frame count is padded with the last frame, as `patchify` pads it, so the
    result equals `encode_frames` on one rank (tests/parallel/test_parallel_sp_video.py)."""
    from longrl.models.vlm import PATCH, TEMPORAL_PATCH, VideoEmbeds, encode_frames

    if pad := -frames.shape[0] % TEMPORAL_PATCH:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])  # [F', H, W, 3]

    def encode(part):  # this rank's frames -> [N_r, D]
        return encode_frames(model, part, second_per_grid, chunk_frames).embeds

    embeds = mrsp_encode(frames, encode, group, unit=TEMPORAL_PATCH)  # [Nv, D]
    F, H, W = frames.shape[:3]
    grid = torch.tensor([F // TEMPORAL_PATCH, H // PATCH, W // PATCH], device=embeds.device)
    return VideoEmbeds(embeds, grid, second_per_grid)
