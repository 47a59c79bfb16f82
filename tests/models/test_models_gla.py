"""GLA math (chunked vs token-by-token recurrence), layers and the small GLA language model."""
import math

import pytest
import torch
import torch.nn.functional as F

from longrl.models import gla
from longrl.models.gla import (GLAConfig, GLAForCausalLM, GLAttention, SlidingWindowAttention, gla_attend,
                               gla_chunked, gla_recurrent)


def _inputs(B=2, H=3, T=23, K=5, V=4, dtype=torch.float64, seed=0, gate_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q, k, v = rnd(B, H, T, K), rnd(B, H, T, K), rnd(B, H, T, V)
    g = F.logsigmoid(rnd(B, H, T, K)) * gate_scale  # log decay <= 0
    return q, k, v, g, rnd(B, H, K, V)


def test_recurrence_hand_worked():
    # one head, K = V = 1, scale 1; alpha = (0.5, 0.25)
    q, k, v = (torch.tensor([a, b], dtype=torch.float64).view(1, 1, 2, 1) for a, b in ((1, 2), (3, 1), (2, 5)))
    g = torch.tensor([0.5, 0.25], dtype=torch.float64).log().view(1, 1, 2, 1)
    # S1 = 3*2 = 6, o1 = 6; S2 = 0.25*6 + 1*5 = 6.5, o2 = 2*6.5 = 13
    o, S = gla_recurrent(q, k, v, g, scale=1.0)
    assert o.flatten().tolist() == [6.0, 13.0] and S.item() == 6.5
    # with S0 = 4: S1 = 0.5*4 + 6 = 8, o1 = 8; S2 = 0.25*8 + 5 = 7, o2 = 14
    o, S = gla_chunked(q, k, v, g, chunk_size=2, scale=1.0, initial_state=torch.full((1, 1, 1, 1), 4.0, dtype=torch.float64))
    assert torch.allclose(o.flatten(), torch.tensor([8.0, 14.0], dtype=torch.float64)) and math.isclose(S.item(), 7.0)


@pytest.mark.parametrize("chunk", [1, 4, 7, 23, 64])
def test_chunked_matches_recurrence_with_grads(chunk):
    ins = _inputs()
    a = [x.clone().requires_grad_() for x in ins]
    b = [x.clone().requires_grad_() for x in ins]
    w = torch.randn(2, 3, 23, 4, dtype=torch.float64)
    o_r, S_r = gla_recurrent(*a[:4], initial_state=a[4])
    o_c, S_c = gla_chunked(*b[:4], chunk_size=chunk, initial_state=b[4])
    torch.testing.assert_close(o_c, o_r, atol=1e-12, rtol=0)
    torch.testing.assert_close(S_c, S_r, atol=1e-12, rtol=0)
    ((o_r * w).sum() + S_r.sum()).backward()
    ((o_c * w).sum() + S_c.sum()).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad, x.grad, atol=1e-11, rtol=0)


def test_chunked_is_stable_under_strong_decay():
    # cumulative log decay reaches about -2000 inside a chunk: exp(-b) would overflow
    q, k, v, g, S0 = _inputs(T=40, gate_scale=60.0)
    assert g.sum(-2).min() < -1000
    o_c, S_c = gla_chunked(q, k, v, g, chunk_size=40, initial_state=S0)
    o_r, S_r = gla_recurrent(q, k, v, g, initial_state=S0)
    assert torch.isfinite(o_c).all() and torch.isfinite(S_c).all()
    torch.testing.assert_close(o_c, o_r, atol=1e-12, rtol=0)
    torch.testing.assert_close(S_c, S_r, atol=1e-12, rtol=0)


