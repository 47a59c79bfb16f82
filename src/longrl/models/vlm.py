"""A video-language policy: tiny Qwen2.5-VL, frames -> patches in torch, cached video embeddings.

"Scaling RL to Long Videos" (LongVILA-R1, arXiv 2507.07966) trains with MR-SP, whose first
stage encodes each video ONCE and reuses the embeddings for every rollout and every
training pass of the step, instead of running the vision tower again inside every forward.
This module is that stage for Qwen2.5-VL (arXiv 2502.13923):

    frames [N, H, W, 3] --patchify--> pixel_values [L, C*t*p*p], grid (T, H/p, W/p)
           --encode_video (vision tower, once)--> VideoEmbeds: embeds [Nv, D] (+ grid, timing)
    prompt ids with Nv <|video_pad|> tokens --video_inputs_embeds--> inputs_embeds [B, T, D]
    mrope_position_ids (the model's own get_rope_index) -> position_ids [3, B, T]
    language model on (inputs_embeds, position_ids) -> hidden [B, T, D] -> chunked log-probs

The numbers are the same as the model's ordinary forward with `pixel_values_videos`
(tested: log-probs and gradients match). Rollouts use `sample_with_video`, which also
prefills the prompt once and shares its KV cache across the G samples.

Letters: N frames, L patches (= T*Hp*Wp), Nv video tokens (= L / merge^2), D hidden,
B sequences, T sequence length, G samples per prompt.

Departures:
- The vision tower is frozen by default during RL (the embeddings are constants). If it
  is trainable, `encode_video` under grad returns embeddings whose graph every pass of the
  step shares; one backward then gives the vision tower the gradient summed over all
  sequences, exactly what re-encoding per sequence gives.
- Frame resizing happens before patchify (`media.frames`, torch bicubic), not in the
  Hugging Face processor, which needs torchvision for videos. `patchify` matches the
  processor's layout and normalisation exactly (tested against its PIL image path).
- Sequence parallelism (MR-SP stage 2) is not here; `parallel/` shards long sequences.
- Positions come from the installed transformers' `get_rope_index`. In transformers 5.23
  text after a video continues at the video's start + max(H, W)/merge, not after its
  largest temporal position as in the original Qwen2.5-VL code, and HF `generate` offsets
  decode positions from that largest position instead: for a long video the two disagree
  (e.g. response positions 6, 7 teacher-forced vs 64, 65 in `generate`). Rollouts and
  training passes here both use the teacher-forced numbering, so RL is self-consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from longrl.models import vlm_rope
from longrl.models.key_bias import key_bias_attention
from longrl.models.compat import cache_kwargs
from longrl.errors import UserError
from longrl.rollout.sampling import sample_next

VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"
VIDEO_MARK = VISION_START + VIDEO_PAD + VISION_END
"""Where the video goes in a prompt; `video_prompt_ids` expands the pad to Nv tokens."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH, TEMPORAL_PATCH, MERGE = 14, 2, 2


# ----------------------------------------------------------------------------------------
# Building the tiny model
# ----------------------------------------------------------------------------------------


@dataclass
class TinyVLMShape:
    """Sizes of the tiny Qwen2.5-VL. Defaults keep a CPU step fast."""

    hidden_size: int = 64
    """Text model width (= vision merger output)."""
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 192
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    max_position_embeddings: int = 32768


def build_vlm_tokenizer(extra_tokens: tuple[str, ...] = ()):
    """The tiny character tokenizer (with `extra_tokens`, e.g. tool-call tags) plus Qwen's
    vision tokens (one id each)."""
    from longrl.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(extra_tokens)
    tok.add_tokens([VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD], special_tokens=True)
    return tok


