"""The built-in tiny model: a small Qwen2-architecture causal LM and a character tokenizer.

Both are built in code, so the default run needs no download. The tokenizer is a
`tokenizers` BPE model with no merges (one token per character) plus special tokens for
the response format; saved with `save_pretrained`, plain `transformers`
(`AutoTokenizer`, `AutoModelForCausalLM`) loads the pair as it is.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from longrl.config import TinyModelConfig

PAD, EOS = "<|pad|>", "<|endoftext|>"
# Tags of the response format get one token each: shorter responses, and the format reward
# is learnable by a tiny model in a few steps.
FORMAT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
# Tool-call tags for multi-turn episodes (`rollout/episodes.TagFormat`), added only to the
# tokenizers of runs that use tools, so every other run keeps its vocabulary and weights.
TOOL_TOKENS = ["<call>", "</call>", "<result>", "</result>"]
CHARS = string.printable[:95] + "\n"  # printable ASCII (digits, letters, punctuation, space) + newline


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (space -> 'Ġ', newline -> 'Ċ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tiny_tokenizer(extra_tokens: tuple[str, ...] | list[str] = ()) -> PreTrainedTokenizerFast:
    """The character tokenizer; `extra_tokens` (e.g. TOOL_TOKENS) get one id each after the rest."""
    # Byte-level, like Qwen's own tokenizer: `AutoTokenizer` rebuilds a saved Qwen2-type
    # tokenizer as a byte-level BPE, so a plain character vocab would lose its spaces on
    # reload. In the byte-level alphabet both paths tokenise identically.
    specials = [PAD, EOS] + FORMAT_TOKENS
    vocab = {tok: i for i, tok in enumerate(specials)}
    to_unicode = _byte_to_unicode()
    for ch in CHARS:
        vocab.setdefault(to_unicode[ord(ch)], len(vocab))
    vocab["<unk>"] = len(vocab)
    for extra in extra_tokens:
        vocab.setdefault(extra, len(vocab))
    specials = specials + [t for t in extra_tokens if t not in specials]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token="<unk>",
        additional_special_tokens=specials[2:], padding_side="left",
    )
    hf.model_max_length = 1 << 20
    return hf


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 model sized by `cfg` (weights from the current torch seed)."""
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        from longrl.errors import UserError

        raise UserError(
            f"model.tiny: hidden_size={cfg.hidden_size} must divide by num_heads={cfg.num_heads}, "
            f"and num_heads by num_kv_heads={cfg.num_kv_heads}"
        )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        rope_theta=10000.0,
        use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.to(torch.float32)
