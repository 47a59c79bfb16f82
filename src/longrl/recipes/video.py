"""Video GRPO: CoT-SFT then GRPO on video questions, each video encoded once per step.

"Scaling RL to Long Videos" (LongVILA-R1, arXiv 2507.07966) trains a video-language model
in two stages (CoT-SFT, then RL) with MR-SP, whose first stage runs the vision tower once per
video and reuses the embeddings for every rollout and every training pass of the step. The
loops themselves are the text recipes' (`recipes/train.py`, `sft.py`, `grpo.py`); this module
supplies what differs for video and hands it to them as `io`:

    load_video_task    JSONL of video questions (generated with `data/videos.py` if the
                       data directory does not exist); every clip decoded once, up front
    load_video_policy  tiny Qwen2.5-VL built in code (or a local checkpoint); the vision
                       tower frozen unless `video.train_vision`
    VideoIO            prompts with the video's tokens; rollouts, log-probs and the update on
                       cached embeddings; greedy evaluation; counts of encodes saved

Per RL step and video: one vision encode (none at all with a frozen tower after the first
step: the embeddings are cached across steps, on disk too with `video.embed_cache_dir`);
the prompt's rotary positions computed once per prompt for the whole run; the prompt
(video + question) run through the language model once per pass and shared by the G
responses (`models.vlm.shared_prompt_hidden`, exact). A pipeline that hands pixels to every
forward encodes G times in the rollouts and once per sequence in each training pass; the
difference is logged as `video/encodes_saved`.

Letters: N prompts per step, G samples per prompt, B = N*G, T tokens, D hidden, P prompt.

Departures:
- Clips are decoded once at start and held in memory as uint8 frames (fine for the small
  generated sets; a large set would stream them).
- Rollouts are synchronous: no APRIL (`rollout.partial`) for video yet.
- Sequence parallelism (`parallel.sp_size` = P > 1) is MR-SP: each video's temporal
  patches are split over the P ranks of the SP group and the embeddings all-gathered once
  (`parallel.mrsp_encode`); each rank samples 1/P of the step's rollout rows (shares
  all-gathered, as the text recipe does); the teacher-forced passes run Ulysses on whole
  rows (`parallel.sp_video`), so the shared-prompt saving is not used there. Evaluation
  is not split: every rank of a group decodes the whole held-out set. Plain torchrun data
  parallelism (sp_size 1) splits the prompts as for text. Both are tested equal to one
  process (`tests/parallel/test_parallel_sp_video.py`).
- The update runs the chunked LM head with an ordinary backward through the layers
  (`train.backprop=chunked`, sharing each prompt's run between its rows), or StreamBP's
  sequence-chunked layer backward on whole rows (`train.backprop=streambp`: the cached video
  embeddings spliced into each row's token embeddings, the model's M-RoPE positions; the
  gradient flows on into the token embeddings and a trainable tower). Equal gradients,
  tested; StreamBP keeps activation memory independent of the row length, the point for
  long videos. Not with sequence parallelism.
- A trainable vision tower gets one backward per micro-batch (one per step with the default
  micro-batch >= B), through the graph of the step's single encode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from longrl.config import Config, ModelConfig
from longrl.data.example import Example
from longrl.errors import UserError
from longrl.parallel import dist

log = logging.getLogger(__name__)

TASK_NAME = "videos"
"""`task.name` that selects this recipe."""
GENERATOR_KWARGS = ("kinds", "min_seconds", "max_seconds", "fps", "slip")
"""`task.kwargs` passed to the video generator when the data directory does not exist."""


# ----------------------------------------------------------------------------------------
# Data: JSONL of video questions, clips decoded once
# ----------------------------------------------------------------------------------------


@dataclass
class VideoClip:
    frames: torch.Tensor
    """Sampled, resized RGB frames. [N, H, W, 3] uint8"""
    second_per_grid: float
    """Seconds per temporal grid step (Qwen2.5-VL's second_per_grid_ts)."""


@dataclass
class VideoTask:
    """What `train.py` needs of a task (name, train, eval, score) plus the decoded clips."""

    name: str
    train: list[Example]
    eval: list[Example]
    score: object
    clips: dict[str, VideoClip]
    """Video path -> clip; examples name theirs in `media[0]`."""
    sampling: object
    """The `media.frames.FrameSampling` the clips were taken with (part of the cache key)."""


def frame_sampling(cfg: Config):
    from longrl.media.frames import PATCH_FACTOR, FrameSampling

    return FrameSampling(fps=cfg.video.fps or None, max_frames=cfg.video.max_frames,
                         min_pixels=min(4 * PATCH_FACTOR * PATCH_FACTOR, cfg.video.max_pixels),
                         max_pixels=cfg.video.max_pixels)


def check_config(cfg: Config) -> None:
    """Settings the video recipe does not support, refused before anything runs."""
    if not cfg.task.train_file:
        raise UserError("task.name=videos needs task.train_file=DIR/train.jsonl (generated there if DIR does not exist)")
    if cfg.rollout.partial:
        raise UserError("rollout.partial=true (APRIL) is not supported for video yet; set rollout.partial=false")
    if cfg.train.backprop not in ("chunked", "streambp"):
        raise UserError(f"train.backprop={cfg.train.backprop}: the video recipe runs train.backprop=chunked or streambp")
    if cfg.train.backprop == "streambp" and cfg.parallel.sp_size > 1:
        raise UserError("train.backprop=streambp with parallel.sp_size>1 is not supported for video; use train.backprop=chunked")
    if cfg.video.train_vision and cfg.rl.ppo_epochs > 1:
        raise UserError("video.train_vision=true needs rl.ppo_epochs=1 (the step's single encode is stale after the first update)")
    if cfg.video.train_vision and cfg.rl.kl_coef > 0:
        raise UserError("video.train_vision=true with rl.kl_coef>0 is not supported (the reference would need its own vision tower)")
    bad = sorted(set(cfg.task.kwargs) - set(GENERATOR_KWARGS))
    if bad:
        raise UserError(f"task.kwargs.{bad[0]}: the video task takes only {', '.join(GENERATOR_KWARGS)} (for generating data)")


def _generate_if_missing(cfg: Config, train_file: Path) -> None:
    """A fresh clone has no data: write the videos the config describes (small by design)."""
    from longrl.data.videos import generate

    if train_file.parent.exists():
        if not train_file.is_file():
            raise UserError(f"task.train_file '{train_file}' does not exist (its directory does, so nothing was generated); "
                            "give an existing JSONL or a directory that does not exist yet")
        return
    kw = dict(cfg.task.kwargs)
    kinds = kw.get("kinds", "colour")
    kinds = tuple(k.strip() for k in kinds.split(",")) if isinstance(kinds, str) else tuple(kinds)
    n = cfg.task.n_train + cfg.task.n_eval
    if n > 2000:
        raise UserError(f"task.n_train + task.n_eval = {n}: generating more than 2000 videos in a training run is not "
                        "intended; generate them first with `longrl data videos`")
    log.warning("generating %d videos into %s", n, train_file.parent)
    generate(train_file.parent, n, seed=cfg.task.seed, min_s=float(kw.get("min_seconds", 8.0)),
             max_s=float(kw.get("max_seconds", 30.0)), fps=int(kw.get("fps", 2)),
             eval_frac=cfg.task.n_eval / n, kinds=kinds, slip=float(kw.get("slip", 0.0)))


def _decode_all(examples: list[Example], sampling, split: str, clips: dict) -> list[Example]:
    """Decode every example's video once; examples whose video cannot be read are dropped
    with a warning and a count (never a crash mid-run)."""
    from longrl.media.frames import load_clip
    from longrl.models.vlm import seconds_per_grid

    kept, bad = [], []
    for ex in examples:
        if len(ex.media) != 1:
            raise UserError(f"{split} example {ex.id!r} has {len(ex.media)} media paths; a video question needs exactly one")
        path = ex.media[0]
        if path not in clips:
            try:
                clip = load_clip(path, sampling)
            except UserError as e:
                bad.append(str(e))
                clips[path] = None
                continue
            clips[path] = VideoClip(clip.frames, seconds_per_grid(clip.timestamps))
        if clips[path] is not None:
            kept.append(ex)
    if bad:
        log.warning("skipped %d of %d %s examples whose video could not be read (first: %s)",
                    len(examples) - len(kept), len(examples), split, bad[0])
    if not kept:
        raise UserError(f"no {split} example has a readable video ({bad[0] if bad else 'no examples'}); check the data directory")
    return kept


def load_video_task(cfg: Config) -> VideoTask:
    """Train and held-out video questions with their clips decoded. Bad input -> UserError."""
    from longrl.data.jsonl import load_jsonl_examples
    from longrl.rewards.verifiers import answer_scorer

    check_config(cfg)
    from longrl.media.decode import import_av

    import_av()  # before generating anything: without PyAV, one clear error and nothing written
    train_file = Path(cfg.task.train_file)
    # Under torchrun one rank generates missing data while the others wait for it (and for
    # its error, so that every rank stops with the same message rather than hanging).
    error = None
    if dist.is_main():
        try:
            _generate_if_missing(cfg, train_file)
        except UserError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)
    eval_file = Path(cfg.task.eval_file) if cfg.task.eval_file else train_file.parent / "eval.jsonl"
    train = load_jsonl_examples(train_file)[: cfg.task.n_train]
    held = load_jsonl_examples(eval_file)[: cfg.task.n_eval]
    sampling = frame_sampling(cfg)
    clips: dict = {}
    train, held = _decode_all(train, sampling, "train", clips), _decode_all(held, sampling, "held-out", clips)
    auto = cfg.reward.correctness in ("auto", "judge")  # a judge replaces the scorer later (train.load_task_and_io)
    score = answer_scorer("mcq" if auto else cfg.reward.correctness)
    return VideoTask(f"videos:{train_file.parent.name}", train, held, score,
                     {p: c for p, c in clips.items() if c is not None}, sampling)