def build_tiny_vlm(tokenizer, shape: TinyVLMShape = TinyVLMShape()):
    """A randomly initialised Qwen2.5-VL sized by `shape` (weights from the torch seed)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = shape.hidden_size // shape.num_heads
    if shape.hidden_size % shape.num_heads or head_dim % 2:
        raise UserError(f"hidden_size={shape.hidden_size} must split into an even head_dim over {shape.num_heads} heads")
    half = head_dim // 2  # mrope splits the rotary frequencies into (time, height, width) sections
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD)}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_kv_heads, max_position_embeddings=shape.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            depth=shape.vision_depth, hidden_size=shape.vision_hidden_size, num_heads=shape.vision_heads,
            intermediate_size=shape.vision_intermediate_size, out_hidden_size=shape.hidden_size,
            patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE,
            tokens_per_second=2, window_size=112, fullatt_block_indexes=[shape.vision_depth - 1],
        ),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.to(torch.float32)


def load_vlm(path: str = "", shape: TinyVLMShape = TinyVLMShape(), extra_tokens: tuple[str, ...] = ()):
    """(model, tokenizer) from a local Qwen2.5-VL directory, or the tiny one when `path` is
    empty (`extra_tokens` added to its tokenizer)."""
    if not path:
        tok = build_vlm_tokenizer(extra_tokens)
        return build_tiny_vlm(tok, shape), tok
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from longrl.models.load import VLM_MODEL_TYPES, check_model_dir, loading, resolve_model_path

    path = resolve_model_path(path)  # a local directory, or a hub id's snapshot in the local cache
    check_model_dir(path, supported=VLM_MODEL_TYPES)  # config.json, model type, safetensors headers
    with loading(path):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, local_files_only=True)
    return model, tok


# ----------------------------------------------------------------------------------------
# Frames -> patches (the processor's job, in torch)
# ----------------------------------------------------------------------------------------


def patchify(frames: torch.Tensor, patch: int = PATCH, temporal: int = TEMPORAL_PATCH, merge: int = MERGE,
             mean=CLIP_MEAN, std=CLIP_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames [N, H, W, 3] -> (pixel_values [L, 3*temporal*patch*patch] float32, grid_thw [3]).

    H and W must be multiples of patch*merge (`media.frames` resizes to that). An odd frame
    count is padded by repeating the last frame, as the Qwen2-VL processor does. Patches are
    ordered (t, h-block, w-block, h-in-block, w-in-block) so each merge x merge group of
    patches is contiguous; inside a patch the layout is (channel, time, y, x), which is
    what the vision tower's Conv3d patch embedding unflattens.
    """
    N, H, W, C = frames.shape
    if H % (patch * merge) or W % (patch * merge):
        raise ValueError(f"frame size {H}x{W} is not a multiple of {patch * merge}; resize first")
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)  # [N, C, H, W]
    m = torch.tensor(mean, dtype=x.dtype).view(1, C, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, C, 1, 1)
    x = (x - m) / s
    if pad := -N % temporal:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])  # [N', C, H, W]
    gt, gh, gw = x.shape[0] // temporal, H // patch, W // patch
    x = x.view(gt, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, bh, bw, mh, mw, C, t, py, px]
    return x.reshape(gt * gh * gw, C * temporal * patch * patch), torch.tensor([gt, gh, gw])


def seconds_per_grid(timestamps: np.ndarray, temporal: int = TEMPORAL_PATCH) -> float:
    """Seconds one temporal grid step spans (Qwen2.5-VL's second_per_grid_ts): temporal / fps."""
    ts = np.asarray(timestamps, dtype=np.float64)
    step = float(np.mean(np.diff(ts))) if len(ts) > 1 else 1.0
    return temporal * step


# ----------------------------------------------------------------------------------------
# MR-SP stage 1: encode once, reuse everywhere
# ----------------------------------------------------------------------------------------


@dataclass
class VideoEmbeds:
    """One video after the vision tower: what every rollout and training pass reuses."""

    embeds: torch.Tensor
    """Merged vision tokens in the text model's width. [Nv, D]"""
    grid_thw: torch.Tensor
    """Patch grid (T, H/patch, W/patch) before merging. [3] long"""
    second_per_grid: float
    """Seconds per temporal grid step, for the time axis of the rotary positions."""
    keep: torch.Tensor | None = None
    """Which of the unreduced video's tokens `embeds` holds (`reduce_video`). [Nv_full] bool;
    None: all of them. The kept tokens keep their positions in the unreduced sequence."""
    key_bias: torch.Tensor | None = None
    """Added to each token's attention logits as a key (proportional attention: log of the
    unreduced tokens it stands for, `with_key_bias`). [Nv] float; None: no bias."""

    @property
    def n_tokens(self) -> int:
        """Video tokens in the prompt (the kept ones)."""
        return self.embeds.shape[0]

    @property
    def n_full(self) -> int:
        """Video tokens before reduction."""
        return self.n_tokens if self.keep is None else int(self.keep.numel())

    def detached(self) -> "VideoEmbeds":
        return replace(self, embeds=self.embeds.detach())


def encode_video(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor, second_per_grid: float) -> VideoEmbeds:
    """Run the vision tower once. Under `torch.no_grad` (frozen tower) the result is a constant."""
    visual = model.model.visual
    out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw.view(1, 3))
    return VideoEmbeds(out.pooler_output, grid_thw.view(3), second_per_grid)  # [Nv, D]


