"""The recipes' training passes, sequence-parallel when `parallel.sp_size` > 1.

`loss_and_backward` and `sequence_logprobs` have the signatures of their twins in
`streambp.logprobs`; the recipes call these, and they dispatch on the current
`parallel.dist.layout()`: with one rank per sequence they ARE the streambp
functions, with an SP group of P ranks they run Ulysses (`parallel/ulysses.py`):
every rank of the group passes the same full micro-batch, runs the decoder on its
T/P slice (all-to-all around attention), the chunked LM head on its slice's
positions, and sees the all-gathered [B, T] log-probs, so the loss (token- or
sequence-level) is the same on every rank of the group and exact. A rank
back-propagates only through its own positions: the recipes sum gradients over
the whole world (`dist.all_reduce_gradients`), which adds the SP shares and the
DP replicas in one collective.

Backprop modes with SP: 'chunked' (the default) and 'checkpoint' (activation
checkpointing; attention is recomputed inside the backward, still sharded).
'standard' (full [B, T, V] logits) and 'streambp' (the sequence-chunked layer
backward, which runs the whole sequence through each layer on one rank) are
refused before training starts (`check_sp_model`). A vision-language model (Qwen2.5-VL)
passes the same check on its language model; the video recipe's passes run on cached
video embeddings through `parallel/sp_video.py` instead of these functions.

GLA models (`longrl train model.arch=gla`, model_type longrl_gla) have no softmax
attention to shard: each rank runs its contiguous shard of the sequence and the
recurrent state passes between ranks by ZeCO All-Scan (`parallel/gla_sp.py`), forward
and backward; the hybrid's sliding-window layers take the window-1 keys and values
before their shard from the preceding ranks (`gla_sp.window_halo`). The head, gather
and loss are as above. train.backprop=chunked only.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist

from longrl.errors import UserError
from longrl.parallel.dist import layout
from longrl.parallel.ulysses import (attention_modules, gather_sequence, shard_batch, sp_loss_and_backward,
                                     sp_sequence_logprobs)
from longrl.streambp import logprobs as streambp

SP_BACKPROP = ("chunked", "checkpoint")


def check_sp_model(model, sp_size: int, backprop: str) -> None:
    """UserError unless `model` and `train.backprop` can run Ulysses over `sp_size` ranks."""
    if sp_size == 1:
        return
    if backprop not in SP_BACKPROP:
        raise UserError(f"train.backprop={backprop} does not support sequence parallelism "
                        f"(parallel.sp_size={sp_size}); use train.backprop=chunked or train.backprop=checkpoint")
    if _is_gla(model):
        if backprop != "chunked":
            raise UserError(f"parallel.sp_size={sp_size} with a GLA model supports train.backprop=chunked only")
        return
    get_text_config = getattr(model.config, "get_text_config", None)  # absent: not a transformers model
    cfg = get_text_config() if get_text_config else None
    modules = attention_modules(model, cfg) if cfg is not None else []
    if not modules:
        raise UserError(f"parallel.sp_size={sp_size}: {type(model).__name__} has no softmax attention layers that "
                        "Ulysses can shard (Qwen2/Qwen2.5/Qwen3/Llama-style q_proj/k_proj/o_proj); use parallel.sp_size=1")
    heads = cfg.num_attention_heads
    if heads % sp_size:
        raise UserError(f"parallel.sp_size={sp_size} must divide the model's {heads} attention heads "
                        "(Ulysses gives each rank a share of the heads)")
    if any(getattr(m, "sliding_window", None) for m in modules):
        raise UserError(f"parallel.sp_size={sp_size}: sliding-window attention is not supported by Ulysses here")




def loss_and_backward(model, batch: streambp.TokenBatch, loss_fn: streambp.LossFn, *, mode: str = "chunked",
                      chunk: int = 256, temperature: float = 1.0):
    """`streambp.logprobs.loss_and_backward`, Ulysses-sharded over the SP group when there is one.
    Returns (loss, metrics, logprobs [B, T]); with SP, identical on every rank of the group."""
    lay = layout()
    if lay.sp_size == 1:
        return streambp.loss_and_backward(model, batch, loss_fn, mode=mode, chunk=chunk, temperature=temperature)
    if mode not in SP_BACKPROP:
        raise ValueError(f"backprop mode {mode!r} does not support sequence parallelism; use one of {SP_BACKPROP}")
    if _is_gla(model):
        return _gla_sp_loss_and_backward(model, batch, loss_fn, lay.sp_group, chunk=chunk, temperature=temperature)
    streambp.set_checkpointing(model, mode == "checkpoint")
    return sp_loss_and_backward(model, batch, loss_fn, lay.sp_group, chunk=chunk, temperature=temperature)


def sequence_logprobs(model, batch: streambp.TokenBatch, chunk: int, temperature: float = 1.0):
    """`streambp.logprobs.sequence_logprobs` (no grad), Ulysses-sharded when there is an SP group: [B, T]."""
    lay = layout()
    if lay.sp_size == 1:
        return streambp.sequence_logprobs(model, batch, chunk, temperature)
    if _is_gla(model):
        with torch.no_grad():
            shard, T = _gla_shard(batch, lay.sp_group)
            hidden = _gla_sp_hidden(model, shard, lay.sp_group)  # [B, L, D]
            weight, bias = streambp.lm_head_params(model)
            logp = streambp.chunked_logprobs(hidden, weight, bias, shard.targets, shard.mask, chunk, temperature)
            return gather_sequence(logp, lay.sp_group)[:, :T]  # [B, T]
    return sp_sequence_logprobs(model, batch, lay.sp_group, chunk=chunk, temperature=temperature)


# ---------------------------------------------------------------------------------------
# GLA models (model_type longrl_gla): the state is passed between ranks by ZeCO All-Scan
# (`parallel/gla_sp.py`) instead of Ulysses' all-to-all around softmax attention.
# ---------------------------------------------------------------------------------------

def _is_gla(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "longrl_gla"


def _gla_shard(batch: streambp.TokenBatch, group):
    """This rank's contiguous shard of the right-padded batch, and the unpadded length T. Padding
    at the end of the last shard comes after every real token, so causality keeps it out."""
    return shard_batch(batch, tdist.get_rank(group), tdist.get_world_size(group))[0], batch.input_ids.shape[1]


def _gla_sp_hidden(model, shard: streambp.TokenBatch, group):
    from longrl.parallel.gla_sp import GLASequenceParallel

    return model.model(shard.input_ids, sp=GLASequenceParallel(group)).last_hidden_state  # [B, L, D]


def _gla_sp_loss_and_backward(model, batch, loss_fn, group, *, chunk, temperature):
    """As `ulysses.sp_body_loss_and_backward` for a GLA body: every rank runs its shard, the
    [B, L] log-probs are all-gathered so `loss_fn` sees whole rows, and each rank
    back-propagates through its own positions (All-Scan passes the state gradients back).
    Parameter gradients of the group's ranks must be summed, as with Ulysses."""
    shard, T = _gla_shard(batch, group)
    weight, bias = streambp.lm_head_params(model)
    full_logp = {}

    def shard_loss(logp_shard):  # [B, L] -> the loss of the whole rows
        logp = gather_sequence(logp_shard, group)[:, :T]  # [B, T]
        full_logp["value"] = logp.detach()
        return loss_fn(logp)

    hidden = _gla_sp_hidden(model, shard, group)  # [B, L, D]
    loss, metrics, grad_h, _ = streambp.backward_chunked_head(hidden, weight, bias, shard.targets, shard.mask,
                                                              shard_loss, chunk, temperature)
    hidden.backward(grad_h)
    return loss, metrics, full_logp["value"]
