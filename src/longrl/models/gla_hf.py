"""The GLA language model as a Hugging Face model: config, body, causal LM head, decoding cache.

The layers are those of `longrl.models.gla` (GLA, arXiv 2312.06635, optionally hybrid with
sliding-window softmax layers); this module only gives them the interfaces the recipes and
`transformers` expect:

- `LongrlGLAConfig` (model_type "longrl_gla") and `LongrlGLAForCausalLM` are registered with
  `AutoConfig` / `AutoModelForCausalLM` when this module is imported, so inside longrl a
  checkpoint loads with `AutoModelForCausalLM.from_pretrained` and no remote code.
- Outside longrl, Hugging Face's custom-model convention: `save_pretrained` writes
  `auto_map` into config.json and copies this file and `gla.py` beside the weights, so plain
  `transformers` loads the directory with `trust_remote_code=True`. That is why this file
  imports the layers relatively (`from .gla import ...`) and nothing else of longrl.
- `model.model(input_ids, ...)` returns `last_hidden_state` (the chunked log-prob path) and
  `get_output_embeddings()` is the LM head.
- Decoding: `model(input_ids, attention_mask=[B, seen + T], past_key_values=cache,
  use_cache=True)` returns the updated cache in `.past_key_values`. The cache is a
  `GLACache` (one recurrent state per GLA layer, the last window-1 keys/values per
  sliding-window layer); an empty `DynamicCache` (what the rollout engine starts with) or
  None starts a new one. Left-padding tokens (attention_mask 0) get k = 0 and log-gate 0,
  so they leave the state exactly as it was; position ids are ignored (GLA needs none).

Departures from a stock HF model: no `labels` loss, no `GenerationMixin` (`generate` is the
rollout engine's job), and the attention mask must be the 2-D padding mask.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .gla import GLABlock, GLAConfig, LayerState, RMSNorm  # relative: the copy beside a checkpoint finds its sibling

MODEL_TYPE = "longrl_gla"


class LongrlGLAConfig(PretrainedConfig):
    """Hugging Face config of the GLA LM; the shape fields mirror `GLAConfig`."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, chunk_size=16, softmax_every=0, window=64, initializer_range=0.02,
                 tie_word_embeddings=True, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.chunk_size, self.softmax_every, self.window = chunk_size, softmax_every, window
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def shape(self) -> GLAConfig:
        return GLAConfig(vocab_size=self.vocab_size, d_model=self.hidden_size, num_layers=self.num_hidden_layers,
                         num_heads=self.num_attention_heads, mlp_hidden=self.intermediate_size,
                         chunk_size=self.chunk_size, softmax_every=self.softmax_every, window=self.window,
                         tie_embeddings=self.tie_word_embeddings)


class GLACache:
    """Decoding state of every layer, and how many tokens (padding included) it has seen.

    It brings its own row operations (`select_rows`, `concat_rows`), so a continuous-batching
    engine can join and drop rows without knowing what a row's state holds: a GLA layer's
    state S [B, H, K, V] is one per row whatever its length (rows join by concatenation and
    leave by indexing, no masks, no positions); a sliding-window layer (hybrid model) keeps
    its last window-1 keys and values [B, H, L, hd] with their validity [B, L], and rows
    with fewer columns are left-padded with invalid ones."""

    recurrent = True
    """Rows need no attention mask or positions: every row's state is current."""

    def __init__(self, num_layers: int):
        self.layers = [LayerState() for _ in range(num_layers)]
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def select_rows(self, idx: torch.Tensor) -> "GLACache":
        """The rows `idx` (a new cache)."""
        out = type(self)(len(self.layers))
        out.seen = self.seen
        for src, dst in zip(self.layers, out.layers):
            for name in ("S", "k", "v", "valid"):
                t = getattr(src, name)
                setattr(dst, name, None if t is None else t.index_select(0, idx))
        return out

    @classmethod
    def concat_rows(cls, caches: list["GLACache"]) -> "GLACache":
        """The rows of several caches stacked in order (a new cache, or the only one)."""
        if len(caches) == 1:
            return caches[0]
        out = cls(len(caches[0].layers))
        out.seen = max(c.seen for c in caches)
        for i, layer in enumerate(out.layers):
            states = [c.layers[i] for c in caches]
            if states[0].S is not None:
                layer.S = torch.cat([st.S for st in states])
            if states[0].k is not None:
                L = max(st.k.shape[2] for st in states)
                pad = torch.nn.functional.pad
                layer.k = torch.cat([pad(st.k, (0, 0, L - st.k.shape[2], 0)) for st in states])
                layer.v = torch.cat([pad(st.v, (0, 0, L - st.v.shape[2], 0)) for st in states])
                layer.valid = torch.cat([torch.cat([st.valid.new_zeros(st.valid.shape[0], L - st.valid.shape[1]),
                                                    st.valid], 1) for st in states])
        return out