def encode_frames(model, frames: torch.Tensor, second_per_grid: float, chunk_frames: int = 0) -> VideoEmbeds:
    """Patchify and encode uint8 frames [N, H, W, 3] `chunk_frames` at a time (0: all at once).

    Qwen2.5-VL's vision tower attends within one temporal grid step only (its attention
    windows and full-attention blocks never cross steps), so encoding runs of whole steps
    and concatenating gives the same embeddings as one call (tested), while the tower's
    activations and the float pixel values only ever hold one chunk. A chunk is rounded
    down to whole temporal steps (at least one).
    """
    visual = model.model.visual
    device = next(visual.parameters()).device
    N = frames.shape[0]
    step = max(TEMPORAL_PATCH, chunk_frames - chunk_frames % TEMPORAL_PATCH) if chunk_frames > 0 else N
    parts, steps = [], 0
    for s in range(0, N, step):
        pv, grid = patchify(frames[s : s + step])  # [l, C*t*p*p], (t, h, w); only the last chunk pads
        video = encode_video(model, pv.to(device), grid.to(device), second_per_grid)
        parts.append(video.embeds)  # [l / merge^2, D]
        steps += int(grid[0])
    grid = torch.tensor([steps, int(grid[1]), int(grid[2])], device=device)  # [3]
    return VideoEmbeds(parts[0] if len(parts) == 1 else torch.cat(parts), grid, second_per_grid)  # [Nv, D]


def reduce_video(video: VideoEmbeds, method: str = "none", threshold: float = 0.0, max_unseen: int = 0,
                 proportional: bool = False) -> VideoEmbeds:
    """`video` with the tokens `media.reduce.reduce_video_tokens` drops removed ('none': as is;
    `max_unseen`: the most steps in a row a patch may be dropped, 0 no limit).

    The result's `keep` records which tokens stayed; `video_prompt_ids(tok, result.n_tokens,
    ...)` gives the shorter prompt and `mrope_position_ids` the kept tokens' original
    positions. Slicing keeps the graph, so a trainable tower still gets its gradient
    through the kept tokens.
    """
    from longrl.media.reduce import reduce_video_tokens

    if method == "none" or video.keep is not None:
        return video
    keep = reduce_video_tokens(video.embeds, video.grid_thw, method, threshold, MERGE, max_unseen)  # [Nv] bool
    reduced = replace(video, embeds=video.embeds[keep], keep=keep)  # [Nk, D]
    return with_key_bias(reduced) if proportional else reduced


def with_key_bias(video: VideoEmbeds) -> VideoEmbeds:
    """`video` with proportional attention: each kept token's key bias is log(the number of
    unreduced tokens it stands for, `media.reduce.token_counts`), so attention gives a patch
    about the mass its dropped copies had. An unreduced video is returned as is (no bias)."""
    from longrl.media.reduce import token_counts

    if video.keep is None or video.key_bias is not None:
        return video
    counts = token_counts(video.keep, video.grid_thw, MERGE)  # [Nk]
    return replace(video, key_bias=counts.to(device=video.embeds.device, dtype=video.embeds.dtype).log())


def key_bias_columns(model, input_ids: torch.Tensor, video: VideoEmbeds) -> torch.Tensor | None:
    """[B, T] float: each column's key bias (the video's at its tokens, 0 elsewhere), or None
    when the video has none."""
    if getattr(video, "key_bias", None) is None:
        return None
    bias = torch.zeros(input_ids.shape, dtype=video.key_bias.dtype, device=input_ids.device)  # [B, T]
    is_video = video_token_mask(model, input_ids, video.n_tokens)  # [B, T]
    return bias.masked_scatter(is_video, video.key_bias.repeat(input_ids.shape[0]))


def lm_forward(model, key_bias: torch.Tensor | None = None, **kwargs):
    """The language model's forward with `key_bias` [B, K] (one value per key, the cache's
    included) added to every attention logit of each key (`models.key_bias`: no [Q, K] mask);
    None: the plain forward."""
    lm = model.model.language_model
    if key_bias is None:
        return lm(**kwargs)
    with key_bias_attention(lm):
        return lm(key_bias=key_bias, **kwargs)


def video_prompt_ids(tokenizer, n_video_tokens: int, question: str) -> list[int]:
    """Token ids of the prompt: the tokenizer's chat template (if any) around VIDEO_MARK + question,
    with the one video pad token expanded to `n_video_tokens` copies."""
    from longrl.models.load import format_prompt

    ids = tokenizer(format_prompt(tokenizer, VIDEO_MARK + question), add_special_tokens=False)["input_ids"]
    pad = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    if ids.count(pad) != 1:
        raise ValueError(f"prompt must hold exactly one {VIDEO_PAD}, found {ids.count(pad)}")
    k = ids.index(pad)
    return ids[:k] + [pad] * n_video_tokens + ids[k + 1 :]


