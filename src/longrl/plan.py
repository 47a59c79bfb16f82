"""`longrl plan`: the peak memory per rank of one RL step, piece by piece, and the settings that fit.

Users of verl and EasyR1 hand-tune sequence parallelism, backprop mode and micro-batch
until a run stops running out of memory. This planner estimates, for the run's config
(model, frames, group size, prompts per step, world size, SP degree, FSDP, LoRA, dtype,
backprop mode), the bytes each piece holds at its peak, and searches the settings that fit
a memory budget (`--memory-gib`).

The model's shape comes from its config only: the tiny default, the tiny VLM, or a model
directory's config.json, built on torch's meta device (exact parameter counts, no weights
read). The step is modelled phase by phase, as `recipes/grpo.py` runs it:

    resident   weights, reference copy (KL or DPO, no LoRA), AdamW moments, the step's frames
    encode     the vision tower over `video.encode_chunk` frames at a time (no grad, frozen)
    rollout    KV cache of the step's rows (prompt prefilled once per prompt, repeated to G)
    logprobs   old / reference log-probs (no grad; the shared prompt's cache repeated to G)
    update     activations of the backprop mode, logits, gradients

    peak = resident + max over phases (each phase's transient bytes)

Activations per token and layer are counted from the Hugging Face Qwen2 / Qwen2.5-VL
decoder layer as autograd keeps them (fp32: 8 hidden-sized tensors, 2 key/value-sized,
4 MLP-sized, one fp32 log-sum-exp per head): `layer_saved`. Each backprop mode keeps:

    standard     every layer's saved tensors + [b, T, V] logits (log-softmax and its grad)
    chunked      every layer's saved tensors + one chunk of logits
    checkpoint   every layer's input + one layer's saved tensors (recomputed)
    streambp     every layer's input, K/V and their grads, one chunk's graph (arXiv 2506.03077)

Video: the video policy runs `chunked` with the prompt shared by its G rows (the prompt's
activations once, its KV cache repeated to the rows) and `streambp` on whole rows; under
`parallel.sp_size` P, Ulysses on whole rows (T/P tokens per rank, the all-to-all's full
sequence for H/P heads). `--video-keep` is the fraction of video tokens token reduction
keeps (content-dependent: the planner cannot know it; measure it with the bench); with
token reduction on, at least 1 / (1 + `video.max_unseen`) (the refresh). Proportional
attention (`video.proportional_attention`, with reduction) costs one more head dimension
in the attention inputs (`models.key_bias`, not counted: 1/head_dim of q and k) and, under
StreamBP, float instead of boolean chunk masks (`_bias_masks`).

Checked against measured peaks on a CPU (peak resident growth per rank): the long-video
bench's rows at 256 / 1,024 / 3,600 frames are within 0.85-1.06 of the estimate
(BENCHMARKS.md); tests/test_plan.py measures two tiny cases. Departures: allocator slack,
Python objects and the framework's own buffers are not modelled; FSDP counts the full
weights gathered during the passes (longrl gathers once per step); data-parallel replicas
hold their share of the step's prompts; the video task's other clips (decoded up front) are
not counted, only the step's videos; a trainable vision tower's kept graph is not counted.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, replace

from longrl.config import Config
from longrl.errors import UserError

GIB = 2**30
PATCH, TEMPORAL, MERGE = 14, 2, 2
TEXT_PROMPT_TOKENS = 64
"""Prompt length assumed for text tasks (the config does not say; `--prompt-tokens`)."""
VIDEO_TEXT_TOKENS = 64
"""Text tokens of a video prompt around its video tokens (chat template + question)."""
UNSET_RESPONSE_TOKENS = 256
"""Response length assumed when rollout.max_new_tokens is 0 (derived from the data at run time)."""
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
MODES = ("standard", "chunked", "checkpoint", "streambp")


@dataclass
class ModelShape:
    """What the planner needs of a model: counts from a meta-device build of its config."""

    params: int
    """All parameters (text + vision)."""
    vision_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_params: int = 0
    """Parameters of a LoRA adapter of model.lora.r on model.lora.target_modules (0: none)."""
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_depth: int = 0
    is_vlm: bool = False


# ----------------------------------------------------------------------------------------
# The model's shape, from its config only
# ----------------------------------------------------------------------------------------


def describe_model(cfg: Config) -> ModelShape:
    """Build the run's model on the meta device (no memory, no weights read) and count."""
    import torch

    with torch.device("meta"):
        model = _meta_model(cfg)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    visual = getattr(getattr(model, "model", None), "visual", None)
    vis_cfg = getattr(model.config, "vision_config", None)
    heads = text.num_attention_heads
    shape = ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        vision_params=sum(p.numel() for p in visual.parameters()) if visual is not None else 0,
        hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
        heads=heads, kv_heads=getattr(text, "num_key_value_heads", heads) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
        is_vlm=visual is not None,
    )
    if visual is not None:
        shape = replace(shape, vision_hidden=vis_cfg.hidden_size, vision_intermediate=vis_cfg.intermediate_size,
                        vision_depth=vis_cfg.depth)
    if cfg.model.lora.r > 0:
        shape = replace(shape, lora_params=_lora_params(model, cfg.model.lora))
    return shape


