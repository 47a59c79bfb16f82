"""Load a policy (model + tokenizer) from a local Hugging Face directory or build the tiny default.

No code path here downloads anything: `local_files_only=True` everywhere, and a missing
directory is a `UserError`. `model.path` may also be a hub id (`org/name`) already in the
local Hugging Face cache (`resolve_model_path`, `longrl.hub`); one that is not cached is a
`UserError` saying how to fetch it once. So is a directory that would crash later: `check_model_dir`
reads config.json and every safetensors header (random, empty or truncated weights) and
refuses model types the recipes do not run, before any weights are loaded.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path

import torch

from longrl.config import ModelConfig
from longrl.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FORMAT_INSTRUCTION = ("Reason step by step inside <think> </think>, then write only the final answer "
                      "inside <answer> </answer>.")
"""The system message `model.system_prompt=auto` gives chat models: the verifiers read the
`<answer>` block and the format reward checks both tags, so an instruct checkpoint must be
told the format before it can earn any reward."""


SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "longrl_gla")
"""Causal LMs the text recipes run (`config.json`'s model_type), each trained end to end in
tests/models/test_models_load.py: decoder-only, positions from `position_ids` (rollouts are
left-padded), and logits = lm_head(last hidden state), which the chunked log-probs compute.
Models that scale or soft-cap their logits (gemma2, granite, cohere) would train on wrong
log-probs, and encoders such as bert crash in attention: all are refused by name."""
VLM_MODEL_TYPES = ("qwen2_5_vl",)
"""Vision-language models the video recipe and `longrl eval --videomme` load."""


def check_device(device: torch.device) -> None:
    """A CUDA device torch cannot open (a CPU-only build, no driver) is a UserError here,
    not a RuntimeError at the first `.to(device)`."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device={device}: torch sees no CUDA GPU (torch {torch.__version__}); use model.device=cpu or auto")


def resolve_model_path(path: str | Path, key: str = "model.path") -> Path:
    """A local directory as it is; else a hub id's snapshot in the local Hugging Face cache
    (no download); else a UserError for a hub id that is not cached. Any other missing path
    is left to `check_model_dir` to refuse."""
    from longrl import hub

    local = Path(path).expanduser()
    if local.exists() or not hub.is_hub_id(str(path)):
        return local
    snapshot = hub.cached_snapshot(str(path))
    if snapshot is None:
        raise UserError(f"{key} '{path}' is neither a local directory nor a model in the local Hugging Face cache "
                        f"({hub.hub_cache_dir()}); longrl never downloads: fetch it once with {hub.download_hint(str(path))} "
                        f"(HF_HOME sets where the cache is), or give a local model directory")
    return snapshot


def check_model_dir(path: str | Path, supported: tuple[str, ...] = SUPPORTED_MODEL_TYPES, key: str = "model.path") -> str:
    """Refuse a model directory that would crash on load or in training; return its model_type.

    Cheap: reads config.json and the safetensors headers (safetensors checks that a header's
    tensors cover the file exactly, so truncation is caught), not the weights."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{key} '{path}' is not a directory; give a local Hugging Face model directory (config.json + weights), or leave model.path empty for the tiny default")
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{key} '{path}' has no config.json; it must be a Hugging Face model directory saved with save_pretrained")
    try:
        model_type = json.loads(config.read_bytes()).get("model_type")
    except (ValueError, AttributeError, OSError) as e:
        raise UserError(f"{config}: not a JSON object of model settings ({str(e).splitlines()[0]}); re-save the model with save_pretrained") from None
    if model_type not in supported:
        hint = " (a vision-language model: train it with task.name=videos)" if model_type in VLM_MODEL_TYPES else ""
        raise UserError(f"{key} '{path}' is a {model_type!r} model{hint}; this loader runs model types {', '.join(supported)}")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)
    return model_type


def check_safetensors(file: Path) -> None:
    """The header of one weights file parses and covers the file: else a UserError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]}); "
                        "the download or save was cut short or the file is corrupt: copy it again") from None


