"""Multi-process checks of Ulysses sequence parallelism; run by test_parallel_ulysses.py.

    python tests/parallel/_worker_ulysses.py OUT.json

Starts 4 gloo processes. Each case runs on the whole group (P = 4) and, at the
same time, on the sub-groups {0, 1} and {2, 3} (P = 2, group ranks differing
from global ranks). Every rank also runs the single-process computation on the
full sequence and records the largest differences; rank 0 writes all records
to OUT.json for the test to judge. Errors are relative to the reference's
largest magnitude (at least 1), so one tolerance fits values and gradients.
"""
import json
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from longrl.parallel.dist import all_reduce_gradients
from longrl.parallel.local_spawn import spawn_local
from longrl.models.vlm import (VideoEmbeds, as_leaf, build_tiny_vlm, build_vlm_tokenizer, patchify, video_hidden,
                               video_loss_and_backward, video_prompt_ids)
from longrl.parallel.mrsp_encode import frame_slice, mrsp_encode, mrsp_encode_video
from longrl.parallel.sp_video import sp_video_logprobs, sp_video_loss_and_backward
from longrl.parallel.ulysses import (ATTN_NAME, enable_ulysses, shard_for_sp, shard_positions, sp_final_hidden,
                                     sp_loss_and_backward, sp_sequence_logprobs)
from longrl.rl.losses import loss_normalizer, policy_loss
from longrl.streambp.logprobs import (backward_chunked_head, chunked_logprobs, final_hidden, loss_and_backward,
                                     make_batch, sequence_logprobs)

B, T, VOCAB = 2, 13, 40  # T = 13 is divisible by neither 2 nor 4
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)
MODELS = {  # kv heads: 2 (< P = 4: repeated there), 1 (repeated at P = 2 and 4), 2 with q/k norms
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **COMMON)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, **COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, head_dim=8, **COMMON)),
}


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


def _twins(name, dtype):
    torch.manual_seed(0)
    ref = MODELS[name]().to(dtype)
    model = MODELS[name]().to(dtype)
    model.load_state_dict(ref.state_dict())
    return model, ref


def _grad_errs(model, ref, group):
    """Sum the ranks' gradient shares (a rank whose shard has no trained token has no
    LM-head gradient at all), then compare every parameter with the reference."""
    all_reduce_gradients(model, group)
    errs = {}
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        if p_ref.grad is None:  # an untied LM head in a body-only loss
            errs[f"grad_{name}"] = 0.0 if p.grad is None else float("inf")
        else:
            errs[f"grad_{name}"] = _err(p.grad, p_ref.grad)
    return errs