def _meta_model(cfg: Config):
    from longrl.data.video_task import TASK_NAME

    if cfg.model.path:
        import longrl.models.gla_hf  # noqa: F401  registers the GLA model type
        from transformers import AutoConfig, AutoModelForCausalLM

        from longrl.models.load import resolve_model_path

        path = resolve_model_path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise UserError(f"model.path={cfg.model.path}: no config.json there; give a Hugging Face model directory")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type in ("qwen2_5_vl", "qwen2_vl"):
            from transformers import Qwen2_5_VLForConditionalGeneration

            return Qwen2_5_VLForConditionalGeneration._from_config(config)
        return AutoModelForCausalLM.from_config(config)
    if cfg.task.name == TASK_NAME:
        from longrl.models.vlm import TinyVLMShape, build_tiny_vlm, build_vlm_tokenizer

        t = cfg.model.tiny
        shape = replace(TinyVLMShape(), hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                        num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size,
                        max_position_embeddings=t.max_position_embeddings)
        return build_tiny_vlm(build_vlm_tokenizer(), shape)
    if cfg.model.arch == "gla":
        raise UserError("longrl plan models softmax-attention decoders (qwen2, llama, Qwen2.5-VL); model.arch=gla "
                        "is not planned yet")
    from longrl.models.tiny import build_tiny_model, build_tiny_tokenizer

    return build_tiny_model(cfg.model.tiny, build_tiny_tokenizer())


def _lora_params(model, lora) -> int:
    """r * (in + out) for every adapted Linear of the text model (peft's A and B)."""
    import torch

    targets = set(lora.target_modules)
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or "visual" in name or name.endswith("lm_head"):
            continue
        if "all-linear" in targets or name.rsplit(".", 1)[-1] in targets:
            n += lora.r * (mod.in_features + mod.out_features)
    return n


# ----------------------------------------------------------------------------------------
# The step, piece by piece
# ----------------------------------------------------------------------------------------


@dataclass
class StepShape:
    """Token counts of one rank's step."""

    prompts: int  # N prompts this replica holds
    group: int  # G
    prompt_len: int  # P tokens (video tokens + text)
    response_len: int  # R
    video_tokens: int  # Nv per video, after reduction (0: text)
    video_tokens_full: int  # before reduction
    frames: int
    frame_pixels: int  # H * W per frame

    @property
    def rows(self) -> int:
        return self.prompts * self.group

    @property
    def seq(self) -> int:
        return self.prompt_len + self.response_len


