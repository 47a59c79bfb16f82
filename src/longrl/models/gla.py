"""Gated Linear Attention (GLA) and a small GLA language model.

Paper: Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient
Training", arXiv 2312.06635. Per head, with a data-dependent decay
alpha_t in (0, 1)^{d_k}:

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t        # [d_k, d_v]
    o_t = q_t S_t                                  # [d_v]

The gates are carried in log space, g_t = log(alpha_t) <= 0, so every decay
product is an exp of a non-positive sum and never overflows.

Letters: B batch, H heads, T tokens, N chunks, C chunk size, K = d_k, V = d_v,
D model width.

Departures from the paper:
- The chunked form computes the intra-chunk decay matrix as an explicit
  [C, C, K] tensor of exp(b_t - b_s) for s <= t (all exponents <= 0) instead of
  the paper's secondary-chunk trick in half precision; simple and exactly
  stable, at C times the memory of q. On CUDA with `fla` installed the layer
  uses fla's `chunk_gla` kernel instead.
- Inputs in half precision are computed in float32 and cast back.
- The gate is logsigmoid(x W_down W_up + b) / 16 as in the paper, but the
  output uses RMSNorm per head (not LayerNorm) and a swish output gate.
- The hybrid model's sliding-window softmax layers (InfiniteVL-style) use no
  positional encoding: the GLA layers already make the model order-aware.

Decoding: each layer takes a `LayerState` (GLA: the recurrent state; sliding window:
the last window-1 keys/values), so one new token costs O(1) in the sequence length.
`GLAForCausalLM` below is a plain module (sequence-parallel tests and benchmarks);
the recipes train the same layers as the Hugging Face model of `gla_hf.py`, which
imports this module (never the reverse). This file imports nothing from longrl: a saved
checkpoint carries a copy of it beside `gla_hf.py`, for `trust_remote_code` loading.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

try:  # optional fused kernels; never required
    from fla.ops.gla import chunk_gla as _fla_chunk_gla
except ImportError:  # pragma: no cover - fla is not installed on CPU machines
    _fla_chunk_gla = None


# ----------------------------------------------------------------------------
# GLA math: pure tensor functions, layout [B, H, T, *]
# ----------------------------------------------------------------------------

def gla_recurrent(q, k, v, g, scale=None, initial_state=None):
    """Token-by-token GLA recurrence; the reference the chunked form is tested against.

    q, k, g: [B, H, T, K]; v: [B, H, T, V]; g = log decay (<= 0).
    Returns o [B, H, T, V] and the final state [B, H, K, V].
    """
    B, H, T, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]  # [B, H, K, V]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, S))
    return torch.stack(outs, dim=2), S


def _chunks(x, chunk_size):
    """[B, H, T, D] -> [B, H, N, C, D], zero-padding T up to a multiple of C.

    Zero padding is harmless: a padded token has k = 0 (adds nothing to the state)
    and g = 0 (decay 1, keeps the state), and its outputs are cut off.
    """
    B, H, T, D = x.shape
    pad = -T % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.view(B, H, -1, chunk_size, D)


def gla_chunk_states(k, v, g, chunk_size, initial_state=None):
    """States at the start of every chunk, and the final state.

    k, g: [B, H, T, K]; v: [B, H, T, V]. Returns states [B, H, N, K, V]
    (states[:, :, n] is the state before chunk n) and final [B, H, K, V].
    """
    kc, vc, gc = (_chunks(x, chunk_size) for x in (k, v, g))  # [B, H, N, C, *]
    b = gc.cumsum(-2)  # [B, H, N, C, K] log decay from chunk start, inclusive
    b_last = b[..., -1:, :]  # [B, H, N, 1, K]
    # each token's contribution decayed to the chunk end: exp(b_last - b_s) <= 1
    chunk_kv = torch.einsum("bhnck,bhncv->bhnkv", kc * (b_last - b).exp(), vc)  # [B, H, N, K, V]
    decay = b_last.squeeze(-2).exp().unsqueeze(-1)  # [B, H, N, K, 1]
    S = k.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1]) if initial_state is None else initial_state
    states = []
    for n in range(kc.shape[2]):
        states.append(S)
        S = decay[:, :, n] * S + chunk_kv[:, :, n]  # [B, H, K, V]
    return torch.stack(states, dim=2), S


def gla_chunk_outputs(q, k, v, g, states, chunk_size, scale=None):
    """Outputs given the per-chunk start states from `gla_chunk_states`.

    Intra-chunk: A[t, s] = sum_k q_t k_s exp(b_t - b_s) for s <= t, with the
    decay built from log-space differences (all <= 0 after masking).
    Inter-chunk: (q_t * exp(b_t)) @ state at chunk start. Returns o [B, H, T, V].
    """
    T, K = q.shape[-2:]
    scale = K ** -0.5 if scale is None else scale
    qc, kc, vc, gc = (_chunks(x, chunk_size) for x in (q, k, v, g))  # [B, H, N, C, *]
    qc = qc * scale
    b = gc.cumsum(-2)  # [B, H, N, C, K]
    diff = b.unsqueeze(-2) - b.unsqueeze(-3)  # [B, H, N, C(t), C(s), K]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()  # [C, C]
    # mask before exp so the (positive) s > t entries never reach exp
    decay = diff.masked_fill(~causal[..., None], float("-inf")).exp()  # [B, H, N, C, C, K]
    attn = torch.einsum("bhntk,bhntsk,bhnsk->bhnts", qc, decay, kc)  # [B, H, N, C, C]
    o = attn @ vc + torch.einsum("bhnck,bhnkv->bhncv", qc * b.exp(), states)  # [B, H, N, C, V]
    return o.flatten(2, 3)[:, :, :T]


def gla_chunked(q, k, v, g, chunk_size=16, scale=None, initial_state=None):
    """Chunked GLA; same result as `gla_recurrent`. Returns o [B, H, T, V], final [B, H, K, V]."""
    states, final = gla_chunk_states(k, v, g, chunk_size, initial_state)
    return gla_chunk_outputs(q, k, v, g, states, chunk_size, scale), final


def gla_attend(q, k, v, g, chunk_size=16, scale=None, initial_state=None):
    """Chunked GLA, through fla's fused kernel when it is installed and inputs are on CUDA."""
    if _fla_chunk_gla is not None and q.is_cuda:
        tr = lambda x: x.transpose(1, 2)  # fla wants [B, T, H, *]
        o, final = _fla_chunk_gla(q=tr(q), k=tr(k), v=tr(v), g=tr(g), scale=scale,
                                  initial_state=initial_state, output_final_state=True)
        return tr(o), final
    return gla_chunked(q, k, v, g, chunk_size, scale, initial_state)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class GLAttention(nn.Module):
    """Multi-head GLA: q/k/v/gate/output projections, per-head RMSNorm, swish output gate.

    `forward(x, sp=None, valid=None, state=None)`: x [B, T, D]. With `sp` (an object
    with an `attend(q, k, v, g, chunk_size, scale)` method, e.g.
    `longrl.parallel.gla_sp.GLASequenceParallel`) x is this rank's shard of the
    sequence and the state is passed between ranks. `valid` [B, T] or [T] marks real
    tokens; padded ones get k = 0 and g = 0 so they leave the state untouched. `state`
    (a `LayerState`, decoding) holds the recurrent state S [B, H, K, V]: it is read as
    the initial state and replaced by the final one.
    """

    def __init__(self, d_model, num_heads, key_dim=None, value_dim=None, gate_low_rank=16,
                 gate_normaliser=16.0, chunk_size=16, output_gate=True):
        super().__init__()
        key_dim = key_dim or d_model // 2  # the paper halves the key width
        value_dim = value_dim or d_model
        assert key_dim % num_heads == 0 and value_dim % num_heads == 0
        self.num_heads, self.chunk_size, self.gate_normaliser = num_heads, chunk_size, gate_normaliser
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        # low-rank gate: few parameters, as in the paper
        self.gate_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank, bias=False),
                                       nn.Linear(gate_low_rank, key_dim, bias=True))
        self.out_gate = nn.Linear(d_model, value_dim, bias=False) if output_gate else None
        self.out_norm = RMSNorm(value_dim // num_heads)
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)

    def forward(self, x, sp=None, valid=None, state=None):
        B, T, _ = x.shape
        heads = lambda y: y.view(B, T, self.num_heads, -1).transpose(1, 2)  # [B, H, T, *]
        dtype = x.dtype
        cdtype = torch.promote_types(dtype, torch.float32)  # half precision -> float32 math
        q, k, v = (heads(p(x)).to(cdtype) for p in (self.q_proj, self.k_proj, self.v_proj))
        g = heads(F.logsigmoid(self.gate_proj(x)) / self.gate_normaliser).to(cdtype)  # [B, H, T, K]
        if valid is not None:
            m = valid.expand(B, T)[:, None, :, None].to(cdtype)  # [B, 1, T, 1]
            k, g = k * m, g * m
        init = None if state is None else state.S
        if sp is not None:
            o, final = sp.attend(q, k, v, g, self.chunk_size)
        elif T == 1 and init is not None:  # one decoding step: the recurrence, no chunk padding
            o, final = gla_recurrent(q, k, v, g, initial_state=init)
        else:
            o, final = gla_attend(q, k, v, g, self.chunk_size, initial_state=init)
        if state is not None:
            state.S = final
        o = self.out_norm(o.transpose(1, 2)).to(dtype)  # [B, T, H, V/H]
        o = o.reshape(B, T, -1)  # [B, T, V]
        if self.out_gate is not None:
            o = o * F.silu(self.out_gate(x))
        return self.o_proj(o)  # [B, T, D]