@contextlib.contextmanager
def loading(path: str | Path, key: str = "model.path"):
    """What `from_pretrained` raises on a bad directory, as one UserError naming it (a weights
    file can still fail past `check_model_dir`: a missing shard, a corrupt pickle)."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as e:
        raise UserError(f"could not load {key} '{path}': {(str(e).splitlines() or [type(e).__name__])[0]}") from None


def load_policy(cfg: ModelConfig, device: torch.device, extra_tokens: tuple[str, ...] = ()):
    """Return (model, tokenizer). The model is in train mode on `device`. `extra_tokens`: added
    to the built-in tiny tokenizer (tool-call tags); a checkpoint's tokenizer has its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_device(device)
    if not cfg.path:
        from longrl.models.tiny import build_tiny_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(extra_tokens)
        model = build_tiny_gla(cfg, tokenizer) if cfg.arch == "gla" else build_tiny_model(cfg.tiny, tokenizer)
    else:
        path = resolve_model_path(cfg.path)
        check_model_dir(path)
        import longrl.models.gla_hf  # noqa: F401  registers the GLA model type with AutoModelForCausalLM

        with loading(cfg.path):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[cfg.dtype])
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
    model = model.to(device=device, dtype=DTYPES[cfg.dtype])
    model.config.use_cache = False
    set_system_prompt(tokenizer, cfg.system_prompt)
    if cfg.lora.r > 0:  # a fresh adapter; only it trains (`longrl.models.lora`)
        from longrl.models.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    return model, tokenizer


def set_system_prompt(tokenizer, setting: str) -> None:
    """Attach the system message `format_prompt` uses: 'auto' gives chat-template tokenizers
    `FORMAT_INSTRUCTION` (the tiny tokenizer has no template, so none), '' none, any other
    text itself."""
    if setting == "auto":
        setting = FORMAT_INSTRUCTION if getattr(tokenizer, "chat_template", None) else ""
    tokenizer.longrl_system_prompt = setting


def build_tiny_gla(cfg: ModelConfig, tokenizer):
    """The tiny GLA language model (`model.arch=gla`): widths from `model.tiny`, the rest from `model.gla`."""
    from longrl.models.gla import GLAConfig
    from longrl.models.gla_hf import build_gla_model

    t = cfg.tiny
    if t.hidden_size % (2 * t.num_heads):
        raise UserError(f"model.tiny.hidden_size={t.hidden_size} must divide by 2 * model.tiny.num_heads={t.num_heads} "
                        "for model.arch=gla (the key width is half the model width, split over the heads)")
    shape = GLAConfig(vocab_size=len(tokenizer), d_model=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                      mlp_hidden=t.intermediate_size, chunk_size=cfg.gla.chunk_size,
                      softmax_every=cfg.gla.softmax_every, window=cfg.gla.window)
    return build_gla_model(shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def format_prompt(tokenizer, prompt: str, messages: list[dict] | None = None) -> str:
    """Wrap a raw prompt in the tokenizer's chat template when it has one (real instruct
    checkpoints), after the system message `set_system_prompt` attached (model.system_prompt);
    the tiny tokenizer has no template and gets the raw prompt. A chat-format prompt
    (`messages`, `Example.messages`) goes to the template as it is, the system message put
    first unless the chat brings its own; without a template its text (`prompt`) is used."""
    if getattr(tokenizer, "chat_template", None):
        system = getattr(tokenizer, "longrl_system_prompt", "")
        turns = list(messages) if messages else [{"role": "user", "content": prompt}]
        if system and not any(m["role"] == "system" for m in turns):
            turns = [{"role": "system", "content": system}] + turns
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return prompt


def save_policy(model, tokenizer, out_dir: Path) -> None:
    """Hugging Face format: safetensors weights + config + tokenizer files. A LoRA model
    saves its merged weights there (plain transformers loads them, no peft needed) and the
    adapter (with the base, once it is not step_0's) beside them (`models.lora.save_lora`)."""
    from longrl.models import lora

    if lora.has_lora(model):
        model.save_pretrained(out_dir, state_dict=lora.merged_state_dict(model), safe_serialization=True)
        lora.save_lora(model, out_dir)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
