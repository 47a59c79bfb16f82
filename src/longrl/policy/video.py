"""The video policy: a Qwen2.5-VL model on cached video embeddings (MR-SP).

"Scaling RL to Long Videos" (LongVILA-R1, arXiv 2507.07966) runs the vision tower once per
video and reuses the embeddings for every rollout and every training pass of the step
(MR-SP stage 1). This policy does that behind the `Policy` interface (`policy/base.py`),
so the SFT, GRPO and DPO loops are the text ones:

- Per step and video: at most one vision encode (none at all with a frozen tower after the
  first time: the embeddings are cached across steps, on disk too with
  `video.embed_cache_dir`); the prompt's M-RoPE positions computed once per prompt for
  the run. `requests()` hands the embeddings and positions to the rollout backend
  (`VideoPrompt`), so rollouts and training see the same frames.
- The teacher-forced passes run each distinct prompt (video + question) through the
  language model once and share it between its rows (`models.vlm.shared_prompt_hidden`,
  exact); with `train.backprop=streambp`, StreamBP's sequence-chunked layer backward on
  whole rows (the embeddings spliced into each row's token embeddings). A pipeline that
  hands pixels to every forward encodes once per rollout and once per sequence per pass;
  the difference is logged as `video/encodes_saved`.
- Long videos: on one rank the tower encodes `video.encode_chunk` frames at a time (the
  same embeddings); `video.token_reduction=diff` drops the tokens of patches that have not
  changed (`media/reduce.py`) right after the encode, so the cache, the prompts (fewer
  video pads), the rollouts and every pass hold the one reduced sequence, its tokens at
  their unreduced M-RoPE positions; `video/tokens_kept_frac` logs what stayed.
- Sequence parallel (`parallel.sp_size` = P > 1): each video's temporal patches are split
  over the group's ranks and the embeddings all-gathered once (`parallel.mrsp_encode`);
  the passes run Ulysses on whole rows (`parallel.sp_video`), so the shared-prompt saving
  is not used there.
- Multi-turn episodes with the `video_frames` tool (`tools/video_frames.py`): a row's
  `Example.media[1:]` are the segments spliced into its response (specs, `media.segments`;
  their columns in `meta["media_offsets"]`). A segment is encoded once per step through the
  same cache as whole videos (keyed by file, range and sampling), when the episode's next
  turn is requested (`VideoPrompt.continued`); every pass reuses it, and splices every
  video of a row in order (`models.vlm_segments`).

Letters: b rows of a micro-batch, T tokens, D hidden, P prompt.

Departures: a trainable tower gets one backward per micro-batch through the graph of the
step's single encode (so rl.ppo_epochs must be 1 with video.train_vision); StreamBP is not
combined with sequence parallelism; APRIL and the vLLM backend take token-only requests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch

from longrl.config import Config, ModelConfig
from longrl.data.example import Example
from longrl.parallel import dist
from longrl.rollout.base import RolloutRequest

SEGMENTS_IN_MEMORY = 64
"""Room in the embedding cache's memory for the segments of `tools.video_frames` calls."""


@dataclass
class VideoPrompt:
    """What a rollout backend needs to decode a video prompt: the cached embeddings and the
    prompt's M-RoPE positions [3, P]."""

    video: object  # models.vlm.VideoEmbeds (a later turn's: models.vlm_segments.VideoSequence)
    positions: torch.Tensor
    continuation: object = None
    """(prompt, context ids, [(segment spec, response offset)]) -> the next turn's VideoPrompt
    (`rollout.episodes`: a multi-turn episode continues from its token ids)."""
    prompt_len: int = 0
    """A later turn's: how many of its ids are the prompt (0: a first turn, all of them)."""

    def continued(self, context_ids: list[int], media: list[tuple[str, int]]) -> "VideoPrompt":
        """The media of the episode's next turn: the whole context so far, every video in it."""
        return self.continuation(self, context_ids, media)


def _key(ex: Example) -> tuple[str, str]:
    return ex.media[0], ex.prompt


def _segments(ex: Example) -> list[tuple[str, int]]:
    """The segments a tool spliced into this row's response: [(spec, response offset)]
    (`rollout.episodes.episode_example`)."""
    return list(zip(ex.media[1:], ex.meta.get("media_offsets", [])))