def step_shape(cfg: Config, shape: ModelShape, world_size: int, video_keep: float, prompt_tokens: int | None) -> StepShape:
    sp = cfg.parallel.sp_size
    dp = max(1, world_size // sp)
    prompts = math.ceil(cfg.rl.prompts_per_step / dp)
    R = cfg.rollout.max_new_tokens or UNSET_RESPONSE_TOKENS
    if not shape.is_vlm:
        return StepShape(prompts, cfg.rl.group_size, prompt_tokens or TEXT_PROMPT_TOKENS, R, 0, 0, 0, 0)
    pixels = (cfg.video.max_pixels // (PATCH * MERGE) ** 2) * (PATCH * MERGE) ** 2  # whole merge blocks
    frames = cfg.video.max_frames
    full = -(-frames // TEMPORAL) * pixels // (PATCH * MERGE) ** 2
    if cfg.video.token_reduction != "none" and cfg.video.max_unseen > 0:  # the refresh keeps at least this
        video_keep = max(video_keep, 1.0 / (1 + cfg.video.max_unseen))
    kept = max(1, round(full * video_keep))
    text = prompt_tokens or VIDEO_TEXT_TOKENS
    return StepShape(prompts, cfg.rl.group_size, kept + text, R, kept, full, frames, pixels)


def layer_saved(shape: ModelShape, act: int) -> int:
    """Bytes autograd keeps per token and decoder layer (the counted tensors, see the module doc)."""
    kv = shape.kv_heads * shape.head_dim
    return act * (8 * shape.hidden + 2 * kv + 4 * shape.intermediate) + 4 * shape.heads


def layer_transient(shape: ModelShape, act: int) -> int:
    """Bytes per token of one layer's forward without a graph (its largest live set)."""
    kv = shape.kv_heads * shape.head_dim
    return act * (3 * shape.hidden + 2 * kv + 3 * shape.intermediate)


def _resident(cfg: Config, shape: ModelShape, s: StepShape, world_size: int) -> dict:
    w = DTYPE_BYTES[cfg.model.dtype]
    dp = max(1, world_size // cfg.parallel.sp_size)
    shard = dp if cfg.parallel.fsdp else 1
    lora = cfg.model.lora.r > 0
    frozen = 0 if cfg.video.train_vision else shape.vision_params
    trainable = shape.lora_params if lora else shape.params - frozen
    moments_shard = dp if (cfg.parallel.fsdp or cfg.parallel.zero_optimizer) else 1
    reference = (cfg.rl.kl_coef > 0 or cfg.rl.algorithm == "dpo") and not lora
    return {
        "weights": (shape.params + shape.lora_params) * w // shard,
        "reference": shape.params * w if reference else 0,  # a full replica, also under FSDP
        "adam_moments": 2 * trainable * w // moments_shard,
        "video_frames": s.prompts * s.frames * s.frame_pixels * 3,  # uint8, decoded
        "video_embeddings": s.prompts * s.video_tokens * shape.hidden * 4,  # the cache (fp32)
    }, trainable * w // shard


def _encode(cfg: Config, shape: ModelShape, s: StepShape, uncached: bool) -> int:
    """The vision tower over one chunk of frames: patchify's float copies (3 at its peak)
    plus the tower's live activations per patch, and the full embeddings being gathered."""
    if not shape.is_vlm:
        return 0
    sp = cfg.parallel.sp_size
    # Each rank patchifies and encodes only its own run of temporal patches (under SP, MR-SP
    # stage 1: parallel.mrsp_encode.mrsp_encode_frames), video.encode_chunk frames at a time.
    local = -(-s.frames // sp)
    frames = s.frames if uncached else (local if cfg.video.encode_chunk == 0 else min(local, cfg.video.encode_chunk))
    patches = -(-frames // TEMPORAL) * s.frame_pixels // PATCH**2  # per temporal patch: H*W/14^2
    pixel = 3 * PATCH * PATCH * TEMPORAL * 4  # float32 values per patch
    tower = 4 * (4 * shape.vision_hidden + shape.vision_intermediate)
    embeds_full = s.video_tokens_full * shape.hidden * 4 * (2 if sp > 1 else 1)  # gathered (+ the shards)
    if uncached:  # patchified once, then G copies of the pixels through the tower (bench.video_cache)
        G = s.group
        return patches * max(3 * pixel, (1 + G) * pixel + G * tower) + G * embeds_full
    return patches * (3 * pixel + tower) + embeds_full


def _kv(shape: ModelShape, tokens: int, act: int) -> int:
    return tokens * shape.layers * 2 * shape.kv_heads * shape.head_dim * act


def _rollout(cfg: Config, shape: ModelShape, s: StepShape, act: int) -> int:
    """Prefill each prompt once (one layer's transient), the caches stacked (a copy) and
    repeated to the rows; decode concatenates one layer at a time (one more layer copy)."""
    sp = cfg.parallel.sp_size
    rows = -(-s.rows // sp)  # SP: each rank decodes its share of the rows
    prompts = min(s.prompts, rows)
    prefill = s.prompt_len * layer_transient(shape, act) + _kv(shape, s.prompt_len, act) * prompts
    cache = _kv(shape, s.seq, act) * (rows + prompts) + _kv(shape, s.seq, act) * rows // shape.layers
    logits = rows * shape.vocab * 4 * 3
    return max(prefill, cache + logits)


def _logprobs(cfg: Config, shape: ModelShape, s: StepShape, b: int, act: int, chunk: int) -> int:
    """No grad: the rows' hidden states [b, T, D] + one layer's transient + one logits chunk."""
    sp = cfg.parallel.sp_size
    head = b * min(chunk, s.seq) * shape.vocab * 4 * 3
    if shape.is_vlm and sp == 1:  # one run per prompt, its cache repeated to the rows
        cache = _kv(shape, s.prompt_len, act) * (min(s.prompts, -(-b // s.group)) + b)
        attn = b * s.seq * 2 * shape.heads * shape.head_dim * act  # repeat_kv for the responses (masked)
        return b * s.seq * shape.hidden * 4 + cache + attn + s.prompt_len * layer_transient(shape, act) + head
    tokens = _pass_tokens(cfg, shape, s, b) if sp == 1 else b * -(-s.seq // sp)
    ulysses = b * s.seq * (shape.hidden + 2 * shape.kv_heads * shape.head_dim) * act // sp if sp > 1 else 0
    embeds = b * s.seq * shape.hidden * act * 2 if sp > 1 else 0  # whole rows' embeddings on every rank
    return tokens * shape.hidden * 4 + tokens * layer_transient(shape, act) + ulysses + embeds + head


def _pass_tokens(cfg: Config, shape: ModelShape, s: StepShape, b: int) -> int:
    """Positions one text forward holds: `train.pass_tokens` runs a micro-batch in groups of
    rows of at most that many positions (a longer row alone); 0 or video: all b rows."""
    limit = getattr(cfg.train, "pass_tokens", 0)
    if shape.is_vlm or limit <= 0:
        return b * s.seq
    return s.seq * min(b, max(1, limit // s.seq))


def _update(cfg: Config, shape: ModelShape, s: StepShape, b: int, act: int, chunk: int, mode: str) -> int:
    """Activations of one micro-batch of b rows under `mode`, the logits, the backward's
    largest transient (one layer's gradients)."""
    sp = cfg.parallel.sp_size
    D, L = shape.hidden, shape.layers
    kv = shape.kv_heads * shape.head_dim
    saved = layer_saved(shape, act)
    head_chunk = b * min(chunk, s.seq) * shape.vocab * 4 * 3
    if shape.is_vlm and sp == 1 and mode != "streambp":  # the shared prompt (chunked), once per prompt
        n_p = min(s.prompts, -(-b // s.group))  # prompts in the micro-batch (rows come in groups)
        prompt = n_p * s.prompt_len * (L * saved + 4 * D * act)  # embeddings, norms
        cache = L * b * s.seq * 2 * shape.heads * shape.head_dim * act  # the rows' K/V, repeated to H heads, saved
        responses = b * s.response_len * L * saved
        rows = 2 * b * s.seq * D * 4  # the stacked rows [b, T, D] and their gradient
        backward = n_p * s.prompt_len * 2 * D * act  # the gradient flowing down (layer grads are freed as they go)
        return prompt + cache + responses + rows + backward + head_chunk
    tokens = b * -(-s.seq // sp)  # this rank's tokens
    if sp == 1 and mode == "chunked":
        tokens = _pass_tokens(cfg, shape, s, b)
    rows_embeds = b * s.seq * D * 4 * (2 if shape.is_vlm else 0)  # whole rows' inputs_embeds (+ grad)
    if mode == "streambp":
        c = min(chunk, s.seq)
        stored = tokens * D * act * L + tokens * D * 4  # layer inputs, the gradient
        keys = 4 * tokens * kv * act
        graph = b * c * saved + b * c * s.seq  # one chunk's graph and its boolean mask (SDPA keeps no scores)
        rotary = 2 * tokens * shape.head_dim * act  # cos, sin of the whole rows
        fill = b * s.video_tokens * D * 4  # the video embeddings repeated to the rows
        return stored + keys + graph + rotary + fill + rows_embeds + head_chunk
    ulysses = 3 * b * s.seq * (D + 2 * kv) * act // sp if sp > 1 else 0  # full-sequence q, k, v for H/P heads
    if mode == "checkpoint":
        acts = tokens * (L * D * act + saved)
    else:
        acts = tokens * L * saved
    logits = b * s.seq * shape.vocab * 4 * 3 if mode == "standard" else head_chunk
    return acts + ulysses + logits + rows_embeds + tokens * 2 * D * act  # + the gradient flowing down


def _bias_masks(cfg: Config, shape: ModelShape, s: StepShape, b: int, act: int, chunk: int, mode: str) -> dict:
    """Extra bytes of proportional attention per phase: StreamBP's chunk masks become float
    (`streambp.layers.chunk_mask`); the other passes carry the bias in a head dimension."""
    if not (shape.is_vlm and cfg.video.token_reduction != "none" and cfg.video.proportional_attention):
        return {}
    if mode != "streambp" or cfg.parallel.sp_size > 1:
        return {}
    return {"update": b * min(chunk, s.seq) * s.seq * (act - 1)}


def estimate(cfg: Config, shape: ModelShape, *, world_size: int | None = None, video_keep: float = 1.0,
             uncached: bool = False, prompt_tokens: int | None = None) -> dict:
    """Bytes per rank of each piece and phase of one GRPO step; `peak_bytes` their peak."""
    world = world_size or cfg.parallel.sp_size
    if world % cfg.parallel.sp_size:
        raise UserError(f"--world-size {world} is not a multiple of parallel.sp_size={cfg.parallel.sp_size}")
    act = 2 if cfg.train.dtype in ("bfloat16", "bf16") else DTYPE_BYTES[cfg.model.dtype]
    s = step_shape(cfg, shape, world, video_keep, prompt_tokens)
    b = min(cfg.rl.micro_batch_size, s.rows)
    chunk = cfg.train.stream_chunk
    mode = "chunked" if uncached else cfg.train.backprop
    resident, grads = _resident(cfg, shape, s, world)
    if uncached:  # pixels in every pass (bench.video_cache): no cached embeddings, G encodes each pass
        resident["video_embeddings"] = 0
    gathered = (shape.params * DTYPE_BYTES[cfg.model.dtype] - resident["weights"]) if cfg.parallel.fsdp else 0
    phases = {
        "encode": _encode(cfg, shape, s, uncached),
        "rollout": _rollout(cfg, shape, s, act) + gathered,
        "logprobs": _logprobs(cfg, shape, s, b, act, chunk) + gathered,
        "update": _update(cfg, shape, s, b, act, chunk, mode) + grads + gathered,
    }
    for k, v in _bias_masks(cfg, shape, s, b, act, chunk, mode).items():
        phases[k] += v
    if uncached:  # every pass re-encodes: the encode's transient sits on top of each pass's
        for k in ("rollout", "logprobs", "update"):
            phases[k] += phases["encode"]
    peak_phase = max(phases, key=phases.get)
    sp = cfg.parallel.sp_size
    logits = b * (s.seq if mode == "standard" else min(chunk, s.seq)) * shape.vocab * 4 * 3
    kv_rows = -(-s.rows // sp)
    update = phases["update"] - (phases["encode"] if uncached else 0)
    within = {  # the named pieces inside the phases above
        "rollout_kv_cache": _kv(shape, s.seq, act) * (kv_rows + min(s.prompts, kv_rows)),
        "update_gradients": grads,
        "update_logits": logits,
        "update_activations": update - grads - gathered - logits,
        "fsdp_gathered_weights": gathered,
    }
    return {
        "tokens": dataclasses.asdict(s) | {"rows": s.rows, "seq_len": s.seq, "micro_batch": b},
        "resident": resident,
        "phases": phases,
        "within_phases": within,
        "peak_phase": peak_phase,
        "peak_bytes": sum(resident.values()) + phases[peak_phase],
        "settings": {"world_size": world, "sp_size": cfg.parallel.sp_size, "backprop": mode,
                     "stream_chunk": chunk, "micro_batch_size": cfg.rl.micro_batch_size,
                     "fsdp": cfg.parallel.fsdp, "lora_r": cfg.model.lora.r, "dtype": cfg.train.dtype},
    }


# ----------------------------------------------------------------------------------------
# Settings that fit
# ----------------------------------------------------------------------------------------


def candidates(cfg: Config, shape: ModelShape, world: int):
    """Configs that differ from `cfg` in SP degree, backprop mode, chunk and micro-batch,
    each runnable by the recipe (the video recipe: chunked or streambp, SP with chunked)."""
    video = shape.is_vlm
    sps = [p for p in (1, 2, 4, 8) if world % p == 0 and shape.heads % p == 0 and shape.kv_heads % p == 0
           and p <= world] if world > 1 else [1]
    modes = ("chunked", "streambp") if video else MODES
    top = max(1, min(cfg.rl.micro_batch_size, cfg.rl.prompts_per_step * cfg.rl.group_size))  # a micro-batch's rows
    micro = sorted({m for m in (1, 2, 4, 8, 16, 32, 64) if m < top} | {top})
    for sp in sps:
        for mode in modes:
            if sp > 1 and mode not in ("chunked", "checkpoint") or (video and sp > 1 and mode != "chunked"):
                continue
            for chunk in ((64, 128, 256, 512, 1024) if mode != "standard" else (cfg.train.stream_chunk,)):
                for mb in micro:
                    yield replace(cfg, parallel=replace(cfg.parallel, sp_size=sp),
                                  train=replace(cfg.train, backprop=mode, stream_chunk=chunk),
                                  rl=replace(cfg.rl, micro_batch_size=mb))


def _cost(c: Config, given: Config) -> tuple:
    """Cheaper first: fewer SP ranks per sequence (less communication), the plain chunked
    backward (no recompute), larger micro-batches, then the config's own chunk, then larger
    chunks (fewer, larger kernels)."""
    mode_rank = {"standard": 0, "chunked": 0, "checkpoint": 1, "streambp": 2}[c.train.backprop]
    return (c.parallel.sp_size, mode_rank, -c.rl.micro_batch_size,
            c.train.stream_chunk != given.train.stream_chunk, -c.train.stream_chunk)


def search(cfg: Config, shape: ModelShape, budget_bytes: float, *, world_size: int | None = None,
           video_keep: float = 1.0, prompt_tokens: int | None = None) -> dict:
    """The cheapest settings whose estimated peak fits; else the closest (smallest peak)."""
    world = world_size or cfg.parallel.sp_size
    scored = []
    for c in candidates(cfg, shape, world):
        est = estimate(c, shape, world_size=world, video_keep=video_keep, prompt_tokens=prompt_tokens)
        scored.append((c, est))
    fits = [(c, e) for c, e in scored if e["peak_bytes"] <= budget_bytes]
    if fits:
        c, e = min(fits, key=lambda ce: _cost(ce[0], cfg))
        return {"fits": True, "budget_bytes": int(budget_bytes), "settings": _overrides(c), "estimate": e}
    c, e = min(scored, key=lambda ce: ce[1]["peak_bytes"])
    return {"fits": False, "budget_bytes": int(budget_bytes), "closest": _overrides(c), "estimate": e}


def _overrides(c: Config) -> list[str]:
    return [f"parallel.sp_size={c.parallel.sp_size}", f"train.backprop={c.train.backprop}",
            f"train.stream_chunk={c.train.stream_chunk}", f"rl.micro_batch_size={c.rl.micro_batch_size}"]


# ----------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:10.3f}"


def format_table(est: dict) -> str:
    t = est["tokens"]
    lines = [f"one GRPO step per rank: {t['rows']} rows of {t['seq_len']} tokens (prompt {t['prompt_len']}, "
             f"response {t['response_len']}; video tokens {t['video_tokens']} of {t['video_tokens_full']}), "
             f"micro-batch {t['micro_batch']}; " + ", ".join(f"{k}={v}" for k, v in est["settings"].items()),
             f"{'piece':<28}{'GiB':>10}"]
    lines += [f"  {k:<26}{_gib(v)}" for k, v in est["resident"].items()]
    lines.append("phase transients (the largest one counts):")
    lines += [f"  {k:<26}{_gib(v)}{'  <- peak' if k == est['peak_phase'] else ''}" for k, v in est["phases"].items()]
    lines.append("of which:")
    lines += [f"  {k:<26}{_gib(v)}" for k, v in est["within_phases"].items()]
    lines.append(f"{'estimated peak per rank':<28}{_gib(est['peak_bytes'])}")
    return "\n".join(lines)


def main(cfg: Config, *, memory_gib: float | None, world_size: int | None, video_keep: float,
         prompt_tokens: int | None, as_json: bool) -> int:
    if not 0 < video_keep <= 1:
        raise UserError(f"--video-keep {video_keep} must be in (0, 1] (the fraction of video tokens kept)")
    shape = describe_model(cfg)
    est = estimate(cfg, shape, world_size=world_size, video_keep=video_keep, prompt_tokens=prompt_tokens)
    out: dict = {"model": dataclasses.asdict(shape), "estimate": est}
    if memory_gib is not None:
        out["search"] = search(cfg, shape, memory_gib * GIB, world_size=world_size, video_keep=video_keep,
                               prompt_tokens=prompt_tokens)
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    print(format_table(est))
    if memory_gib is not None:
        r = out["search"]
        peak = r["estimate"]["peak_bytes"] / GIB
        if r["fits"]:
            print(f"\nfits in {memory_gib:g} GiB (estimated {peak:.3f} GiB): " + " ".join(r["settings"]))
        else:
            print(f"\nnothing fits in {memory_gib:g} GiB; closest (estimated {peak:.3f} GiB): " + " ".join(r["closest"])
                  + "  (more ranks for sequence parallelism, token reduction or fewer frames would lower it)")
    return 0
