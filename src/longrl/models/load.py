"""Load a policy (model + tokenizer) from a local Hugging Face directory or build the tiny default.

No code path here downloads anything: `local_files_only=True` everywhere, and a missing
directory is a `UserError`.
"""

from __future__ import annotations

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


def load_policy(cfg: ModelConfig, device: torch.device):
    """Return (model, tokenizer). The model is in train mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not cfg.path:
        from longrl.models.tiny import build_tiny_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model = build_tiny_gla(cfg, tokenizer) if cfg.arch == "gla" else build_tiny_model(cfg.tiny, tokenizer)
    else:
        path = Path(cfg.path)
        if not path.is_dir():
            raise UserError(f"model.path '{cfg.path}' is not a directory; give a local Hugging Face model directory (config.json + weights), or leave model.path empty for the tiny default")
        if not (path / "config.json").is_file():
            raise UserError(f"model.path '{cfg.path}' has no config.json; it must be a Hugging Face model directory saved with save_pretrained")
        import longrl.models.gla  # noqa: F401  registers the GLA model type with AutoModelForCausalLM

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[cfg.dtype])
        except (OSError, ValueError) as e:
            raise UserError(f"could not load model.path '{cfg.path}': {str(e).splitlines()[0]}")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
    model = model.to(device=device, dtype=DTYPES[cfg.dtype])
    model.config.use_cache = False
    set_system_prompt(tokenizer, cfg.system_prompt)
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
    from longrl.models.gla import GLAConfig, build_gla_model

    t = cfg.tiny
    if t.hidden_size % (2 * t.num_heads):
        raise UserError(f"model.tiny.hidden_size={t.hidden_size} must divide by 2 * model.tiny.num_heads={t.num_heads} "
                        "for model.arch=gla (the key width is half the model width, split over the heads)")
    shape = GLAConfig(vocab_size=len(tokenizer), d_model=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                      mlp_hidden=t.intermediate_size, chunk_size=cfg.gla.chunk_size,
                      softmax_every=cfg.gla.softmax_every, window=cfg.gla.window)
    return build_gla_model(shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def format_prompt(tokenizer, prompt: str) -> str:
    """Wrap a raw prompt in the tokenizer's chat template when it has one (real instruct
    checkpoints), after the system message `set_system_prompt` attached (model.system_prompt);
    the tiny tokenizer has no template and gets the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        system = getattr(tokenizer, "longrl_system_prompt", "")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def save_policy(model, tokenizer, out_dir: Path) -> None:
    """Hugging Face format: safetensors weights + config + tokenizer files."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