def video_token_mask(model, input_ids: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[B, T] bool: the first `n_tokens` video pads of each row, which hold the video.

    A policy can sample the pad token itself; such later pads are ordinary text tokens
    here, so rollouts and training passes agree on every sequence.
    """
    is_pad = input_ids == model.config.video_token_id  # [B, T]
    counts = is_pad.sum(1)
    if not bool((counts >= n_tokens).all()):
        raise ValueError(f"rows hold {counts.tolist()} video tokens, the video has {n_tokens}")
    return is_pad & (is_pad.cumsum(1) <= n_tokens)


def mrope_position_ids(model, input_ids: torch.Tensor, video: VideoEmbeds,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multimodal rotary positions [3, B, T] for rows that each hold `video` once.

    Computed by the model's own `get_rope_index`, so they match its ordinary forward. For a
    reduced video (`video.keep`) they are those of the unreduced rows at the tokens that
    stay: text after the video, and every kept video token, keep their true positions.
    """
    if video.keep is not None:
        return _reduced_positions(model, input_ids, video, attention_mask)
    if vlm_rope.numbering(model) == "vllm":  # rollouts on vLLM: number as the engine does (models/vlm_rope.py)
        return vlm_rope.vllm_rope_index(model.config, input_ids, video_token_mask(model, input_ids, video.n_tokens),
                                        video.grid_thw, attention_mask, second_per_grid=video.second_per_grid)
    B = input_ids.shape[0]
    mm_types = video_token_mask(model, input_ids, video.n_tokens).int() * 2  # [B, T]; 2 = video
    positions, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_types,
        video_grid_thw=video.grid_thw.view(1, 3).expand(B, 3),
        second_per_grid_ts=torch.full((B,), video.second_per_grid),
        attention_mask=attention_mask,
    )
    return positions  # [3, B, T]