def window_attention_blocks(q, k, v, window, valid=None):
    """Causal softmax attention over the last `window` tokens, block by block.

    q, k, v: [B, H, T, hd]; valid [B, T] bool or None (False: a padding key nobody but
    itself attends to). Each query block of W = `window` tokens sees its own block and
    the previous one, so memory is O(T * W), never [T, T]. Returns o [B, H, T, hd].
    """
    B, H, T, hd = q.shape
    W = window
    pad = -T % W
    q, k, v = (F.pad(y, (0, 0, 0, pad)) for y in (q, k, v))  # [B, H, Tp, hd]
    nb = q.shape[2] // W
    blk = lambda y: y.unflatten(2, (nb, W))  # [B, H, nb, W, *]
    prev = lambda y: torch.cat([torch.zeros_like(y[:, :, :1]), y[:, :, :-1]], dim=2)
    kb, vb = blk(k), blk(v)
    k2, v2 = torch.cat([prev(kb), kb], dim=3), torch.cat([prev(vb), vb], dim=3)  # [B, H, nb, 2W, hd]
    i = torch.arange(W, device=q.device)[:, None] + W  # query position inside [prev | cur]
    j = torch.arange(2 * W, device=q.device)[None, :]
    allowed = (j <= i) & (j > i - W)  # [W, 2W] causal window of W tokens
    first = torch.zeros(nb, 1, 1, dtype=torch.bool, device=q.device)
    first[0] = True  # block 0 has no previous block
    allowed = allowed & ~(first & (j < W))  # [nb, W, 2W]
    if valid is not None:
        vk = blk(F.pad(valid, (0, pad))[:, None, :, None]).squeeze(-1)  # [B, 1, nb, W]
        vk2 = torch.cat([prev(vk), vk], dim=3)  # [B, 1, nb, 2W]
        # a padding query sees only itself: no all-masked row, so no NaN reaches later layers
        allowed = allowed & (vk2[:, :, :, None, :] | (j == i))  # [B, 1, nb, W, 2W]
    o = F.scaled_dot_product_attention(blk(q), k2, v2, attn_mask=allowed)  # [B, H, nb, W, hd]
    return o.flatten(2, 3)[:, :, :T]