class VideoPolicy:
    """Video prompts, rollout requests, log-probs and backward on cached embeddings;
    `examples[i]` is the example that row i of a batch answers."""

    def __init__(self, model, tokenizer, task, cfg: Config):
        from longrl.config import train_temperature
        from longrl.media.cache import EmbeddingCache

        self.model, self.tokenizer = model, tokenizer
        self.task, self.train_vision = task, cfg.video.train_vision
        self.backprop, self.chunk, self.temperature = cfg.train.backprop, cfg.train.stream_chunk, train_temperature(cfg)
        self.streambp = cfg.train.backprop == "streambp"
        self.reduction = (cfg.video.token_reduction, cfg.video.drop_threshold, cfg.video.max_unseen)
        # Proportional attention: a kept token's key counts for the dropped copies it stands for.
        self.proportional = cfg.video.token_reduction != "none" and cfg.video.proportional_attention
        self.encode_chunk = cfg.video.encode_chunk
        if cfg.rollout.backend == "vllm":  # every pass numbers positions as the engine does
            from longrl.models import vlm_rope

            vlm_rope.set_numbering(model, "vllm")
        # Frozen tower: embeddings are constants, cached for the whole run (and on disk).
        self.cache = None if self.train_vision else EmbeddingCache(cfg.video.embed_cache_dir or None,
                                                                   max_items=len(task.clips) + 1 + SEGMENTS_IN_MEMORY)
        self._tag = ""
        # Keyed by (video path, prompt text): ids may repeat across a train and an eval file.
        self._prompts: dict[tuple[str, str], list[int]] = {}
        self._positions: dict[tuple[str, str], torch.Tensor] = {}
        self._step: dict[str, object] = {}  # video path -> this step's VideoEmbeds
        self._step_version = None
        self.totals = {"encodes": 0, "naive_encodes": 0, "cache_hits": 0, "tokens_kept": 0, "tokens_full": 0}
        self._last = dict(self.totals)

    # ---- prompts and videos -------------------------------------------------------------

    def encode_prompts(self, examples: list[Example]) -> list[list[int]]:
        """Prompt ids with the video pad expanded to the clip's number of video tokens (the
        kept ones under video.token_reduction, which needs the embeddings: the video is
        encoded, or read from the cache, here the first time)."""
        return [self._prompt(ex) for ex in examples]

    def _prompt(self, ex: Example, video=None) -> list[int]:
        """The example's prompt ids, once per run; `video`: its embeddings if at hand."""
        from longrl.models.vlm import MERGE, PATCH, TEMPORAL_PATCH, video_prompt_ids

        if _key(ex) not in self._prompts:
            if self.reduction[0] == "none":
                N, H, W, _ = self.task.clips[ex.media[0]].frames.shape
                n_tokens = -(-N // TEMPORAL_PATCH) * (H // PATCH) * (W // PATCH) // (MERGE * MERGE)
            elif video is not None:
                n_tokens = video.n_tokens
            else:
                with torch.no_grad():
                    n_tokens = self._video(self.model, ex.media[0]).n_tokens
            self._prompts[_key(ex)] = video_prompt_ids(self.tokenizer, n_tokens, ex.prompt)
        return self._prompts[_key(ex)]

    def _encode(self, model, path: str, grad: bool):
        """The vision tower over one clip. Under SP, MR-SP stage 1: this rank encodes its run
        of temporal patches and every rank of the group gets all embeddings (collective:
        the ranks of a group encode the same videos in the same order). Either way the
        tower runs `video.encode_chunk` frames at a time. Then video.token_reduction."""
        from longrl.models.vlm import encode_frames, reduce_video
        from longrl.parallel.mrsp_encode import mrsp_encode_frames

        clip = self._clip(path)
        lay = dist.layout()
        with torch.set_grad_enabled(grad):
            if lay.sp_size == 1:
                video = encode_frames(model, clip.frames, clip.second_per_grid, self.encode_chunk)
            else:  # each rank patchifies and encodes only its own frames, in chunks
                video = mrsp_encode_frames(model, clip.frames, clip.second_per_grid, lay.sp_group, self.encode_chunk)
            return reduce_video(video, *self.reduction)

    def _clip(self, media: str):
        """The decoded frames of a task's video, or of a segment spec (`media.segments`)."""
        if media in self.task.clips:
            return self.task.clips[media]
        from longrl.data.video_task import VideoClip
        from longrl.media.segments import decode_segment
        from longrl.models.vlm import seconds_per_grid

        clip = decode_segment(media)
        return VideoClip(clip.frames, seconds_per_grid(clip.timestamps))

    def _cache_key(self, media: str) -> str:
        """A whole video's key: its file, the task's sampling and token reduction; a segment's:
        its file, range and sampling (segments are never reduced)."""
        from longrl.media.cache import cache_key
        from longrl.media.segments import Segment, is_segment
        from longrl.models.vlm import reduction_key

        if is_segment(media):
            seg = Segment.parse(media)
            return cache_key(seg.path, seg.cache_sampling(), self._tag)
        sampling = reduction_key(self.task.sampling.key(), *self.reduction)  # the reduction is cached too
        return cache_key(media, sampling, self._tag)

    def _cached(self, key: str, compute):
        """`cache.get_or_compute`; under SP the group agrees on hit or miss first, since the
        encode is collective and a shared disk cache may hold a file for one rank only."""
        lay = dist.layout()
        if lay.sp_size == 1:
            return self.cache.get_or_compute(key, compute)
        found = self.cache.get(key)
        if dist.all_reduce_sum(float(found is None), lay.sp_group) > 0:
            found = compute()
            self.cache.put(key, found)
        return found

    def _video(self, model, path: str):
        """This step's embeddings of `path`: encoded at most once per step (never again
        with a frozen tower, whose embeddings are cached across steps)."""
        from longrl.models.vlm import VideoEmbeds, vision_tag

        if path in self._step:
            return self._step[path]
        if self.train_vision:
            video = self._encode(model, path, grad=torch.is_grad_enabled())
            self.totals["encodes"] += 1
        else:
            self._tag = self._tag or vision_tag(model)  # frozen: the weights never change
            hits = self.cache.hits

            def compute():
                self.totals["encodes"] += 1
                v = self._encode(model, path, grad=False)
                out = {"embeds": v.embeds, "grid_thw": v.grid_thw, "spg": torch.tensor(v.second_per_grid, dtype=torch.float64)}
                return out if v.keep is None else {**out, "keep": v.keep}

            t = self._cached(self._cache_key(path), compute)
            self.totals["cache_hits"] += self.cache.hits - hits
            device = next(model.parameters()).device
            keep = t["keep"].bool().to(device) if "keep" in t else None
            video = VideoEmbeds(t["embeds"].to(device), t["grid_thw"].long().to(device), float(t["spg"]), keep)
        if self.proportional:  # derived from the keep mask (the cache holds that, not the bias)
            from longrl.models.vlm import with_key_bias

            video = with_key_bias(video)
        self._step[path] = video
        self.totals["tokens_kept"] += video.n_tokens
        self.totals["tokens_full"] += video.n_full
        return video

    def _positions_of(self, model, ex: Example, video) -> torch.Tensor:
        """Rotary positions [3, P] of the example's prompt, computed once per run."""
        from longrl.models.vlm import prompt_positions

        if _key(ex) not in self._positions:
            self._positions[_key(ex)] = prompt_positions(model, self._prompts[_key(ex)], video)
        return self._positions[_key(ex)]

    def start_step(self, version=None) -> None:
        """A new optimizer step: this step's embeddings are encoded afresh (trainable tower)."""
        if version is None or version != self._step_version:
            self._step = {}
        self._step_version = version

    # ---- rollout requests ---------------------------------------------------------------

    def requests(self, examples: list[Example], n: int | list[int] = 1, *, eval: bool = False) -> list[RolloutRequest]:
        """One request per example, carrying its video's embeddings and prompt positions.

        Training rollouts (eval=False) take the step's embeddings: encoded now if this step
        has not yet (under SP a collective: every rank of the group asks for the same videos
        in the same order), the graph kept for the update with a trainable tower; the
        backend reads them detached. Evaluation (eval=True) encodes outside the step's
        counts."""
        counts = n if isinstance(n, list) else [n] * len(examples)
        model = self.model
        if eval:
            videos = [self._eval_video(model, ex.media[0]) for ex in examples]
        else:
            with torch.set_grad_enabled(self.train_vision):
                videos = [self._video(model, ex.media[0]) for ex in examples]
            self.totals["naive_encodes"] += sum(counts)  # a pixel pipeline encodes in every rollout
        prompts = [self._prompt(ex, v) for ex, v in zip(examples, videos)]  # after: a reduced prompt needs its video
        videos = [v.detached() for v in videos]
        go_on = partial(self._continue, eval=eval)
        return [RolloutRequest(p, c, VideoPrompt(v, self._positions_of(model, ex, v), go_on))
                for p, c, ex, v in zip(prompts, counts, examples, videos)]

    def _continue(self, prompt: VideoPrompt, context_ids: list[int], media: list[tuple[str, int]], *,
                  eval: bool) -> VideoPrompt:
        """A multi-turn episode's next turn: the context (prompt + response so far) with the
        prompt's video and every segment a tool spliced in (`media`: [(spec, response
        offset)]), its M-RoPE positions over the whole context. A segment is encoded here, in
        the rollout loop's thread, once per step (`_video`: the cache every pass reuses)."""
        first = prompt.video.videos[0] if prompt.prompt_len else prompt.video
        P = prompt.prompt_len or prompt.positions.shape[1]
        get = self._eval_video if eval else self._video
        with torch.set_grad_enabled(self.train_vision and not eval):  # the update reuses this encode's graph
            segments = [get(self.model, spec) for spec, _ in media]
        if not eval:  # a pixel pipeline encodes every video of the context in every generate call
            self.totals["naive_encodes"] += 1 + len(media)
        seq = self._sequence(context_ids, P, [first, *segments], [at for _, at in media]).detached()
        with torch.no_grad():
            ids = torch.tensor([context_ids], device=first.embeds.device)  # [1, T]
            return replace(prompt, video=seq, positions=seq.positions(self.model, ids)[:, 0], prompt_len=P)

    def _sequence(self, ids, P: int, videos: list, offsets: list[int]):
        """`models.vlm_segments.VideoSequence` of a row: the prompt's video at its pads (within
        the P prompt ids), each segment at P + its response offset."""
        from longrl.models.vlm_segments import VideoSequence

        start = list(ids[:P]).index(self.model.config.video_token_id)
        return VideoSequence(videos, [start, *[P + at for at in offsets]])

    # ---- teacher-forced passes ----------------------------------------------------------

    def _hidden(self, model, mb, examples: list[Example], videos: dict) -> torch.Tensor:
        """Final hidden states [b, T, D] of the micro-batch, laid out like `mb` (right-padded);
        each distinct prompt is run once for all its rows."""
        from longrl.models.vlm import shared_prompt_hidden
        from longrl.models.vlm_segments import rows_hidden

        b, T = mb.input_ids.shape
        groups: dict[tuple[str, str], list[int]] = {}
        for i, ex in enumerate(examples):
            groups.setdefault(_key(ex), []).append(i)
        rows: list = [None] * b
        for key, idx in groups.items():
            ex = examples[idx[0]]
            prompt = self._prompts[key]
            P = len(prompt)
            video = videos[ex.media[0]]
            if any(_segments(examples[i]) for i in idx):  # a tool spliced segments into some rows
                rows_seq = [self._row_sequence(examples[i], mb.input_ids[i], P, videos) for i in idx]
                h_p, h_r = rows_hidden(model, rows_seq, prompt, self._positions_of(model, ex, video), mb.input_ids[idx])
            else:
                h_p, h_r = shared_prompt_hidden(model, video, prompt, self._positions_of(model, ex, video),
                                                mb.input_ids[idx, P:])  # [1, P, D], [n, T-P, D]
            for j, i in enumerate(idx):
                rows[i] = torch.cat([h_p[0], h_r[j]])  # [T, D]
        return torch.stack(rows)  # [b, T, D]

    def _row_sequence(self, ex: Example, ids: torch.Tensor, P: int, videos: dict):
        """Row `ids` [T] of `ex` (which holds segments) as a VideoSequence over `videos`."""
        return self._sequence(ids.tolist(), P, [videos[m] for m in ex.media], [at for _, at in _segments(ex)])

    def logprobs(self, mb, examples: list[Example], model=None, temperature: float | None = None) -> torch.Tensor:
        """Teacher-forced log-probs [b, T] of `mb` (no grad), on the step's embeddings;
        `model`: e.g. the frozen reference (default: the policy's model)."""
        from longrl.parallel.sp_video import sp_video_logprobs
        from longrl.streambp.logprobs import chunked_logprobs

        model = self.model if model is None else model
        chunk, temperature = self.chunk, self.temperature if temperature is None else temperature

        # A pixel pipeline encodes every video (and segment) of every sequence in every pass.
        self.totals["naive_encodes"] += sum(len(ex.media) for ex in examples)
        lay = dist.layout()
        with torch.no_grad():
            videos = {m: self._detached(model, m) for ex in examples for m in ex.media}  # segments too
            if lay.sp_size > 1:  # Ulysses on whole rows; every rank gets all [b, T] log-probs
                return sp_video_logprobs(model, [videos[ex.media[0]] for ex in examples], mb, lay.sp_group,
                                         chunk, temperature)
            hidden = self._hidden(model, mb, examples, videos)  # [b, T, D]
            head = model.get_output_embeddings()
            return chunked_logprobs(hidden, head.weight, head.bias, mb.targets, mb.mask, chunk, temperature)

    def _detached(self, model, path: str):
        return self._video(model, path).detached()

    def loss_and_backward(self, mb, examples: list[Example], loss_fn, temperature: float | None = None):
        """Forward, loss and backward for a micro-batch; gradients accumulate in `.grad`
        (the vision tower's too when it is trainable). -> (loss, metrics, logprobs [b, T])

        Sequence parallel: Ulysses on whole rows; the gradients are this rank's positions'
        share (summed over the world by the recipe), and a trainable tower's backward goes
        through the MR-SP gather, which sums the embedding gradient over the group first."""
        from longrl.models.vlm import as_leaf
        from longrl.parallel.sp_video import sp_video_loss_and_backward
        from longrl.streambp.logprobs import backward_chunked_head

        model, chunk = self.model, self.chunk
        temperature = self.temperature if temperature is None else temperature
        self.totals["naive_encodes"] += sum(len(ex.media) for ex in examples)
        with torch.set_grad_enabled(self.train_vision):
            full = {m: self._video(model, m) for ex in examples for m in ex.media}  # segments too
        leaves = {p: as_leaf(v) if self.train_vision else v for p, v in full.items()}
        lay = dist.layout()
        if lay.sp_size > 1:
            loss, metrics, logp = sp_video_loss_and_backward(model, [leaves[ex.media[0]] for ex in examples], mb,
                                                             loss_fn, lay.sp_group, chunk=chunk,
                                                             temperature=temperature)
        elif self.streambp:
            loss, metrics, logp = self._streambp(model, mb, examples, leaves, loss_fn, chunk, temperature)
        else:
            hidden = self._hidden(model, mb, examples, leaves)  # [b, T, D]
            head = model.get_output_embeddings()
            loss, metrics, grad_h, logp = backward_chunked_head(hidden, head.weight, head.bias, mb.targets, mb.mask,
                                                                loss_fn, chunk, temperature)
            hidden.backward(grad_h)
        if self.train_vision:  # one backward through the tower per video, from its summed gradient;
            for p, v in full.items():  # the graph is kept: a later micro-batch of the step may use it
                grad = leaves[p].embeds.grad
                if grad is None and lay.sp_size > 1:  # the gather's backward is collective: join it
                    grad = torch.zeros_like(leaves[p].embeds)
                if grad is not None:
                    v.embeds.backward(grad, retain_graph=True)
        return loss, metrics, logp

    def _streambp(self, model, mb, examples: list[Example], videos: dict, loss_fn, chunk: int, temperature: float):
        """StreamBP on whole rows: each row's token embeddings with its video spliced in and
        its M-RoPE positions, then `streambp.logprobs.streambp_loss_and_backward` (gradients flow on into
        the embeddings: the token table and, when trainable, the video leaves). A row with
        segments from a tool gets its own layout (`_row_sequence`)."""
        from longrl.models.vlm import key_bias_columns, mrope_position_ids, video_inputs_embeds
        from longrl.streambp.logprobs import streambp_loss_and_backward

        embeds, positions = [None] * len(examples), [None] * len(examples)
        biases = [torch.zeros(mb.input_ids.shape[1], device=mb.input_ids.device)] * len(examples)  # [T] each
        by_video: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            if _segments(ex):
                seq = self._row_sequence(ex, mb.input_ids[i], len(self._prompts[_key(ex)]), videos)
                embeds[i] = seq.inputs_embeds(model, mb.input_ids[i : i + 1])[0]  # [T, D]
                positions[i] = seq.positions(model, mb.input_ids[i : i + 1])[:, 0]  # [3, T]
            else:
                by_video.setdefault(ex.media[0], []).append(i)
        for path, idx in by_video.items():
            ids = mb.input_ids[idx]  # [n, T]
            e = video_inputs_embeds(model, ids, videos[path])  # [n, T, D]
            p = mrope_position_ids(model, ids, videos[path])  # [3, n, T]
            b = key_bias_columns(model, ids, videos[path])  # [n, T] or None
            for j, i in enumerate(idx):
                embeds[i], positions[i] = e[j], p[:, j]
                if b is not None:
                    biases[i] = b[j]
        key_bias = torch.stack(biases) if self.proportional else None  # [b, T]
        return streambp_loss_and_backward(model, mb, loss_fn, chunk=chunk, temperature=temperature,
                                          inputs_embeds=torch.stack(embeds), position_ids=torch.stack(positions, 1),
                                          key_bias=key_bias)

    # ---- evaluation and counts ----------------------------------------------------------

    def _eval_video(self, model, path: str):
        """Embeddings for evaluation, outside any training step and its counts."""
        if self.train_vision:  # the weights move: encode afresh
            return self._encode(model, path, grad=False)
        saved, in_step = dict(self.totals), path in self._step
        video = self._video(model, path)  # frozen: from the run's cache after the first time
        if not in_step:
            self._step.pop(path)
        self.totals = saved
        return video

    def step_metrics(self) -> dict:
        """Since the last call: encodes run, saved (vs one per rollout and per sequence per
        pass), cache hits; and the fraction of video tokens kept by video.token_reduction
        over the distinct videos the step used (1.0 with 'none'; absent when it used none)."""
        d = {k: self.totals[k] - self._last[k] for k in self.totals}
        self._last = dict(self.totals)
        out = {"video/encodes": d["encodes"], "video/encodes_saved": d["naive_encodes"] - d["encodes"],
               "video/cache_hits": d["cache_hits"]}
        if d["tokens_full"] > 0:
            out["video/tokens_kept_frac"] = d["tokens_kept"] / d["tokens_full"]
        return out

    def summary(self) -> dict:
        out = {"video_encodes": self.totals["encodes"],
               "video_encodes_saved": self.totals["naive_encodes"] - self.totals["encodes"],
               "video_cache_hits": self.totals["cache_hits"]}
        if self.totals["tokens_full"] > 0:
            out["video_tokens_kept_frac"] = self.totals["tokens_kept"] / self.totals["tokens_full"]
        return out


def load_video_policy(cfg: ModelConfig, device, train_vision: bool = False, extra_tokens: tuple[str, ...] = ()):
    """(model, tokenizer): a local Qwen2.5-VL directory or the tiny one shaped by `cfg.tiny`
    (text model) with the default small vision tower; frozen tower unless `train_vision`;
    with `cfg.lora.r > 0` a fresh LoRA adapter on the language model."""
    from longrl.models.load import DTYPES
    from longrl.models.vlm import TinyVLMShape, load_vlm

    t = cfg.tiny
    shape = replace(TinyVLMShape(), hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                    num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size,
                    max_position_embeddings=t.max_position_embeddings)
    model, tok = load_vlm(cfg.path, shape, extra_tokens)  # extra_tokens: the tiny tokenizer's tool-call tags
    model = model.to(device=device, dtype=DTYPES[cfg.dtype])
    model.model.visual.requires_grad_(train_vision)
    model.config.use_cache = False
    if cfg.lora.r > 0:  # a fresh adapter on the language model; the tower stays frozen (`models.lora`)
        from longrl.models.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    return model, tok