def _reduced_positions(model, input_ids: torch.Tensor, video: VideoEmbeds,
                       attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Positions [3, B, T] of rows holding a reduced video: number the unreduced rows (the
    dropped pads put back), then take the columns of the tokens that stay."""
    B, T = input_ids.shape
    Nk, Nv = video.n_tokens, video.n_full
    is_video = video_token_mask(model, input_ids, Nk)  # [B, T]
    start = is_video.int().argmax(1)  # [B] first video token of each row
    if not bool(is_video.gather(1, (start[:, None] + torch.arange(Nk, device=start.device)).clamp(max=T - 1)).all()):
        raise ValueError("a reduced video's tokens must be contiguous in every row (as video_prompt_ids writes them)")
    kept = video.keep.nonzero().view(-1).to(input_ids.device)  # [Nk] index in the full video
    cols = torch.arange(T, device=input_ids.device).expand(B, T)  # [B, T] reduced column
    rel = cols - start[:, None]
    full_col = torch.where(rel < 0, cols, torch.where(rel < Nk, start[:, None] + kept[rel.clamp(0, Nk - 1)],
                                                      cols + (Nv - Nk)))  # [B, T] column in the full row
    full_ids = torch.full((B, T + Nv - Nk), model.config.video_token_id, dtype=input_ids.dtype, device=input_ids.device)
    full_ids.scatter_(1, full_col, input_ids)  # the dropped columns stay video pads
    full_mask = None
    if attention_mask is not None:
        full_mask = torch.ones_like(full_ids, dtype=attention_mask.dtype).scatter_(1, full_col, attention_mask)
    full = mrope_position_ids(model, full_ids, replace(video, embeds=video.embeds.new_empty(Nv, 0), keep=None),
                              full_mask)  # [3, B, T + Nv - Nk]
    return full.gather(2, full_col.expand(3, B, T))  # [3, B, T]


def video_inputs_embeds(model, input_ids: torch.Tensor, video: VideoEmbeds) -> torch.Tensor:
    """Token embeddings [B, T, D] with every row's video pads replaced by `video.embeds`
    (several videos at their own columns: `models.vlm_segments.VideoSequence`)."""
    if not isinstance(video, VideoEmbeds):
        return video.inputs_embeds(model, input_ids)
    emb = model.get_input_embeddings()(input_ids)  # [B, T, D]
    is_video = video_token_mask(model, input_ids, video.n_tokens)  # [B, T]
    fill = video.embeds.to(emb.dtype).repeat(input_ids.shape[0], 1)  # [B*Nv, D]
    return emb.masked_scatter(is_video[..., None], fill)


def lm_hidden(model, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Text model on precomputed embeddings -> final hidden states [B, T, D] (no logits);
    `key_bias` [B, T]: added to every attention logit per key (`lm_forward`)."""
    out = lm_forward(model, key_bias, inputs_embeds=inputs_embeds, position_ids=position_ids,
                     attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def video_hidden(model, video: VideoEmbeds, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states [B, T, D] for rows that share one cached video."""
    positions = mrope_position_ids(model, input_ids, video, attention_mask)  # [3, B, T]
    return lm_hidden(model, video_inputs_embeds(model, input_ids, video), positions, attention_mask,
                     key_bias_columns(model, input_ids, video))


def video_logprobs(model, video: VideoEmbeds, batch, chunk: int = 256, temperature: float = 1.0) -> torch.Tensor:
    """Teacher-forced log-probs of `batch` (a streambp TokenBatch) given `video`, no grad. -> [B, T]"""
    from longrl.streambp.logprobs import chunked_logprobs

    with torch.no_grad():
        hidden = video_hidden(model, video, batch.input_ids)  # [B, T, D]
        head = model.get_output_embeddings()
        return chunked_logprobs(hidden, head.weight, head.bias, batch.targets, batch.mask, chunk, temperature)


def video_loss_and_backward(model, video: VideoEmbeds, batch, loss_fn, chunk: int = 256, temperature: float = 1.0):
    """Forward + loss + backward for `batch` given `video`; gradients accumulate in `.grad`.

    The LM head runs chunk by chunk (streambp: no [B, T, V] logits). With a trainable
    vision tower pass `as_leaf(video)` here for every micro-batch, then call
    `backward_vision` once: the tower's backward runs once per step, not once per batch.
    -> (loss, metrics, logprobs [B, T])
    """
    from longrl.streambp.logprobs import backward_chunked_head

    if video.embeds.requires_grad and video.embeds.grad_fn is not None:
        raise ValueError("video.embeds carries the vision graph: pass as_leaf(video) and call backward_vision after")
    hidden = video_hidden(model, video, batch.input_ids)  # [B, T, D]
    head = model.get_output_embeddings()
    loss, metrics, grad_h, logp = backward_chunked_head(
        hidden, head.weight, head.bias, batch.targets, batch.mask, loss_fn, chunk, temperature
    )
    hidden.backward(grad_h)
    return loss, metrics, logp


def as_leaf(video: VideoEmbeds) -> VideoEmbeds:
    """A copy whose embeds are a grad-collecting leaf: micro-batches add dL/dembeds into it."""
    return replace(video, embeds=video.embeds.detach().requires_grad_(True))


def backward_vision(video: VideoEmbeds, leaf: VideoEmbeds) -> None:
    """Send the gradient gathered in `leaf` through the vision tower once."""
    if leaf.embeds.grad is not None:
        video.embeds.backward(leaf.embeds.grad)


# ----------------------------------------------------------------------------------------
# Rollouts on a cached video
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def sample_with_video(model, video: VideoEmbeds, prompt_ids: list[int], n: int, max_new_tokens: int,
                      eos_id: int, temperature: float = 1.0, generator: torch.Generator | None = None,
                      share_prefill: bool = True, top_p: float = 1.0) -> tuple[list[list[int]], list[list[float]]]:
    """G = `n` samples for one video prompt with a KV cache. -> (responses, their log-probs)

    The prompt (with the video's embeddings) is prefilled once and its KV cache copied to
    the n rows (`share_prefill`); otherwise each row prefills it. Decode positions continue
    from the prompt's last position, exactly as `mrope_position_ids` numbers a teacher-forced
    prompt + response, so these log-probs equal `video_logprobs` on the same tokens.
    temperature 0 is greedy; `top_p` < 1 samples from the nucleus (log-probs stay those of the
    full tempered distribution, as `rollout.sampling.sample_next`). A response ends at (and
    includes) `eos_id`.
    """
    from transformers import DynamicCache

    lm, head = model.model.language_model, model.get_output_embeddings()
    ids = torch.tensor([prompt_ids])  # [1, P]
    positions = mrope_position_ids(model, ids, video)  # [3, 1, P]
    embeds = video_inputs_embeds(model, ids, video)  # [1, P, D]
    cache = DynamicCache(config=model.config.text_config)
    P = ids.shape[1]
    bias = key_bias_columns(model, ids, video)  # [1, P] or None (no proportional attention)
    rows = 1 if share_prefill else n
    h = lm_forward(model, None if bias is None else bias.expand(rows, P), inputs_embeds=embeds.expand(rows, -1, -1),
                   position_ids=positions.expand(3, rows, P), **cache_kwargs(lm, cache), use_cache=True).last_hidden_state
    if share_prefill:
        cache.batch_repeat_interleave(n)
    h = h[:, -1].expand(n, -1)  # [n, D]
    next_pos = int(positions[0, 0, -1]) + 1  # the prompt ends in text: all three axes agree
    tokens, logps = [], []
    done = torch.zeros(n, dtype=torch.bool)
    for step in range(max_new_tokens):
        tok, logp = sample_next(head(h), temperature, top_p, generator)  # [n], [n]
        tokens.append(torch.where(done, torch.full_like(tok, -1), tok))
        logps.append(logp)
        done |= tok == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        pos = torch.full((3, n, 1), next_pos + step)
        step_bias = None if bias is None else torch.nn.functional.pad(bias.expand(n, P), (0, step + 1))  # [n, P+step+1]
        h = lm_forward(model, step_bias, inputs_embeds=model.get_input_embeddings()(tok[:, None]), position_ids=pos,
                       **cache_kwargs(lm, cache), use_cache=True).last_hidden_state[:, -1]
    tok_mat, lp_mat = torch.stack(tokens, 1), torch.stack(logps, 1)  # [n, steps]
    responses = [[t for t in row if t >= 0] for row in tok_mat.tolist()]
    return responses, [lp_mat[i, : len(r)].tolist() for i, r in enumerate(responses)]


# ----------------------------------------------------------------------------------------
# Many prompts and samples at once: what the video recipe uses
# ----------------------------------------------------------------------------------------


def prompt_positions(model, prompt_ids: list[int], video: VideoEmbeds) -> torch.Tensor:
    """Rotary positions [3, P] of one video prompt. They depend only on the prompt and the
    video's grid, so a recipe computes them once per prompt and reuses them for every sample
    and pass: a response continues at `last + 1` on all three axes (the prompt ends in text)."""
    return mrope_position_ids(model, torch.tensor([prompt_ids]), video)[:, 0]  # [3, P]


def _prefill(model, video: VideoEmbeds, prompt_ids: list[int], positions: torch.Tensor):
    """Language model over one prompt with its video -> (hidden [1, P, D], KV cache)."""
    from transformers import DynamicCache

    ids = torch.tensor([prompt_ids], device=video.embeds.device)  # [1, P]
    cache = DynamicCache(config=model.config.text_config)
    embeds = video_inputs_embeds(model, ids, video)  # [1, P, D]
    h = lm_forward(model, key_bias_columns(model, ids, video), inputs_embeds=embeds, position_ids=positions[:, None],
                   **cache_kwargs(model.model.language_model, cache), use_cache=True).last_hidden_state
    return h, cache


def shared_prompt_hidden(model, video: VideoEmbeds, prompt_ids: list[int], positions: torch.Tensor,
                         responses: torch.Tensor, response_embeds: torch.Tensor | None = None,
                         response_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced hidden states of n responses to ONE prompt, the prompt run once.

    The prompt (with the video) goes through the language model once; its KV cache is
    repeated to the n rows and the responses [n, R] (right-padded: causal attention never
    lets a real token see the padding after it) attend to it. The numbers equal n full
    `video_hidden` rows (tested), at the cost of one prompt instead of n. Gradients flow
    into the shared prompt (and the video embeddings) summed over the rows, as they must.
    `response_embeds` [n, R, D] / `response_positions` [3, n, R]: responses that hold videos of
    their own (`models.vlm_segments.rows_hidden`); default their token embeddings, numbered on.
    -> (prompt hidden [1, P, D], response hidden [n, R, D])
    """
    n, R = responses.shape
    h_prompt, cache = _prefill(model, video, prompt_ids, positions)
    cache.batch_repeat_interleave(n)
    start = int(positions[0, -1]) + 1
    pos = (start + torch.arange(R, device=responses.device)).view(1, 1, R).expand(3, n, R)  # [3, n, R]
    pos = pos if response_positions is None else response_positions
    emb = model.get_input_embeddings()(responses) if response_embeds is None else response_embeds
    bias = key_bias_columns(model, torch.tensor([prompt_ids], device=responses.device), video)  # [1, P] or None
    bias = None if bias is None else torch.nn.functional.pad(bias.expand(n, -1), (0, R))  # [n, P+R]
    h_resp = lm_forward(model, bias, inputs_embeds=emb, position_ids=pos,
                        **cache_kwargs(model.model.language_model, cache), use_cache=True).last_hidden_state
    return h_prompt, h_resp


def _pad_cache_left(caches: list, width: int, config):
    """One batched cache from per-prompt caches: each row's keys/values right-aligned in
    `width` slots, zeros (masked out by the attention mask) in front. Zeros rather than
    padded-prompt activations: a fully masked padding query can produce NaN in SDPA."""
    from transformers import DynamicCache

    out = DynamicCache(config=config)
    for layer in range(len(caches[0].layers)):
        ks, vs = [], []
        for c in caches:
            k, v = c.layers[layer].keys, c.layers[layer].values  # [1, H, P_i, d]
            pad = (0, 0, width - k.shape[2], 0)
            ks.append(torch.nn.functional.pad(k, pad))
            vs.append(torch.nn.functional.pad(v, pad))
        out.update(torch.cat(ks), torch.cat(vs), layer)  # [N, H, width, d]
    return out


@torch.no_grad()
def sample_prompts(model, videos: list[VideoEmbeds], prompts: list[list[int]], positions: list[torch.Tensor],
                   n: int, max_new_tokens: int, eos_id: int, temperature: float = 1.0,
                   generator: torch.Generator | None = None, top_p: float = 1.0,
                   stop_ids: tuple[int, ...] = ()) -> tuple[list[list[int]], list[list[float]]]:
    """`n` samples for each of N video prompts, decoded together in one batch of N*n rows.

    Each prompt is prefilled once on its own (no padding inside a prefill); the caches are
    stacked right-aligned and repeated n times, and every decode step runs all rows. Rows
    are grouped per prompt (prompt i's samples are rows i*n ... i*n+n-1). temperature 0 is
    greedy. -> (responses, their log-probs), a response ending at (and including) `eos_id` or
    one of `stop_ids` (the end of a tool call). A prompt's `video` may be a
    `models.vlm_segments.VideoSequence` (a multi-turn context with several videos).
    """
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    last, caches = [], []
    for video, ids, pos in zip(videos, prompts, positions):
        h, cache = _prefill(model, video, ids, pos)
        last.append(h[:, -1])
        caches.append(cache)
    width = max(len(p) for p in prompts)
    cache = _pad_cache_left(caches, width, model.config.text_config)
    cache.batch_repeat_interleave(n)
    device = last[0].device
    lengths = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(n)  # [N*n]
    mask = (torch.arange(width, device=device)[None] >= (width - lengths)[:, None]).long()  # [N*n, width]
    biases = [key_bias_columns(model, torch.tensor([ids], device=device), v) for v, ids in zip(videos, prompts)]
    bias = None  # [N*n, width]: each prompt's key bias right-aligned like its cache (proportional attention)
    if any(b is not None for b in biases):
        bias = torch.cat([torch.nn.functional.pad(torch.zeros(1, len(ids), device=device, dtype=last[0].dtype)
                                                  if b is None else b,
                                                  (width - len(ids), 0)) for b, ids in zip(biases, prompts)])
        bias = bias.repeat_interleave(n, 0)
    next_pos = torch.tensor([int(p[0, -1]) + 1 for p in positions], device=device).repeat_interleave(n)  # [N*n]
    h = torch.cat(last).repeat_interleave(n, 0)  # [N*n, D]
    rows = h.shape[0]
    tokens, logps = [], []
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tok, logp = sample_next(head(h), temperature, top_p, generator)  # [N*n], [N*n]
        tokens.append(torch.where(done, torch.full_like(tok, -1), tok))
        logps.append(logp)
        done |= (tok == eos_id) | (torch.isin(tok, torch.tensor(stop_ids, device=device)) if stop_ids else False)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)], 1)
        pos = (next_pos + step).view(1, rows, 1).expand(3, rows, 1)  # [3, N*n, 1]
        if bias is not None:
            bias = torch.nn.functional.pad(bias, (0, 1))  # [N*n, K]
        h = lm_forward(model, bias, inputs_embeds=embed(tok[:, None]), position_ids=pos, attention_mask=mask,
               **cache_kwargs(model.model.language_model, cache), use_cache=True).last_hidden_state[:, -1]
    tok_mat, lp_mat = torch.stack(tokens, 1), torch.stack(logps, 1)  # [N*n, steps]
    responses = [[t for t in row if t >= 0] for row in tok_mat.tolist()]
    return responses, [lp_mat[i, : len(r)].tolist() for i, r in enumerate(responses)]


# ----------------------------------------------------------------------------------------
# Files -> cached embeddings, and a predictor for evaluation
# ----------------------------------------------------------------------------------------


def vision_tag(model) -> str:
    """A digest of the vision tower's weights: part of the disk-cache key, so embeddings
    from other weights are never reused. Compute once per policy version (it reads every weight)."""
    import hashlib

    h = hashlib.sha256()
    # The tower's parameters (all of its state_dict: its buffers are not persistent), read
    # without state_dict()'s hooks: FSDP2's would reshard a sharded model (parallel/fsdp.py);
    # hashed from a copy, as .numpy() pins a weight's storage and FSDP2 frees it later.
    for name, p in sorted(model.model.visual.named_parameters(remove_duplicate=False)):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).clone().numpy().tobytes())
    return h.hexdigest()[:16]