def body_case(group, name, dtype):
    """Final hidden states and every parameter gradient of a random linear loss on them."""
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    model, ref = _twins(name, dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    w = torch.randn(B, T, 32, generator=gen, dtype=dtype)
    h_ref = final_hidden(ref, ids)  # [B, T, D]
    (h_ref * w).sum().backward()
    h = sp_final_hidden(model, shard_for_sp(ids, rank, P), shard_positions(B, T, rank, P), group)  # [B, L, D]
    (h * shard_for_sp(w, rank, P)).sum().backward()  # padded positions carry weight 0
    L = h.shape[1]
    real = (torch.arange(rank * L, (rank + 1) * L) < T)  # [L]
    errs = {"hidden": _err(h.detach()[:, real], shard_for_sp(h_ref.detach(), rank, P)[:, real]) if real.any() else 0.0}
    errs.update(_grad_errs(model, ref, group))
    restored = model.config._attn_implementation == ref.config._attn_implementation != ATTN_NAME
    return dict(kind="body", model=name, P=P, rank=rank, dtype=str(dtype), errs=errs, restored=restored,
                n_real=int(real.sum()))


def _rl_batch(dtype):
    """Two rows of different lengths (13 and 9 tokens), response-only mask, old log-probs, advantages."""
    gen = torch.Generator().manual_seed(2)
    tok = lambda n: torch.randint(1, VOCAB, (n,), generator=gen).tolist()
    batch = make_batch([tok(4), tok(3)], [tok(9), tok(6)], pad_id=0)  # [2, 13]
    # old != current, and the sequence ratios of row 1 fall below 1 - clip_low: PPO and GSPO both clip
    noise = 0.3 * torch.randn(batch.mask.shape, generator=gen, dtype=dtype) + torch.tensor([[0.0], [0.4]], dtype=dtype)
    adv = torch.tensor([1.0, -0.7], dtype=dtype)
    return batch, noise, adv


def head_case(group, name, dtype, loss_agg, kind, checkpoint=False):
    """sp_loss_and_backward (chunked head, loss on gathered log-probs) vs loss_and_backward."""
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    model, ref = _twins(name, dtype)
    if checkpoint:  # attention is recomputed inside the backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    batch, noise, adv = _rl_batch(dtype)
    old = (sequence_logprobs(ref, batch, chunk=5) + noise) * batch.mask  # [B, T]
    norm = loss_normalizer(batch.mask, loss_agg)

    def loss_fn(logp):
        return policy_loss(logp, old, adv, batch.mask, normalizer=norm, loss_agg=loss_agg, kind=kind)

    loss_ref, m_ref, logp_ref = loss_and_backward(ref, batch, loss_fn, mode="chunked", chunk=5)
    loss, m, logp = sp_loss_and_backward(model, batch, loss_fn, group, chunk=3)
    lp_nograd = sp_sequence_logprobs(model, batch, group, chunk=4)
    clip, clip_ref = (x["clip/frac_low"] + x["clip/frac_high"] for x in (m, m_ref))
    errs = {"loss": _err(loss, loss_ref), "logp": _err(logp, logp_ref), "logp_nograd": _err(lp_nograd, logp_ref),
            "clip_frac": abs(clip - clip_ref)}
    errs.update(_grad_errs(model, ref, group))
    clipped = clip_ref > 0
    return dict(kind="head", model=name, P=P, rank=rank, dtype=str(dtype), loss_agg=loss_agg, loss_kind=kind,
                checkpoint=checkpoint, errs=errs, clipped=clipped)


def refusals(group):
    """Sliding-window layers and sizes that do not split are refused before any forward."""
    out = {}
    cfg = dict(COMMON, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    try:
        with enable_ulysses(Qwen2ForCausalLM(Qwen2Config(**cfg)), group):
            pass
        out["sliding"] = "accepted"
    except NotImplementedError:
        out["sliding"] = "refused"
    two_heads = dict(COMMON, num_attention_heads=2, num_key_value_heads=2)
    try:
        with enable_ulysses(Qwen2ForCausalLM(Qwen2Config(**two_heads)), group):
            pass
        out["heads"] = "accepted"
    except ValueError:
        out["heads"] = "refused"
    return dict(kind="refusals", P=dist.get_world_size(group), rank=dist.get_rank(group), **out)


class TinyVision(torch.nn.Module):
    """Frames [F, 3, 8, 8] -> 4 tokens per frame [4F, 6]; with unit 2, frame pairs are averaged
    first (a temporal patch) -> [2F, 6]."""

    def __init__(self, unit):
        super().__init__()
        self.unit = unit
        self.conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4)
        self.proj = torch.nn.Linear(5, 6)

    def forward(self, frames):
        x = frames.view(-1, self.unit, *frames.shape[1:]).mean(1)  # [F/unit, 3, 8, 8]
        x = self.conv(x).flatten(2).transpose(1, 2)  # [F/unit, 4, 5]
        return torch.tanh(self.proj(x)).reshape(-1, 6)  # [4F/unit, 6]


def mrsp_case(group, n_frames, unit):
    """Gathered embeddings and vision gradients vs one process; each rank weights the
    embeddings differently, as each uses them in its own part of the sequence."""
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(5)
    ref, vision = TinyVision(unit).double(), TinyVision(unit).double()
    vision.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(6)
    frames = torch.randn(n_frames, 3, 8, 8, generator=gen, dtype=torch.float64)
    weights = torch.randn(P, 4 * n_frames // unit, 6, generator=gen, dtype=torch.float64)  # one per rank
    emb_ref = ref(frames)
    (emb_ref * weights.sum(0)).sum().backward()
    emb = mrsp_encode(frames, vision, group, unit=unit)
    (emb * weights[rank]).sum().backward()
    errs = {"embeddings": _err(emb.detach(), emb_ref.detach())}
    errs.update(_grad_errs(vision, ref, group))
    encoded = frame_slice(n_frames, rank, P, unit)
    return dict(kind="mrsp", model="tiny-vision", P=P, rank=rank, dtype="torch.float64", n_frames=n_frames, unit=unit,
                errs=errs, n_encoded=encoded.stop - encoded.start)


def mrsp_video_case(group, n_frames):
    """The tiny Qwen2.5-VL's own vision tower (window + full attention, 2-frame temporal
    patches, 2x2 merge): gathered embeddings and every vision gradient vs one process."""
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(7)
    ref = build_tiny_vlm(build_vlm_tokenizer()).double().model.visual
    vision = build_tiny_vlm(build_vlm_tokenizer()).double().model.visual
    vision.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(8)
    pv, grid = patchify(torch.randint(0, 256, (n_frames, 28, 56, 3), dtype=torch.uint8, generator=gen))
    pv = pv.double()  # [gt*2*4, 3*2*14*14]
    emb_ref = ref(pv, grid_thw=grid.view(1, 3)).pooler_output  # [gt*2, D]
    weights = torch.randn(P, *emb_ref.shape, generator=gen, dtype=torch.float64)  # one per rank
    (emb_ref * weights.sum(0)).sum().backward()
    emb = mrsp_encode_video(vision, pv, grid, group)
    (emb * weights[rank]).sum().backward()
    errs = {"embeddings": _err(emb.detach(), emb_ref.detach())}
    errs.update(_grad_errs(vision, ref, group))
    encoded = frame_slice(int(grid[0]), rank, P)
    return dict(kind="mrsp", model="qwen2.5-vl", P=P, rank=rank, dtype="torch.float64", n_frames=n_frames, unit=2,
                errs=errs, n_encoded=2 * (encoded.stop - encoded.start))


def _video_reference(model, videos, batch, loss_fn):
    """One process, each row with its own video: hidden states row by row, chunked head."""
    rows = [video_hidden(model, v, batch.input_ids[i : i + 1]) for i, v in enumerate(videos)]
    hidden = torch.cat(rows)  # [B, T, D]
    head = model.get_output_embeddings()
    loss, _, grad_h, logp = backward_chunked_head(hidden, head.weight, head.bias, batch.targets, batch.mask,
                                                  loss_fn, 5)
    hidden.backward(grad_h)
    return loss, logp


def video_head_case(group, multi):
    """MR-SP stage 2: the tiny Qwen2.5-VL language model, sharded, on cached video embeddings
    (multimodal rotary positions), GSPO on gathered log-probs, vs one process: loss, log-probs,
    every parameter gradient and the gradient of the video embeddings. `multi`: the rows
    answer two different videos (different token counts) in one micro-batch."""
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    tok = build_vlm_tokenizer()
    torch.manual_seed(9)
    ref = build_tiny_vlm(tok).double()
    model = build_tiny_vlm(tok).double()
    model.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(10)
    grids = [torch.tensor([3, 4, 4]), torch.tensor([2, 2, 4])]  # 12 and 4 merged tokens
    videos = [VideoEmbeds(torch.randn(int(g.prod()) // 4, 64, generator=gen, dtype=torch.float64), g, s)
              for g, s in zip(grids, (1.0, 0.5))]
    row_video = [0, 1, 0] if multi else [0, 0, 0]
    prompts = [video_prompt_ids(tok, videos[v].n_tokens, "which colour?") for v in row_video]
    responses = [torch.randint(10, 90, (n,), generator=gen).tolist() for n in (6, 10, 2)]
    batch = make_batch(prompts, responses, pad_id=tok.pad_token_id)  # [3, T]
    adv = torch.randn(3, generator=gen, dtype=torch.float64)
    noise = 0.3 * torch.randn(batch.mask.shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        hidden = torch.cat([video_hidden(ref, videos[v], batch.input_ids[i : i + 1]) for i, v in enumerate(row_video)])
        head = ref.get_output_embeddings()
        old = (chunked_logprobs(hidden, head.weight, head.bias, batch.targets, batch.mask, 5) + noise) * batch.mask
    norm = loss_normalizer(batch.mask, "seq-mean-token-mean")

    def loss_fn(logp):
        return policy_loss(logp, old, adv, batch.mask, normalizer=norm, loss_agg="seq-mean-token-mean", kind="gspo")

    leaves_ref, leaves = [as_leaf(v) for v in videos], [as_leaf(v) for v in videos]
    if multi:
        loss_ref, logp_ref = _video_reference(ref, [leaves_ref[v] for v in row_video], batch, loss_fn)
        arg, arg_nograd = [leaves[v] for v in row_video], [videos[v] for v in row_video]
    else:
        loss_ref, _, logp_ref = video_loss_and_backward(ref, leaves_ref[0], batch, loss_fn, chunk=5)
        arg, arg_nograd = leaves[0], videos[0]
    loss, _, logp = sp_video_loss_and_backward(model, arg, batch, loss_fn, group, chunk=3)
    lp_nograd = sp_video_logprobs(model, arg_nograd, batch, group, chunk=4)
    errs = {"loss": _err(loss, loss_ref), "logp": _err(logp, logp_ref), "logp_nograd": _err(lp_nograd, logp_ref)}
    for v in sorted(set(row_video)):
        video_grad = leaves[v].embeds.grad.clone()
        dist.all_reduce(video_grad, group=group)  # each rank's positions' share
        errs[f"grad_video{v}_embeds"] = _err(video_grad, leaves_ref[v].embeds.grad)
    errs.update(_grad_errs(model, ref, group))
    return dict(kind="video_head", model="qwen2.5-vl", P=P, rank=rank, dtype="torch.float64", multi=multi,
                T=batch.input_ids.shape[1], errs=errs, video_grad=float(leaves_ref[0].embeds.grad.abs().max()))


def run(rank, world, out_path):
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    records = []
    for group in (None, pairs[rank // 2]):
        for name in MODELS:
            for dtype in (torch.float64, torch.float32):
                records.append(body_case(group, name, dtype))
            records.append(head_case(group, name, torch.float64, "seq-mean-token-mean", "gspo"))
        records.append(head_case(group, "qwen2", torch.float64, "token-mean", "ppo"))
        records.append(head_case(group, "qwen2", torch.float32, "token-mean", "ppo"))
        records.append(head_case(group, "qwen2", torch.float64, "seq-mean-token-sum", "ppo", checkpoint=True))
        records.append(refusals(group))
        for n_frames, unit in ((7, 1), (6, 2), (2, 1)):  # uneven; 3 units over 4 ranks; fewer frames than ranks
            records.append(mrsp_case(group, n_frames, unit))
        records.append(mrsp_video_case(group, 10))  # 5 temporal patches: 3 | 2 or 2 | 1 | 1 | 1
        records.append(video_head_case(group, multi=False))
        records.append(video_head_case(group, multi=True))
    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)


if __name__ == "__main__":
    spawn_local(run, 4, sys.argv[1], start_method="fork")