class LongrlGLAPreTrainedModel(PreTrainedModel):
    config_class = LongrlGLAConfig
    base_model_prefix = "model"
    recurrent_cache = True
    """Decodes with a `GLACache` (rows joined and dropped by the cache itself); an engine
    passes no cache in and takes the one the forward returns."""
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLABlock"]


class LongrlGLAModel(LongrlGLAPreTrainedModel):
    """Embedding -> GLA / sliding-window blocks -> final RMSNorm."""

    def __init__(self, config: LongrlGLAConfig):
        super().__init__(config)
        shape = config.shape()
        self.embed = nn.Embedding(shape.vocab_size, shape.d_model)
        k = shape.softmax_every
        self.layers = nn.ModuleList(GLABlock(shape, softmax=k > 0 and (i + 1) % k == 0)
                                    for i in range(shape.num_layers))
        self.norm = RMSNorm(shape.d_model)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                sp=None):
        """input_ids [B, T] -> BaseModelOutputWithPast(last_hidden_state [B, T, D], past_key_values).

        attention_mask: [B, seen + T] (or [B, T]) 1 = real token, 0 = padding; its last T
        columns are this call's tokens. position_ids: ignored. sp: see `GLAttention`.
        """
        B, T = input_ids.shape
        valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"{type(self).__name__} takes a 2-D [B, T] padding mask, got {attention_mask.dim()}-D")
            valid = attention_mask[:, -T:].bool()  # [B, T]
        cache = None
        if use_cache:
            cache = past_key_values
            if not isinstance(cache, GLACache):
                if cache is not None and not (isinstance(cache, DynamicCache) and cache.get_seq_length() == 0):
                    raise ValueError(f"{type(self).__name__} decodes with a GLACache; got a non-empty {type(cache).__name__}")
                cache = GLACache(len(self.layers))
        x = self.embed(input_ids)  # [B, T, D]
        for i, layer in enumerate(self.layers):
            x = layer(x, sp=sp, valid=valid, state=None if cache is None else cache.layers[i])
        if cache is not None:
            cache.seen += T
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=cache)


class LongrlGLAForCausalLM(LongrlGLAPreTrainedModel):
    """`LongrlGLAModel` + a linear LM head (tied to the embedding by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: LongrlGLAConfig):
        super().__init__(config)
        self.model = LongrlGLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep: int = 0, sp=None):
        """-> CausalLMOutputWithPast(logits [B, T or logits_to_keep, V], past_key_values).

        Full logits are for decoding and tests; training paths use `model.model` and the
        chunked head (`longrl.streambp.logprobs`)."""
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                         use_cache=use_cache, sp=sp)
        h = out.last_hidden_state  # [B, T, D]
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(h), past_key_values=out.past_key_values)


def build_gla_model(shape: GLAConfig, *, pad_token_id: int, eos_token_id: int) -> LongrlGLAForCausalLM:
    """A randomly initialised GLA LM (weights from the current torch seed), float32."""
    config = LongrlGLAConfig(vocab_size=shape.vocab_size, hidden_size=shape.d_model,
                             num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                             intermediate_size=shape.mlp_hidden, chunk_size=shape.chunk_size,
                             softmax_every=shape.softmax_every, window=shape.window,
                             tie_word_embeddings=shape.tie_embeddings, pad_token_id=pad_token_id,
                             eos_token_id=eos_token_id, bos_token_id=eos_token_id)
    return LongrlGLAForCausalLM(config).to(torch.float32)


# save_pretrained writes auto_map and copies the modelling files (trust_remote_code loading).
LongrlGLAConfig.register_for_auto_class()
LongrlGLAForCausalLM.register_for_auto_class("AutoModelForCausalLM")

if __name__ == "longrl.models.gla_hf":
    # longrl's own import registers the model type; the copy transformers loads from a
    # checkpoint (a module under transformers_modules) must not replace these classes.
    AutoConfig.register(MODEL_TYPE, LongrlGLAConfig, exist_ok=True)
    AutoModel.register(LongrlGLAConfig, LongrlGLAModel, exist_ok=True)
    AutoModelForCausalLM.register(LongrlGLAConfig, LongrlGLAForCausalLM, exist_ok=True)