def embed_video_file(model, path: str, sampling, cache=None, tag: str = "", reduction: str = "none",
                     threshold: float = 0.0, chunk_frames: int = 0, max_unseen: int = 0) -> VideoEmbeds:
    """Decode, sample, patchify and encode (no grad, `chunk_frames` at a time) the video at
    `path`, then drop redundant tokens (`reduce_video`; 'none' keeps all).

    With an `media.cache.EmbeddingCache` the result (reduced, with its keep mask) is looked
    up by the file's content hash, `sampling`, the reduction and `tag` (use
    `vision_tag(model)`) and computed only on a miss.
    """
    from longrl.media.cache import cache_key
    from longrl.media.frames import load_clip

    def compute() -> dict[str, torch.Tensor]:
        clip = load_clip(path, sampling)
        with torch.no_grad():
            video = encode_frames(model, clip.frames, seconds_per_grid(clip.timestamps), chunk_frames)
        return video_tensors(reduce_video(video, reduction, threshold, max_unseen))

    key = cache_key(path, reduction_key(sampling.key(), reduction, threshold, max_unseen), tag) if cache is not None else ""
    found = compute() if cache is None else cache.get_or_compute(key, compute)
    return video_from_tensors(found)


def reduction_key(sampling: dict, reduction: str, threshold: float, max_unseen: int = 0) -> dict:
    """The cache's sampling dict with the token reduction added (unchanged for 'none', so
    caches written before reduction existed still hit; max_unseen only when set)."""
    if reduction == "none":
        return sampling
    key = {**sampling, "reduction": reduction, "drop_threshold": float(threshold)}
    return {**key, "max_unseen": int(max_unseen)} if max_unseen > 0 else key


