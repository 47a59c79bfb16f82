"""The sequence-chunked layer backward (streambp/layers.py) equals full backprop.

Reference: the Hugging Face model's own forward with full `[B, T, V]` logits, one
ordinary backward. Every parameter's gradient is compared on its own.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from longrl.errors import UserError
from longrl.streambp.layers import AttentionInputs, chunk_mask, streambp_backward, supports
from longrl.streambp.logprobs import backward_chunked_head

VOCAB = 61
SIZES = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)


def tiny(arch: str, dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    kw = {**SIZES, **overrides}
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=12, **kw))  # head_dim != hidden/heads
    else:
        model = LlamaForCausalLM(LlamaConfig(attention_bias=True, **kw))
    for p in model.parameters():  # untrained norms are all ones; make them matter
        if p.dim() == 1:
            p.data.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).train()


def left_padded(b=3, t=23, pads=(0, 4, 9), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)  # [B, T]
    attn = torch.ones(b, t, dtype=torch.long)
    for i, p in enumerate(pads):
        attn[i, :p] = 0
        ids[i, :p] = 0
    targets = torch.roll(ids, -1, dims=1)  # [B, T]  position t predicts token t+1
    mask = attn.clone().double()
    mask[:, -1] = 0  # the last position predicts nothing
    mask[:, :2] = 0  # a short "prompt" that is not trained
    return ids, attn, targets, mask


# ---- objectives: any function of the per-token log-probs [B, T] ----

def sft(mask):
    return lambda logp: -(logp * mask).sum() / mask.sum()


def ppo(mask, seed=2, eps=0.2):
    g = torch.Generator().manual_seed(seed)
    noise = 0.3 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    adv = torch.randn(mask.shape[0], generator=g, dtype=torch.float64)[:, None]  # [B, 1]

    def loss(logp):
        old = (logp.detach() + noise) * mask  # [B, T]
        ratio = torch.exp((logp - old) * mask)  # [B, T]
        pg = torch.maximum(-ratio * adv, -ratio.clamp(1 - eps, 1 + eps) * adv)  # [B, T]
        return (pg * mask).sum() / mask.sum()
    return loss


def gspo(mask, seed=3, eps=0.05):
    g = torch.Generator().manual_seed(seed)
    noise = 0.1 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    adv = torch.randn(mask.shape[0], generator=g, dtype=torch.float64)  # [B]

    def loss(logp):
        old = (logp.detach() + noise) * mask
        s = torch.exp(((logp - old) * mask).sum(1) / mask.sum(1))  # [B] sequence ratio
        return torch.maximum(-s * adv, -s.clamp(1 - eps, 1 + eps) * adv).mean()
    return loss


def dpo(mask, beta=0.5):
    ref = torch.tensor([-40.0, -35.0, -38.0, -41.0], dtype=torch.float64)  # reference sums

    def loss(logp):
        seq = (logp * mask).sum(1) - ref[: mask.shape[0]]  # [B]; rows (0, 1) chosen, (2, 3) rejected
        return -F.logsigmoid(beta * (seq[:2] - seq[2:])).mean()
    return loss


OBJECTIVES = {"sft": sft, "ppo": ppo, "gspo": gspo, "dpo": dpo}


# ---- the two ways of computing gradients ----

def reference(model, ids, attn, targets, mask, loss_fn, position_ids=None):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False).logits
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)  # [B, T]
    loss = loss_fn(torch.where(mask != 0, logp, 0.0))
    loss.backward()
    return loss.detach(), grads(model)


def streamed(model, ids, attn, targets, mask, loss_fn, chunk, position_ids=None, head_chunk=7):
    model.zero_grad(set_to_none=True)
    head = model.get_output_embeddings()

    def head_backward(final):
        loss, _, grad, _ = backward_chunked_head(final, head.weight, None, targets, mask, loss_fn, head_chunk)
        return loss, grad

    loss, none = streambp_backward(model, head_backward, input_ids=ids, attention_mask=attn,
                                   position_ids=position_ids, chunk=chunk)
    assert none is None
    return loss, grads(model)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(loss, g, loss_ref, g_ref, tol):
    assert torch.allclose(loss.double(), loss_ref.double(), rtol=tol, atol=0), (loss, loss_ref)
    assert g.keys() == g_ref.keys()
    assert len(g_ref) > 0
    for name, ref in g_ref.items():
        assert ref.norm() > 0, f"{name}: zero reference gradient; the test would not see an error"
        err = float((g[name] - ref).norm() / ref.norm())
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


# ---- exactness ----

@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_gradient_matches_full_backprop_float64(arch, objective):
    model = tiny(arch)
    b = 4 if objective == "dpo" else 3
    ids, attn, targets, mask = left_padded(b=b, pads=(0, 4, 9, 2)[:b])
    loss_fn = OBJECTIVES[objective](mask)
    ref = reference(model, ids, attn, targets, mask, loss_fn)
    got = streamed(model, ids, attn, targets, mask, loss_fn, chunk=5)  # 5 does not divide 23
    assert_same(*got, *ref, tol=1e-9)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_every_gradient_matches_full_backprop_float32(arch):
    model = tiny(arch, dtype=torch.float32)
    ids, attn, targets, mask = left_padded()
    loss_fn = ppo(mask)
    ref = reference(model, ids, attn, targets, mask, loss_fn)
    got = streamed(model, ids, attn, targets, mask, loss_fn, chunk=6)
    assert_same(*got, *ref, tol=1e-4)


@pytest.mark.parametrize("chunk", [1, 8, 23, 100])
def test_chunk_size_does_not_change_gradients(chunk):
    model = tiny("qwen2")
    ids, attn, targets, mask = left_padded()
    ref = reference(model, ids, attn, targets, mask, sft(mask))
    assert_same(*streamed(model, ids, attn, targets, mask, sft(mask), chunk=chunk), *ref, tol=1e-9)


def test_right_padding_and_explicit_positions():
    model = tiny("qwen3")
    ids, attn, targets, mask = left_padded()
    attn, ids, targets, mask = attn.flip(1), ids.flip(1), targets.flip(1), mask.flip(1)  # right padding
    positions = (attn.cumsum(1) - 1).clamp_min(0)  # [B, T]
    loss_fn = gspo(mask)
    ref = reference(model, ids, attn, targets, mask, loss_fn, position_ids=positions)
    got = streamed(model, ids, attn, targets, mask, loss_fn, chunk=4, position_ids=positions)
    assert_same(*got, *ref, tol=1e-9)


def test_packed_sequences_follow_position_resets():
    # No attention mask + positions that restart: HF treats each run as its own sequence.
    model = tiny("llama")
    ids, _, targets, mask = left_padded(b=2, pads=(0, 0))
    positions = torch.cat([torch.arange(9), torch.arange(14)])[None].repeat(2, 1)  # [B, T]
    ref = reference(model, ids, None, targets, mask, sft(mask), position_ids=positions)
    got = streamed(model, ids, None, targets, mask, sft(mask), chunk=5, position_ids=positions)
    assert_same(*got, *ref, tol=1e-9)
    unpacked = streamed(model, ids, None, targets, mask, sft(mask), chunk=5)
    assert not torch.allclose(unpacked[0], ref[0])  # the packing changes the answer


def test_tied_embeddings_and_padding_idx_collect_the_right_gradients():
    ids, attn, targets, mask = left_padded()
    pad = int(ids[0, 5])  # a token that also occurs at trained positions: its row gets no embedding grad
    model = tiny("qwen2", tie_word_embeddings=True, pad_token_id=pad)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.padding_idx == pad
    ref = reference(model, ids, attn, targets, mask, sft(mask))
    assert_same(*streamed(model, ids, attn, targets, mask, sft(mask), chunk=5), *ref, tol=1e-9)


def test_inputs_embeds_returns_their_gradient():
    model = tiny("qwen2")
    ids, attn, targets, mask = left_padded()
    embeds = model.model.embed_tokens(ids).detach() + 0.1 * torch.randn(*ids.shape, SIZES["hidden_size"],
                                                                          dtype=torch.float64)
    leaf = embeds.clone().requires_grad_()
    logits = model(inputs_embeds=leaf, attention_mask=attn).logits
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    sft(mask)(torch.where(mask != 0, logp, 0.0)).backward()
    g_ref = grads(model)
    model.zero_grad(set_to_none=True)
    head = model.lm_head

    def head_backward(final):
        loss, _, grad, _ = backward_chunked_head(final, head.weight, None, targets, mask, sft(mask), 5)
        return loss, grad

    _, g_embeds = streambp_backward(model, head_backward, inputs_embeds=embeds, attention_mask=attn, chunk=6)
    err = (g_embeds - leaf.grad).norm() / leaf.grad.norm()
    assert err < 1e-9
    assert "model.embed_tokens.weight" not in grads(model)  # the caller owns the embedding step
    for name, g in grads(model).items():
        assert float((g - g_ref[name]).norm() / g_ref[name].norm()) < 1e-9, name


# ---- the mask, worked by hand ----

def test_chunk_mask_by_hand():
    att = AttentionInputs(cos=torch.zeros(1, 4, 2), sin=torch.zeros(1, 4, 2),
                          key_keep=torch.tensor([[False, True, True, True]]), segment=None)
    # queries 2, 3 against keys 0..3: causal, and key 0 is padding
    assert chunk_mask(att, 2, 4, 1).tolist() == [[[[False, True, True, False], [False, True, True, True]]]]
    att.key_keep, att.segment = None, torch.tensor([[0, 0, 1, 1]])
    assert chunk_mask(att, 1, 3, 1).tolist() == [[[[True, True, False], [False, False, True]]]]


# ---- what is refused ----

def test_sliding_window_and_unknown_models_are_refused():
    qwen_sw = Qwen2ForCausalLM(Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    mistral = MistralForCausalLM(MistralConfig(**SIZES))
    assert supports(tiny("qwen2")) and supports(tiny("qwen3")) and supports(tiny("llama"))
    for model in (qwen_sw, mistral):
        assert not supports(model)
        with pytest.raises(UserError, match="train.backprop=checkpoint"):
            streambp_backward(model, lambda h: (h.sum(), torch.ones_like(h)), input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_attention_dropout_in_training_is_refused():
    model = tiny("llama", attention_dropout=0.1)
    assert not supports(model)
    assert supports(model.eval())


def test_qwen2_5_vl_text_model_with_mrope_and_video_embeds():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from longrl.streambp.logprobs import TokenBatch
    from longrl.streambp.logprobs import streambp_loss_and_backward as loss_and_backward

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=64),
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).double().train()
    ids, attn, targets, mask = left_padded()
    b, t = ids.shape
    # M-RoPE positions [3, B, T]: time runs on, height/width repeat over a "video" span
    time_pos = torch.arange(t).expand(b, -1)
    span = (time_pos >= 6) & (time_pos < 14)
    positions = torch.stack([time_pos, torch.where(span, time_pos % 2 + 6, time_pos),
                             torch.where(span, time_pos // 2 + 3, time_pos)])  # [3, B, T]
    video = torch.randn(b, t, 64, dtype=torch.float64)  # stands for spliced-in video features

    def embeds():
        return (model.model.language_model.embed_tokens(ids) + 0.5 * video * span[..., None]).requires_grad_()

    loss_fn = gspo(mask)
    ref_embeds = embeds()
    hidden = model.model.language_model(inputs_embeds=ref_embeds, position_ids=positions,
                                        attention_mask=attn).last_hidden_state
    logp = torch.log_softmax(model.lm_head(hidden), -1).gather(-1, targets[..., None]).squeeze(-1)
    loss_ref = loss_fn(torch.where(mask != 0, logp, 0.0))
    ref_embeds.retain_grad()
    loss_ref.backward()
    g_ref, ge_ref = grads(model), ref_embeds.grad.clone()

    model.zero_grad(set_to_none=True)
    got_embeds = embeds()
    got_embeds.retain_grad()
    loss, _, _ = loss_and_backward(model, TokenBatch(ids, targets, mask), loss_fn, chunk=6,
                                   inputs_embeds=got_embeds, attention_mask=attn, position_ids=positions)
    assert float((got_embeds.grad - ge_ref).norm() / ge_ref.norm()) < 1e-9
    assert_same(loss, grads(model), loss_ref.detach(), g_ref, tol=1e-9)  # includes embed_tokens, via the embeds


def test_expanded_kv_attention_equals_grouped():
    # The CUDA path (K/V repeated to every query head) against the CPU one (enable_gqa).
    from longrl.streambp.layers import attend

    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 5, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    att = AttentionInputs(cos=torch.zeros(1, 9, 8), sin=torch.zeros(1, 9, 8),
                          key_keep=torch.tensor([[True] * 9, [False] * 3 + [True] * 6]), segment=None)
    mask = chunk_mask(att, 4, 9, 2)
    outs = []
    for expand in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, mask, 0.3, expand_kv=expand)
        out.pow(2).sum().backward()
        outs.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