def window_attention_cached(q, k, v, valid, window):
    """Window attention of the last T queries over L + T keys (the first L from a cache).

    q: [B, H, T, hd]; k, v: [B, H, L+T, hd]; valid [B, L+T] bool. For decoding, where T is
    small and L < window: the mask is [B, T, L+T]. Returns o [B, H, T, hd].
    """
    T, S = q.shape[2], k.shape[2]
    i = torch.arange(T, device=q.device)[:, None] + (S - T)  # absolute query positions
    j = torch.arange(S, device=q.device)[None, :]
    allowed = (j <= i) & (j > i - window) & (valid[:, None, :] | (j == i))  # [B, T, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])


class SlidingWindowAttention(nn.Module):
    """Causal softmax attention over the last `window` tokens (`window_attention_blocks`).

    `forward(x, sp=None, valid=None, state=None)`: `valid` [B, T] marks real tokens (left
    padding); `state` (a `LayerState`, decoding) keeps the last window-1 keys and values.
    """

    def __init__(self, d_model, num_heads, window):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, sp=None, valid=None, state=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # [B, H, T, hd]
        valid = None if valid is None else valid.expand(B, T).bool()  # [B, T]
        if sp is not None:  # this rank's shard: the window reaches back into the previous ranks' tokens
            if state is not None:
                raise ValueError("sequence-parallel sliding-window attention is for training passes, not decoding")
            ok = valid if valid is not None else x.new_ones(B, T, dtype=torch.bool)
            hk, hv, h_ok = sp.window_halo(k, v, ok, self.window - 1)  # [B, H, L, hd], [B, L]
            L = hk.shape[2]
            q = torch.cat([q.new_zeros(B, self.num_heads, L, q.shape[-1]), q], dim=2)  # halo queries: outputs dropped
            o = window_attention_blocks(q, torch.cat([hk, k], 2), torch.cat([hv, v], 2), self.window,
                                        torch.cat([h_ok, ok], 1))[:, :, L:]
        elif state is not None and state.k is not None:
            k = torch.cat([state.k, k], dim=2)  # [B, H, L+T, hd]
            v = torch.cat([state.v, v], dim=2)
            valid = torch.cat([state.valid, valid if valid is not None else k.new_ones(B, T, dtype=torch.bool)], 1)
            o = window_attention_cached(q, k, v, valid, self.window)
        else:
            o = window_attention_blocks(q, k, v, self.window, valid)
        if state is not None:  # the next query sees at most window-1 earlier tokens
            keep = max(k.shape[2] - (self.window - 1), 0)
            state.k, state.v = k[:, :, keep:], v[:, :, keep:]
            state.valid = (valid if valid is not None else k.new_ones(B, k.shape[2], dtype=torch.bool))[:, keep:]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