def video_tensors(video: VideoEmbeds) -> dict[str, torch.Tensor]:
    """`video` as the flat dict of tensors the embedding cache stores."""
    out = {"embeds": video.embeds, "grid_thw": video.grid_thw,
           "second_per_grid": torch.tensor(video.second_per_grid, dtype=torch.float64)}
    if video.keep is not None:
        out["keep"] = video.keep
    return out


def video_from_tensors(t: dict[str, torch.Tensor], device=None) -> VideoEmbeds:
    """Inverse of `video_tensors` (onto `device` if given)."""
    keep = t.get("keep")
    video = VideoEmbeds(t["embeds"], t["grid_thw"].long(), float(t["second_per_grid"]),
                        None if keep is None else keep.bool())
    if device is None:
        return video
    return replace(video, embeds=video.embeds.to(device), grid_thw=video.grid_thw.to(device),
                   keep=None if keep is None else video.keep.to(device))


def vlm_predictor(model, tokenizer, max_new_tokens: int = 64):
    """`predict(frames, timestamps, question) -> response` for `eval.videomme`, greedy.

    The video is encoded once and reused while the same frames array comes back (one video's
    questions are asked in a row).
    """
    last: dict = {}

    def predict(frames: np.ndarray, timestamps: np.ndarray, question: str) -> str:
        if last.get("frames") is not frames:
            pv, grid = patchify(torch.from_numpy(frames))
            with torch.no_grad():
                last["video"] = encode_video(model, pv, grid, seconds_per_grid(timestamps))
            last["frames"] = frames
        video = last["video"]
        ids = video_prompt_ids(tokenizer, video.n_tokens, question)
        (resp,), _ = sample_with_video(model, video, ids, 1, max_new_tokens, tokenizer.eos_token_id, temperature=0.0)
        if resp and resp[-1] == tokenizer.eos_token_id:
            resp = resp[:-1]
        return tokenizer.decode(resp, skip_special_tokens=False)

    return predict