def load_video_policy(cfg: ModelConfig, device, train_vision: bool = False):
    """(model, tokenizer): a local Qwen2.5-VL directory or the tiny one shaped by `cfg.tiny`
    (text model) with the default small vision tower; frozen tower unless `train_vision`."""
    from longrl.models.load import DTYPES
    from longrl.models.vlm import TinyVLMShape, load_vlm

    t = cfg.tiny
    shape = replace(TinyVLMShape(), hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                    num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size,
                    max_position_embeddings=t.max_position_embeddings)
    model, tok = load_vlm(cfg.path, shape)
    model = model.to(device=device, dtype=DTYPES[cfg.dtype])
    model.model.visual.requires_grad_(train_vision)
    model.config.use_cache = False
    return model, tok


# ----------------------------------------------------------------------------------------
# VideoIO: what the text recipes call instead of their token-only forward
# ----------------------------------------------------------------------------------------


def _key(ex: Example) -> tuple[str, str]:
    return ex.media[0], ex.prompt


class VideoIO:
    """Video prompts, rollouts, log-probs and backward on cached embeddings.

    `sft.run_sft`, `grpo.grpo_step` and `train.train` take it as `io`; `examples[i]` is the
    example that row i of a batch answers.
    """

    def __init__(self, task: VideoTask, cfg: Config):
        from longrl.media.cache import EmbeddingCache

        self.task, self.train_vision = task, cfg.video.train_vision
        self.streambp = cfg.train.backprop == "streambp"
        # Frozen tower: embeddings are constants, cached for the whole run (and on disk).
        self.cache = None if self.train_vision else EmbeddingCache(cfg.video.embed_cache_dir or None,
                                                                   max_items=len(task.clips) + 1)
        self._tag = ""
        # Keyed by (video path, prompt text): ids may repeat across a train and an eval file.
        self._prompts: dict[tuple[str, str], list[int]] = {}
        self._positions: dict[tuple[str, str], torch.Tensor] = {}
        self._step: dict[str, object] = {}  # video path -> this step's VideoEmbeds
        self._step_version = None
        self.totals = {"encodes": 0, "naive_encodes": 0, "cache_hits": 0}
        self._last = dict(self.totals)

    # ---- prompts and videos -------------------------------------------------------------

    def encode_prompts(self, tokenizer, examples: list[Example]) -> list[list[int]]:
        """Prompt ids with the video pad expanded to the clip's number of video tokens."""
        from longrl.models.vlm import MERGE, PATCH, TEMPORAL_PATCH, video_prompt_ids

        out = []
        for ex in examples:
            if _key(ex) not in self._prompts:
                N, H, W, _ = self.task.clips[ex.media[0]].frames.shape
                n_tokens = -(-N // TEMPORAL_PATCH) * (H // PATCH) * (W // PATCH) // (MERGE * MERGE)
                self._prompts[_key(ex)] = video_prompt_ids(tokenizer, n_tokens, ex.prompt)
            out.append(self._prompts[_key(ex)])
        return out

    def _encode(self, model, path: str, grad: bool):
        """The vision tower over one clip. Under SP, MR-SP stage 1: this rank encodes its run
        of temporal patches and every rank of the group gets all embeddings (collective:
        the ranks of a group encode the same videos in the same order)."""
        from longrl.models.vlm import VideoEmbeds, encode_video, patchify
        from longrl.parallel.mrsp_encode import mrsp_encode_video

        clip = self.task.clips[path]
        device = next(model.parameters()).device
        pv, grid = patchify(clip.frames)
        pv, grid = pv.to(device), grid.to(device)
        lay = dist.layout()
        with torch.set_grad_enabled(grad):
            if lay.sp_size == 1:
                return encode_video(model, pv, grid, clip.second_per_grid)
            embeds = mrsp_encode_video(model.model.visual, pv, grid, lay.sp_group)  # [Nv, D]
            return VideoEmbeds(embeds, grid.view(3), clip.second_per_grid)

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
        from longrl.media.cache import cache_key
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
                return {"embeds": v.embeds, "grid_thw": v.grid_thw, "spg": torch.tensor(v.second_per_grid, dtype=torch.float64)}

            t = self._cached(cache_key(path, self.task.sampling.key(), self._tag), compute)
            self.totals["cache_hits"] += self.cache.hits - hits
            device = next(model.parameters()).device
            video = VideoEmbeds(t["embeds"].to(device), t["grid_thw"].long().to(device), float(t["spg"]))
        self._step[path] = video
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

    # ---- rollouts -----------------------------------------------------------------------

    def rollout(self, model, tokenizer, examples: list[Example], task, cfg: Config, sampler, version: int):
        """G samples per prompt on cached embeddings -> `grpo.Rollouts` (groups contiguous).

        Sequence parallel: every rank of the group encodes the videos (MR-SP: its share of
        each), then samples a contiguous 1/P of the N*G rows with its own sampler; the shares
        are all-gathered, so the ranks hold the same rows, each sampled once (as `grpo.rollout`)."""
        from longrl.models.vlm import VideoEmbeds
        from longrl.recipes.grpo import _concat, _score

        G = cfg.rl.group_size
        self.start_step(version)
        prompts = self.encode_prompts(tokenizer, examples)
        # With a trainable tower the step's encode keeps its graph for the update; the
        # rollouts and old log-probs read the same numbers, detached.
        with torch.set_grad_enabled(self.train_vision):
            videos = [self._video(model, ex.media[0]) for ex in examples]
        videos = [VideoEmbeds(v.embeds.detach(), v.grid_thw, v.second_per_grid) for v in videos]
        positions = [self._positions_of(model, ex, v) for ex, v in zip(examples, videos)]
        self.totals["naive_encodes"] += G * len(examples)  # a pixel pipeline encodes in every rollout
        lay = dist.layout()
        mine = dist.shard_indices(len(examples) * G, lay.sp_rank, lay.sp_size)  # all rows when sp_size == 1
        part = None
        if mine:
            responses, logps = self._sample_rows(model, videos, prompts, positions, [i // G for i in mine], cfg,
                                                 tokenizer.eos_token_id, sampler)
            finish = ["stop" if r and r[-1] == tokenizer.eos_token_id else "length" for r in responses]
            part = _score(tokenizer, task, cfg, [examples[i // G] for i in mine], [prompts[i // G] for i in mine],
                          responses, logps, [[version] * len(r) for r in responses], finish)
        if lay.sp_size == 1:
            return part
        return _concat([r for r in dist.all_gather_object(part, lay.sp_group) if r is not None])

    @staticmethod
    def _sample_rows(model, videos, prompts, positions, row_prompt: list[int], cfg: Config, eos_id: int, sampler):
        """Samples for rows that answer prompts `row_prompt` (sorted, each prompt's rows
        contiguous): prompts with the same number of rows are decoded together, each prompt
        prefilled once. -> (responses, log-probs) in row order."""
        from longrl.models.vlm import sample_prompts

        runs: list[list[int]] = []  # [prompt, rows]; one run per prompt in a whole group
        for j in row_prompt:
            if runs and runs[-1][0] == j:
                runs[-1][1] += 1
            else:
                runs.append([j, 1])
        out: dict[int, tuple] = {}
        for n in sorted({c for _, c in runs}):  # one size without SP; an edge prompt of a share may differ
            ks = [k for k, (_, c) in enumerate(runs) if c == n]
            js = [runs[k][0] for k in ks]
            resp, lp = sample_prompts(model, [videos[j] for j in js], [prompts[j] for j in js],
                                      [positions[j] for j in js], n, cfg.rollout.max_new_tokens, eos_id,
                                      cfg.rollout.temperature, sampler, top_p=cfg.rollout.top_p)
            for t, k in enumerate(ks):
                out[k] = (resp[t * n : (t + 1) * n], lp[t * n : (t + 1) * n])
        return ([r for k in range(len(runs)) for r in out[k][0]],
                [x for k in range(len(runs)) for x in out[k][1]])

    # ---- teacher-forced passes ----------------------------------------------------------

    def _hidden(self, model, mb, examples: list[Example], videos: dict) -> torch.Tensor:
        """Final hidden states [b, T, D] of the micro-batch, laid out like `mb` (right-padded);
        each distinct prompt is run once for all its rows."""
        from longrl.models.vlm import shared_prompt_hidden

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
            h_p, h_r = shared_prompt_hidden(model, video, prompt, self._positions_of(model, ex, video),
                                            mb.input_ids[idx, P:])  # [1, P, D], [n, T-P, D]
            for j, i in enumerate(idx):
                rows[i] = torch.cat([h_p[0], h_r[j]])  # [T, D]
        return torch.stack(rows)  # [b, T, D]

    def logprobs(self, model, mb, examples: list[Example], chunk: int, temperature: float) -> torch.Tensor:
        """Teacher-forced log-probs [b, T] of `mb` (no grad), on the step's embeddings."""
        from longrl.streambp.logprobs import chunked_logprobs

        from longrl.parallel.sp_video import sp_video_logprobs

        self.totals["naive_encodes"] += len(examples)  # one encode per sequence in a pixel pipeline
        lay = dist.layout()
        with torch.no_grad():
            videos = {ex.media[0]: self._detached(model, ex.media[0]) for ex in examples}
            if lay.sp_size > 1:  # Ulysses on whole rows; every rank gets all [b, T] log-probs
                return sp_video_logprobs(model, [videos[ex.media[0]] for ex in examples], mb, lay.sp_group,
                                         chunk, temperature)
            hidden = self._hidden(model, mb, examples, videos)  # [b, T, D]
            head = model.get_output_embeddings()
            return chunked_logprobs(hidden, head.weight, head.bias, mb.targets, mb.mask, chunk, temperature)

    def _detached(self, model, path: str):
        from longrl.models.vlm import VideoEmbeds

        v = self._video(model, path)
        return VideoEmbeds(v.embeds.detach(), v.grid_thw, v.second_per_grid)

    def loss_and_backward(self, model, mb, examples: list[Example], loss_fn, chunk: int, temperature: float = 1.0):
        """Forward, loss and backward for a micro-batch; gradients accumulate in `.grad`
        (the vision tower's too when it is trainable). -> (loss, metrics, logprobs [b, T])

        Sequence parallel: Ulysses on whole rows; the gradients are this rank's positions'
        share (summed over the world by the recipe), and a trainable tower's backward goes
        through the MR-SP gather, which sums the embedding gradient over the group first."""
        from longrl.models.vlm import as_leaf
        from longrl.parallel.sp_video import sp_video_loss_and_backward
        from longrl.streambp.logprobs import backward_chunked_head

        self.totals["naive_encodes"] += len(examples)
        with torch.set_grad_enabled(self.train_vision):
            full = {ex.media[0]: self._video(model, ex.media[0]) for ex in examples}
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

    @staticmethod
    def _streambp(model, mb, examples: list[Example], videos: dict, loss_fn, chunk: int, temperature: float):
        """StreamBP on whole rows: each row's token embeddings with its video spliced in and
        its M-RoPE positions, then `streambp.layers.loss_and_backward` (gradients flow on into
        the embeddings: the token table and, when trainable, the video leaves)."""
        from longrl.models.vlm import mrope_position_ids, video_inputs_embeds
        from longrl.streambp import layers

        embeds, positions = [None] * len(examples), [None] * len(examples)
        by_video: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            by_video.setdefault(ex.media[0], []).append(i)
        for path, idx in by_video.items():
            ids = mb.input_ids[idx]  # [n, T]
            e = video_inputs_embeds(model, ids, videos[path])  # [n, T, D]
            p = mrope_position_ids(model, ids, videos[path])  # [3, n, T]
            for j, i in enumerate(idx):
                embeds[i], positions[i] = e[j], p[:, j]
        return layers.loss_and_backward(model, mb, loss_fn, chunk=chunk, temperature=temperature,
                                        inputs_embeds=torch.stack(embeds), position_ids=torch.stack(positions, 1))

    # ---- evaluation and counts ----------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, tokenizer, examples: list[Example], score, *, max_new_tokens: int,
                 batch_size: int, return_items: bool = False) -> dict:
        """Greedy accuracy: {"eval/accuracy", "eval/format", "eval/response_len"} (+ "items")."""
        from longrl.eval.accuracy import score_responses_greedy
        from longrl.models.vlm import sample_prompts

        prompts = self.encode_prompts(tokenizer, examples)
        responses = []
        for s in range(0, len(examples), batch_size):
            exs = examples[s : s + batch_size]
            videos = [self._eval_video(model, ex.media[0]) for ex in exs]
            positions = [self._positions_of(model, ex, v) for ex, v in zip(exs, videos)]
            batch, _ = sample_prompts(model, videos, prompts[s : s + batch_size], positions, 1, max_new_tokens,
                                      tokenizer.eos_token_id, temperature=0.0)
            responses += batch
        return score_responses_greedy(tokenizer, examples, responses, score, return_items)

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
        """Encodes since the last call: run, saved (vs one per rollout and per sequence per pass), cache hits."""
        d = {k: self.totals[k] - self._last[k] for k in self.totals}
        self._last = dict(self.totals)
        return {"video/encodes": d["encodes"], "video/encodes_saved": d["naive_encodes"] - d["encodes"],
                "video/cache_hits": d["cache_hits"]}

    def summary(self) -> dict:
        return {"video_encodes": self.totals["encodes"],
                "video_encodes_saved": self.totals["naive_encodes"] - self.totals["encodes"],
                "video_cache_hits": self.totals["cache_hits"]}