# ----------------------------------------------------------------------------
# Language model
# ----------------------------------------------------------------------------

@dataclass
class GLAConfig:
    vocab_size: int = 256
    """Number of token ids."""
    d_model: int = 64
    """Residual stream width."""
    num_layers: int = 2
    """Number of blocks."""
    num_heads: int = 2
    """Attention heads per layer (GLA and sliding-window)."""
    mlp_hidden: int = 128
    """SwiGLU hidden width."""
    chunk_size: int = 16
    """GLA chunk length C; a speed knob, the result does not depend on it."""
    softmax_every: int = 0
    """Hybrid model: every k-th layer (1-based) is sliding-window softmax attention; 0 = pure GLA."""
    window: int = 64
    """Window of the sliding-window softmax layers."""
    tie_embeddings: bool = True
    """Share the embedding matrix with the lm head."""


class LayerState:
    """One layer's decoding state: S [B, H, K, V] (GLA) or the last window-1 keys, values
    [B, H, L, hd] and their validity [B, L] (sliding-window layers)."""

    def __init__(self):
        self.S = self.k = self.v = self.valid = None


class GLABlock(GradientCheckpointingLayer):
    # a GradientCheckpointingLayer so Hugging Face activation checkpointing can wrap it;
    # a plain nn.Module otherwise
    def __init__(self, cfg: GLAConfig, softmax: bool):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.mixer = (SlidingWindowAttention(cfg.d_model, cfg.num_heads, cfg.window) if softmax
                      else GLAttention(cfg.d_model, cfg.num_heads, chunk_size=cfg.chunk_size))
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x, sp=None, valid=None, state=None):
        x = x + self.mixer(self.norm1(x), sp=sp, valid=valid, state=state)
        return x + self.mlp(self.norm2(x))


class GLAForCausalLM(nn.Module):
    """Embedding, blocks of [RMSNorm -> mixer -> residual, RMSNorm -> SwiGLU -> residual], lm head.

    A plain module with no cache; `LongrlGLAForCausalLM` (gla_hf.py) is the Hugging Face
    model with the same blocks that `longrl train model.arch=gla` builds.

    `forward_hidden` returns the final normed hidden states [B, T, D] so callers
    can compute log-probs chunk by chunk with `lm_head` (no full [B, T, V] logits).
    """

    def __init__(self, cfg: GLAConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        k = cfg.softmax_every
        self.layers = nn.ModuleList(GLABlock(cfg, softmax=k > 0 and (i + 1) % k == 0) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward_hidden(self, input_ids, sp=None, valid=None):
        """input_ids [B, T] -> hidden [B, T, D]. With `sp`, input_ids is this rank's shard."""
        x = self.embed(input_ids)  # [B, T, D]
        for layer in self.layers:
            x = layer(x, sp=sp, valid=valid)
        return self.norm(x)

    def forward(self, input_ids, sp=None, valid=None):
        """input_ids [B, T] -> logits [B, T, vocab]. For tests and short sequences."""
        return self.lm_head(self.forward_hidden(input_ids, sp=sp, valid=valid))