def test_state_chaining_two_halves_equals_whole():
    q, k, v, g, S0 = _inputs(T=22)
    o, S = gla_chunked(q, k, v, g, chunk_size=4, initial_state=S0)
    o1, S1 = gla_chunked(q[:, :, :9], k[:, :, :9], v[:, :, :9], g[:, :, :9], chunk_size=4, initial_state=S0)
    o2, S2 = gla_chunked(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], g[:, :, 9:], chunk_size=3, initial_state=S1)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), o, atol=1e-12, rtol=0)
    torch.testing.assert_close(S2, S, atol=1e-12, rtol=0)


def test_float32_chunked_close_to_float64_recurrence():
    ins = _inputs()
    o64, _ = gla_recurrent(*ins[:4], initial_state=ins[4])
    o32, _ = gla_chunked(*(x.float() for x in ins[:4]), chunk_size=8, initial_state=ins[4].float())
    torch.testing.assert_close(o32.double(), o64, atol=1e-5, rtol=0)


def test_gla_attention_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    layer = GLAttention(16, num_heads=2, chunk_size=4).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 9, 16)
    x_pad = torch.cat([x, torch.randn(2, 3, 16, dtype=torch.float64)], dim=1)
    valid = torch.arange(12) < 9
    torch.testing.assert_close(layer(x_pad, valid=valid)[:, :9], y, atol=1e-12, rtol=0)


def test_gla_attention_output_independent_of_chunk_size():
    torch.manual_seed(0)
    layer = GLAttention(16, num_heads=4, chunk_size=3).double()
    x = torch.randn(1, 17, 16, dtype=torch.float64)
    y3 = layer(x)
    layer.chunk_size = 16
    torch.testing.assert_close(layer(x), y3, atol=1e-12, rtol=0)


def _dense_window_attention(layer, x):
    B, T, D = x.shape
    q, k, v = layer.qkv(x).view(B, T, 3, layer.num_heads, -1).unbind(2)
    q, k, v = (y.transpose(1, 2) for y in (q, k, v))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (j <= i) & (j > i - layer.window)  # [T, T]: fine in a test
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return layer.o_proj(o.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("T,window", [(13, 4), (8, 4), (3, 5)])
def test_sliding_window_matches_dense_reference(T, window):
    torch.manual_seed(0)
    layer = SlidingWindowAttention(8, num_heads=2, window=window).double()
    x = torch.randn(2, T, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _dense_window_attention(layer, x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("softmax_every", [0, 2])
def test_language_model_is_causal_and_exposes_hidden(softmax_every):
    torch.manual_seed(0)
    cfg = GLAConfig(vocab_size=50, d_model=16, num_layers=4, num_heads=2, mlp_hidden=32, chunk_size=4,
                    softmax_every=softmax_every, window=3)
    model = GLAForCausalLM(cfg).double()
    kinds = [type(b.mixer).__name__ for b in model.layers]
    assert kinds.count("SlidingWindowAttention") == (2 if softmax_every else 0)
    ids = torch.randint(0, 50, (2, 11))
    logits = model(ids)
    assert logits.shape == (2, 11, 50)
    torch.testing.assert_close(model.lm_head(model.forward_hidden(ids)), logits)
    ids2 = ids.clone()
    ids2[:, 7:] = (ids2[:, 7:] + 1) % 50  # change the future only
    torch.testing.assert_close(model(ids2)[:, :7], logits[:, :7], atol=1e-12, rtol=0)
    assert not torch.allclose(model(ids2)[:, 7:], logits[:, 7:])


def test_language_model_learns_a_repeated_sequence():
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2, mlp_hidden=32, chunk_size=8))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    ids = torch.arange(8).repeat(2).view(1, 16)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or gla._fla_chunk_gla is None, reason="needs CUDA and fla")
def test_fla_kernel_matches_chunked_reference():
    q, k, v, g, S0 = (x.float().cuda() for x in _inputs(T=64))
    o_ref, S_ref = gla_chunked(q, k, v, g, chunk_size=16, initial_state=S0)
    o, S = gla_attend(q, k, v, g, initial_state=S0)
    torch.testing.assert_close(o, o_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(S, S_ref, atol=1e-3, rtol=1e-3)
