"""Chunked log-probs and exact backprop through the LM head (StreamBP, arXiv 2506.03077, §3.1).

Shapes: B = sequences, T = sequence length, D = hidden size, V = vocabulary,
N = positions that need a log-prob (response tokens), C = chunk of N.

Full `[B, T, V]` logits dominate memory for long sequences (V ~ 150k for Qwen). Here the
body runs once; its final hidden states are *detached*, and log-probs are computed for only
the positions that need them, C at a time, so at most `[C, V]` logits exist at once:

  1. no grad: logp[n] = log_softmax(h[n] @ W.T / temperature)[target[n]], chunk by chunk;
  2. the loss is any function of the per-token log-probs `[B, T]` (SFT, PPO, GSPO, DPO...):
     evaluate it on a leaf copy and take g = dL/dlogp `[B, T]` (cheap: no vocabulary);
  3. per chunk, recompute logp with grad and back-propagate sum(logp * g): this accumulates
     W.grad and dL/dh for the chunk;
  4. one backward through the body with dL/dh.

The gradient is exact (the chain rule through logp, split along N). Departures from the
paper: the head is evaluated twice (once without grad) instead of storing chunk logits,
trading one extra `[C, V]` matmul per chunk for not keeping any logits; and only positions
with a non-zero loss mask are evaluated, so prompt and padding tokens cost nothing.
The sequence-chunked backward *through the decoder layers* lives in `streambp/layers.py`.

Row groups (`max_tokens`, `train.pass_tokens`): the same split applied to the rows. A batch of
more than `max_tokens` positions runs in groups of similar-length rows, each cut to its own
width: the no-grad passes to save padding, and the 'chunked' training pass
(`row_groups_backward`) so that only one group's activations exist at a time. Step 1 then runs
over the whole batch first (or is handed the log-probs: GRPO's old log-probs, same weights),
g is taken once, and each group back-propagates sum(logp * g): exact for any loss of the
whole batch, one no-grad forward more than a single pass unless handed the log-probs. A loss
marked `row_separable` (a sum of per-row terms) needs neither: each group takes g at its own
rows right after its forward (`separable_groups_backward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from longrl.streambp import layers

LossFn = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, dict]"]


@dataclass
class TokenBatch:
    """Right-padded sequences for teacher-forced passes.

    `targets[b, t]` is the token that position t predicts (input_ids[b, t+1]); `mask[b, t]`
    is 1.0 where that target is a trained token (a response token), else 0.0. Trailing
    padding needs no attention mask under causal attention: real tokens never see it.
    """

    input_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] float

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.targets.to(device), self.mask.to(device))

    def __getitem__(self, rows) -> "TokenBatch":
        ids, tg, m = self.input_ids[rows], self.targets[rows], self.mask[rows]
        # Trim columns that are padding in every selected row.
        width = int(m.nonzero()[:, 1].max()) + 2 if m.any() else 1
        width = min(width, ids.shape[1])
        return TokenBatch(ids[:, :width], tg[:, :width], m[:, :width])


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> TokenBatch:
    """Concatenate prompt + response per row, right-pad; mask the response targets."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    B, T = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T))
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, len(p) - 1 : len(s) - 1] = 1.0  # positions predicting response tokens
    targets = torch.full_like(input_ids, pad_id)
    targets[:, :-1] = input_ids[:, 1:]
    return TokenBatch(input_ids, targets, mask)


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Body forward (after the final norm): [B, T] -> [B, T, D]."""
    T = input_ids.shape[1]
    positions = torch.arange(T, device=input_ids.device)[None].expand_as(input_ids)
    return model.base_model(input_ids=input_ids, position_ids=positions, use_cache=False).last_hidden_state


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are softmaxed in float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def lm_head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (weight [V, D], bias [V] or None), for the chunked head functions."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _chunk_logprobs(h, weight, bias, targets, temperature):
    """h [C, D], targets [C] -> logp [C]; the only place [C, V] logits exist."""
    logits = _upcast(torch.nn.functional.linear(h, weight, bias))  # [C, V]
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _chunk_entropy(h, weight, bias, temperature):
    logits = _upcast(torch.nn.functional.linear(h, weight, bias))  # [C, V]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)  # [C]


@torch.no_grad()
def chunked_logprobs(hidden, weight, bias, targets, mask, chunk: int, temperature: float = 1.0,
                     with_entropy: bool = False):
    """Log-probs at masked positions, zeros elsewhere: -> [B, T] (and entropy [B, T])."""
    B, T, D = hidden.shape
    flat_h = hidden.reshape(B * T, D)
    sel = mask.reshape(-1).nonzero().squeeze(-1)  # [N]
    flat_t = targets.reshape(-1)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(B * T, device=hidden.device, dtype=dtype)
    ent = torch.zeros(B * T, device=hidden.device, dtype=dtype) if with_entropy else None
    for s in range(0, sel.numel(), chunk):
        idx = sel[s : s + chunk]  # [C]
        out[idx] = _chunk_logprobs(flat_h[idx], weight, bias, flat_t[idx], temperature)
        if with_entropy:
            ent[idx] = _chunk_entropy(flat_h[idx], weight, bias, temperature)
    out = out.reshape(B, T)
    return (out, ent.reshape(B, T)) if with_entropy else out


def row_groups(batch: TokenBatch, max_tokens: int) -> list[torch.Tensor]:
    """Rows of a right-padded batch with a masked target, shortest first, in groups whose
    rows x longest row stays within `max_tokens` (a longer row goes alone): each group, cut
    to its own width (`TokenBatch.__getitem__`), holds at most that many positions."""
    on = batch.mask != 0  # [B, T]
    cols = torch.arange(on.shape[1], device=on.device).expand_as(on)
    lengths = (torch.where(on, cols, -2).amax(1) + 2).tolist()  # [B] real tokens (last target + 2)
    order = sorted((i for i in range(len(lengths)) if lengths[i] > 0), key=lambda i: lengths[i])
    groups, cur = [], []
    for i in order:  # ascending, so the row joining a group is its longest
        if cur and (len(cur) + 1) * lengths[i] > max_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return [torch.tensor(g, device=on.device) for g in groups]


def _fits(batch: TokenBatch, max_tokens: int) -> bool:
    return max_tokens <= 0 or batch.input_ids.numel() <= max_tokens


@torch.no_grad()
def sequence_logprobs(model, batch: TokenBatch, chunk: int, temperature: float = 1.0,
                      max_tokens: int = 0) -> torch.Tensor:
    """Teacher-forced log-probs of the masked targets (no grad): -> [B, T], 0 where unmasked.

    With `max_tokens` > 0 a batch of more positions runs in `row_groups` (each cut to its
    own width, so padding costs nothing); 0: one forward over the whole batch."""
    if _fits(batch, max_tokens):
        hidden = final_hidden(model, batch.input_ids)  # [B, T, D]
        weight, bias = lm_head_params(model)
        return chunked_logprobs(hidden, weight, bias, batch.targets, batch.mask, chunk, temperature)
    out = None
    for rows in row_groups(batch, max_tokens):
        sub = batch[rows]
        lp = sequence_logprobs(model, sub, chunk, temperature)  # [b, w]
        if out is None:
            out = torch.zeros(batch.mask.shape, device=lp.device, dtype=lp.dtype)  # [B, T]
        out[rows, : lp.shape[1]] = lp
    return out if out is not None else torch.zeros(batch.mask.shape, device=batch.mask.device)


def backward_chunked_head(hidden, weight, bias, targets, mask, loss_fn: LossFn, chunk: int,
                          temperature: float = 1.0):
    """Steps 1-3 of the module docstring. Accumulates W.grad (and bias.grad) and returns
    (loss, metrics, dL/dhidden [B, T, D], logprobs [B, T])."""
    logp = chunked_logprobs(hidden.detach(), weight, bias, targets, mask, chunk, temperature)
    loss, metrics, g = loss_grad(loss_fn, logp)
    return loss, metrics, head_backward(hidden, weight, bias, targets, mask, g, chunk, temperature), logp


def loss_grad(loss_fn: LossFn, logp: torch.Tensor):
    """Step 2: the loss at `logp` [B, T] and g = dL/dlogp [B, T] -> (loss, metrics, g)."""
    leaf = logp.clone().requires_grad_(True)  # [B, T]
    out = loss_fn(leaf)
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    (g,) = torch.autograd.grad(loss, leaf)  # [B, T]
    return loss.detach(), metrics, g


def head_backward(hidden, weight, bias, targets, mask, g, chunk: int, temperature: float = 1.0) -> torch.Tensor:
    """Step 3: per chunk, recompute logp with grad and back-propagate sum(logp * g); accumulates
    W.grad (and bias.grad) and returns dL/dhidden [B, T, D]."""
    B, T, D = hidden.shape
    flat_h = hidden.detach().reshape(B * T, D)
    flat_t, flat_g = targets.reshape(-1), g.reshape(-1)
    sel = (mask.reshape(-1) != 0).nonzero().squeeze(-1)  # [N]
    grad_h = torch.zeros_like(flat_h)  # [B*T, D]
    for s in range(0, sel.numel(), chunk):
        idx = sel[s : s + chunk]
        h_c = flat_h[idx].requires_grad_(True)  # [C, D]
        lp = _chunk_logprobs(h_c, weight, bias, flat_t[idx], temperature)  # [C]
        lp.backward((flat_g[idx]).to(lp.dtype))
        grad_h[idx] = h_c.grad
    return grad_h.reshape(B, T, D)


def set_checkpointing(model, on: bool) -> None:
    """Turn the model's activation checkpointing on or off (either transformers API, no
    deprecation warning); a no-op when it is already so."""
    new_api = hasattr(type(model), "is_activation_checkpointing")  # transformers >= 5.x names
    if on == bool(getattr(model, "is_activation_checkpointing" if new_api else "is_gradient_checkpointing", False)):
        return
    kwargs = {"use_reentrant": False}
    if new_api:
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def loss_and_backward(model, batch: TokenBatch, loss_fn: LossFn, *, mode: str = "streambp",
                      chunk: int = 256, temperature: float = 1.0, max_tokens: int = 0,
                      logprobs: torch.Tensor | None = None):
    """Forward, loss and backward for one micro-batch; gradients accumulate in `.grad`.

    mode: 'standard' builds full [B, T, V] logits (reference / comparison only);
    'chunked' uses the chunked head with an ordinary backward through the layers;
    'checkpoint' adds activation checkpointing of the layers; 'streambp' adds the
    sequence-chunked layer backward of `streambp/layers.py` (activation memory independent
    of T). Returns (loss, metrics, logprobs [B, T]).

    'chunked' with `max_tokens` > 0 and a batch of more positions: `row_groups_backward`,
    activations of at most `max_tokens` positions at a time. `logprobs` [B, T] (this batch's
    log-probs under the current weights, from `sequence_logprobs` with the same chunk,
    temperature and max_tokens) saves it the no-grad pass.
    """
    set_checkpointing(model, mode == "checkpoint")  # a later non-checkpoint call must not stay checkpointed
    if mode == "chunked" and not _fits(batch, max_tokens):
        return row_groups_backward(model, batch, loss_fn, chunk=chunk, temperature=temperature,
                                   max_tokens=max_tokens, logprobs=logprobs)
    weight, bias = lm_head_params(model)
    if mode == "standard":
        logits = _upcast(model(input_ids=batch.input_ids, use_cache=False).logits)  # [B, T, V]
        logp = torch.log_softmax(logits / temperature, -1).gather(-1, batch.targets[..., None]).squeeze(-1)
        logp = torch.where(batch.mask != 0, logp, torch.zeros_like(logp))
        out = loss_fn(logp)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        loss.backward()
        return loss.detach(), metrics, logp.detach()
    if mode == "streambp":
        layers.check_supported(model)
        return streambp_loss_and_backward(model, batch, loss_fn, chunk=chunk, temperature=temperature)
    hidden = final_hidden(model, batch.input_ids)  # [B, T, D]
    loss, metrics, grad_h, logp = backward_chunked_head(
        hidden, weight, bias, batch.targets, batch.mask, loss_fn, chunk, temperature
    )
    hidden.backward(grad_h)
    return loss, metrics, logp


def row_groups_backward(model, batch: TokenBatch, loss_fn: LossFn, *, chunk: int, temperature: float,
                        max_tokens: int, logprobs: torch.Tensor | None = None):
    """The chunked backward with the rows split, so that activations of at most `max_tokens`
    positions exist at once, for any loss of the whole batch's log-probs (GSPO's sequence
    ratios, DPO's pairs): exact, as the head's split along positions is.

      1. no grad: logp [B, T] by `sequence_logprobs` in the same row groups (skipped when
         the caller hands it over: GRPO's old log-probs, computed under the same weights);
      2. g = dL/dlogp at logp (`loss_grad`);
      3. per row group: body forward with grad, `head_backward` with that group's g, body
         backward. Rows without a masked target are never run.

    Costs one no-grad forward more than the single-pass backward unless `logprobs` is given
    or `loss_fn` is marked `row_separable` (then `separable_groups_backward`, no such pass).
    Returns (loss, metrics, logprobs [B, T])."""
    if logprobs is None and getattr(loss_fn, "row_separable", False):
        return separable_groups_backward(model, batch, loss_fn, chunk=chunk, temperature=temperature,
                                         max_tokens=max_tokens)
    if logprobs is None:
        logprobs = sequence_logprobs(model, batch, chunk, temperature, max_tokens)  # [B, T]
    loss, metrics, g = loss_grad(loss_fn, logprobs)
    weight, bias = lm_head_params(model)
    for rows in row_groups(batch, max_tokens):
        sub = batch[rows]  # cut to the group's width
        hidden = final_hidden(model, sub.input_ids)  # [b, w, D]
        width = sub.input_ids.shape[1]
        hidden.backward(head_backward(hidden, weight, bias, sub.targets, sub.mask, g[rows, :width], chunk, temperature))
    return loss, metrics, logprobs


def row_separable(loss_fn: LossFn) -> LossFn:
    """Mark `loss_fn` as a sum of per-row terms: dL/dlogp at row i depends on row i's log-probs
    only (GRPO's token losses once the step's normaliser is fixed, with the old log-probs the
    rows' own, detached). A row-grouped training pass then needs no no-grad pass first."""
    loss_fn.row_separable = True
    return loss_fn


def separable_groups_backward(model, batch: TokenBatch, loss_fn: LossFn, *, chunk: int, temperature: float,
                              max_tokens: int):
    """`row_groups_backward` for a `row_separable` loss: each row group runs once (body forward
    with grad, its log-probs from the detached hidden states, g at its rows, head and body
    backward), so no group waits for the whole batch's log-probs. g at a group's rows is taken
    on a [B, T] buffer holding the log-probs found so far: by separability the other rows'
    values (zeros for the groups not yet run) do not enter it. The loss and metrics are those
    of the whole buffer at the end. Returns (loss, metrics, logprobs [B, T])."""
    weight, bias = lm_head_params(model)
    logp = torch.zeros(batch.mask.shape, device=batch.mask.device,
                       dtype=torch.promote_types(weight.dtype, torch.float32))  # [B, T]
    for rows in row_groups(batch, max_tokens):
        sub = batch[rows]  # cut to the group's width
        width = sub.input_ids.shape[1]
        hidden = final_hidden(model, sub.input_ids)  # [b, w, D]
        logp[rows, :width] = chunked_logprobs(hidden.detach(), weight, bias, sub.targets, sub.mask, chunk,
                                              temperature)
        _, _, g = loss_grad(loss_fn, logp)  # [B, T]; exact at `rows`
        hidden.backward(head_backward(hidden, weight, bias, sub.targets, sub.mask, g[rows, :width], chunk, temperature))
    with torch.no_grad():
        out = loss_fn(logp)
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    return loss.detach(), metrics, logp


def streambp_loss_and_backward(
    model,
    batch: TokenBatch,
    loss_fn: LossFn,
    *,
    chunk: int = 256,
    temperature: float = 1.0,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
):
    """`layers.streambp_backward` with the chunked head of this module (`backward_chunked_head`).

    `batch` is a `TokenBatch` (right-padded: no attention mask needed) and
    `loss_fn(logprobs [B, T]) -> loss | (loss, metrics)`. Gradients accumulate in
    `.grad`. With `inputs_embeds` [B, T, D] (token embeddings with video features spliced
    in, say; `batch.input_ids` is then unused) the gradient flows on into whatever built
    them if they require grad. Vision-language models need their M-RoPE `position_ids`;
    `key_bias` [B, T]: a per-key attention bias (proportional attention on reduced videos).
    Returns (loss, metrics, logprobs [B, T]) like `loss_and_backward`.
    """
    head = model.get_output_embeddings()
    seen = {}

    def head_backward(final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, metrics, grad, logp = backward_chunked_head(
            final, head.weight, getattr(head, "bias", None), batch.targets, batch.mask, loss_fn, chunk, temperature
        )
        seen.update(metrics=metrics, logp=logp)
        return loss, grad

    loss, grad_embeds = layers.streambp_backward(
        model,
        head_backward,
        input_ids=batch.input_ids if inputs_embeds is None else None,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        chunk=chunk,
        key_bias=key_bias,
    )
    if grad_embeds is not None and inputs_embeds.requires_grad:
        inputs_embeds.backward(grad_embeds)
    return loss, seen["metrics"], seen["logp"]
