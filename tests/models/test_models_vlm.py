"""Tiny Qwen2.5-VL: patchify vs references, and cached video embeddings vs the model's own forward."""

import numpy as np
import pytest
import torch

from longrl.models import vlm
from longrl.models.vlm import (
    as_leaf, backward_vision, build_tiny_vlm, build_vlm_tokenizer, encode_video, mrope_position_ids, patchify,
    sample_with_video, seconds_per_grid, video_logprobs, video_loss_and_backward, video_prompt_ids,
)
from longrl.streambp.logprobs import make_batch


@pytest.fixture(scope="module")
def tok():
    return build_vlm_tokenizer()


@pytest.fixture()
def model(tok):
    torch.manual_seed(0)
    return build_tiny_vlm(tok).double()  # float64: equalities below hold to ~1e-12


def frames(n, h=56, w=84, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


# ---- patchify ---------------------------------------------------------------------------


def test_patchify_matches_brute_force_loops():
    f = frames(5, 28, 56)  # odd count: the last frame is repeated
    pv, grid = patchify(f)
    assert grid.tolist() == [3, 2, 4] and pv.shape == (24, 3 * 2 * 14 * 14)
    x = (f.permute(0, 3, 1, 2).double() / 255 - torch.tensor(vlm.CLIP_MEAN).view(1, 3, 1, 1).double()) \
        / torch.tensor(vlm.CLIP_STD).view(1, 3, 1, 1).double()  # [N, C, H, W]
    x = torch.cat([x, x[-1:]])
    rows = []
    for t in range(3):
        for bh in range(1):
            for bw in range(2):
                for mh in range(2):
                    for mw in range(2):
                        y0, x0 = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
                        patch = x[2 * t : 2 * t + 2, :, y0 : y0 + 14, x0 : x0 + 14]  # [t, C, 14, 14]
                        rows.append(patch.permute(1, 0, 2, 3).reshape(-1))  # (C, t, y, x)
    torch.testing.assert_close(pv.double(), torch.stack(rows), atol=1e-6, rtol=0)


def test_patchify_matches_the_hf_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = frames(1, 56, 84, seed=3)[0]
    ref = Qwen2VLImageProcessorPil()(images=[img.numpy()], do_resize=False, return_tensors="np")
    ours, grid = patchify(img[None].expand(2, -1, -1, -1))  # an image is two identical frames
    assert ref["image_grid_thw"].tolist() == [grid.tolist()]
    np.testing.assert_allclose(ours.numpy(), ref["pixel_values"], atol=1e-6, rtol=0)


def test_patchify_matches_the_hf_video_processor():
    pytest.importorskip("torchvision", reason="transformers' Qwen2-VL video processor needs torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    f = frames(4, 56, 84, seed=4)
    ref = Qwen2VLVideoProcessor()(videos=[f.permute(0, 3, 1, 2)], do_resize=False, do_sample_frames=False,
                                  return_tensors="pt")
    ours, grid = patchify(f)
    assert ref["video_grid_thw"].tolist() == [grid.tolist()]
    torch.testing.assert_close(ours, ref["pixel_values_videos"], atol=1e-6, rtol=0)


def test_patchify_rejects_unaligned_frames():
    with pytest.raises(ValueError, match="multiple of 28"):
        patchify(frames(2, 30, 56))


# ---- cached embeddings == the model's own forward ---------------------------------------


def setup_batch(model, tok, n_frames=6):
    f = frames(n_frames)
    pv, grid = patchify(f)
    spg = seconds_per_grid(np.arange(n_frames) * 0.5)
    n_tokens = int(grid.prod()) // 4
    prompt = video_prompt_ids(tok, n_tokens, "Which box?\nA. red\nB. blue")
    responses = [tok("<think>a</think><answer>B</answer>")["input_ids"], tok("<answer>A</answer>")["input_ids"],
                 tok("hmm")["input_ids"]]
    batch = make_batch([prompt] * 3, responses, tok.pad_token_id)
    return pv.double(), grid, spg, batch


def reference_logits(model, pv, grid, spg, input_ids):
    """The model's ordinary forward: pixels in, vision tower run for every row."""
    B = input_ids.shape[0]
    out = model(
        input_ids=input_ids, pixel_values_videos=pv.repeat(B, 1), video_grid_thw=grid.view(1, 3).repeat(B, 1),
        mm_token_type_ids=(input_ids == model.config.video_token_id).int() * 2,
        second_per_grid_ts=torch.full((B,), spg), use_cache=False,
    )
    return out.logits  # [B, T, V] (fine here: a tiny reference)


def masked_logprobs(logits, batch):
    lp = torch.log_softmax(logits, -1).gather(-1, batch.targets[..., None]).squeeze(-1)
    return lp * batch.mask


def test_cached_logprobs_equal_the_models_forward(model, tok):
    pv, grid, spg, batch = setup_batch(model, tok)
    with torch.no_grad():
        video = encode_video(model, pv, grid, spg)
        ref = masked_logprobs(reference_logits(model, pv, grid, spg, batch.input_ids), batch)
    ours = video_logprobs(model, video, batch, chunk=5)
    assert video.n_tokens == 3 * 2 * 3  # 3 time steps x (4/2) x (6/2)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


def loss_fn_for(batch):
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    n = batch.mask.sum()
    return lambda logp: -(adv[: logp.shape[0], None] * logp * batch.mask[: logp.shape[0]]).sum() / n


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_cached_gradients_equal_the_models_forward_frozen_vision(model, tok):
    pv, grid, spg, batch = setup_batch(model, tok)
    model.model.visual.requires_grad_(False)
    loss_fn = loss_fn_for(batch)
    loss_fn(masked_logprobs(reference_logits(model, pv, grid, spg, batch.input_ids), batch)).backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        video = encode_video(model, pv, grid, spg)  # once for the whole step
    for rows in ([0, 1], [2]):  # two micro-batches, one normaliser
        sub = batch[rows]
        sub_loss = lambda logp, rows=rows: loss_fn_rows(batch, rows)(logp)
        video_loss_and_backward(model, video, sub, sub_loss, chunk=4)
    ours = grads(model)
    assert ref.keys() == ours.keys() and not any(k.startswith("model.visual") for k in ours)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-10, rtol=1e-8)


def loss_fn_rows(batch, rows):
    """The full batch's loss restricted to `rows` (same normaliser: the whole batch's tokens)."""
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)[rows]
    n = batch.mask.sum()
    mask = batch[rows].mask
    return lambda logp: -(adv[:, None] * logp * mask).sum() / n


def test_trainable_vision_tower_gets_the_same_gradient(model, tok):
    pv, grid, spg, batch = setup_batch(model, tok)
    loss_fn = loss_fn_for(batch)
    loss_fn(masked_logprobs(reference_logits(model, pv, grid, spg, batch.input_ids), batch)).backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    video = encode_video(model, pv, grid, spg)  # with grad: one vision forward for the step
    leaf = as_leaf(video)
    for rows in ([0], [1, 2]):
        video_loss_and_backward(model, leaf, batch[rows], loss_fn_rows(batch, rows), chunk=3)
    backward_vision(video, leaf)  # one vision backward for the step
    ours = grads(model)
    assert ref.keys() == ours.keys() and any(k.startswith("model.visual") for k in ours)
    for k in ref:
        # The vision tower applies its rotary embedding in float32 even in a float64 model,
        # so summing three backward passes (reference) and back-propagating one summed
        # gradient (ours) round differently at float32 level; the text model is float64.
        tol = 1e-6 * float(ref[k].abs().max()) if k.startswith("model.visual") else 1e-10
        torch.testing.assert_close(ours[k], ref[k], atol=tol, rtol=0)
    with pytest.raises(ValueError, match="as_leaf"):
        video_loss_and_backward(model, video, batch, loss_fn)


# ---- positions, prompts, sampling -------------------------------------------------------


def test_time_axis_follows_seconds_per_grid(model, tok):
    assert seconds_per_grid(np.array([0.0, 0.5, 1.0, 1.5])) == pytest.approx(1.0)  # 2 frames x 0.5 s
    video = vlm.VideoEmbeds(torch.zeros(8, 64), torch.tensor([2, 4, 4]), 1.5)
    ids = torch.tensor([video_prompt_ids(tok, 8, "Q")])
    pos = mrope_position_ids(model, ids, video)[:, 0]  # [3, T]
    # <|vision_start|> at 0; video tokens start at 1; time step = tokens_per_second (2) * 1.5 s = 3
    assert pos[0, 1:9].tolist() == [1, 1, 1, 1, 4, 4, 4, 4]
    assert pos[1, 1:9].tolist() == [1, 1, 2, 2, 1, 1, 2, 2]
    assert pos[2, 1:9].tolist() == [1, 2, 1, 2, 1, 2, 1, 2]


def test_prompt_needs_matching_video_tokens(model, tok):
    video = vlm.VideoEmbeds(torch.zeros(8, 64, dtype=torch.float64), torch.tensor([2, 4, 4]), 1.0)
    ids = torch.tensor([video_prompt_ids(tok, 6, "Q")])
    with pytest.raises(ValueError, match="video tokens"):
        vlm.video_inputs_embeds(model, ids, video)


def test_sampling_logprobs_equal_teacher_forcing_and_prefill_sharing_changes_nothing(model, tok):
    pv, grid, spg, _ = setup_batch(model, tok)
    with torch.no_grad():
        video = encode_video(model, pv, grid, spg)
    prompt = video_prompt_ids(tok, video.n_tokens, "Which?")
    runs = []
    for share in (True, False):
        g = torch.Generator().manual_seed(7)
        runs.append(sample_with_video(model, video, prompt, 4, 12, tok.eos_token_id, 1.0, g, share_prefill=share))
    (resp, lps), (resp2, lps2) = runs
    assert resp == resp2
    np.testing.assert_allclose(np.concatenate(lps), np.concatenate(lps2), atol=1e-10)
    batch = make_batch([prompt] * 4, resp, tok.pad_token_id)
    tf = video_logprobs(model, video, batch)
    for i, r in enumerate(resp):
        np.testing.assert_allclose(tf[i][batch.mask[i] > 0].numpy(), lps[i], atol=1e-10)
    greedy, _ = sample_with_video(model, video, prompt, 2, 6, tok.eos_token_id, temperature=0.0)
    assert greedy[0] == greedy[1]


# ---- files, the embedding cache, the predictor ------------------------------------------


def test_embed_video_file_uses_the_cache(model, tmp_path, monkeypatch):
    from longrl.media.cache import EmbeddingCache
    from longrl.media.encode import write_video
    from longrl.media.frames import FrameSampling

    path = write_video(tmp_path / "v.mp4", list(frames(6, 64, 64).numpy()), fps=2)
    s = FrameSampling(fps=None, max_frames=4)
    calls = []
    real = vlm.encode_video
    monkeypatch.setattr(vlm, "encode_video", lambda *a: calls.append(1) or real(*a))
    tag = vlm.vision_tag(model)
    cache = EmbeddingCache(tmp_path / "cache")
    first = vlm.embed_video_file(model, str(path), s, cache, tag)
    again = vlm.embed_video_file(model, str(path), s, EmbeddingCache(tmp_path / "cache"), tag)  # from disk
    assert len(calls) == 1
    torch.testing.assert_close(again.embeds, first.embeds, atol=0, rtol=0)
    # 4 uniform slots over 3 s land on the frames at 0, 1.0, 1.5, 2.5 s: mean step 2.5/3 s, x2 frames
    assert again.grid_thw.tolist() == [2, 4, 4] and again.second_per_grid == pytest.approx(2 * 2.5 / 3, abs=1e-12)
    vlm.embed_video_file(model, str(path), FrameSampling(fps=None, max_frames=2), cache, tag)  # new sampling
    assert len(calls) == 2
    with torch.no_grad():
        model.model.visual.merger.mlp[0].weight.add_(1.0)
    assert vlm.vision_tag(model) != tag  # new weights: a new key


def test_predictor_encodes_each_video_once(model, tok, monkeypatch):
    calls = []
    real = vlm.encode_video
    monkeypatch.setattr(vlm, "encode_video", lambda *a: calls.append(1) or real(*a))
    predict = vlm.vlm_predictor(model, tok, max_new_tokens=5)
    f, ts = frames(4, 56, 56).numpy(), np.arange(4) * 0.5
    out = [predict(f, ts, "Q1?"), predict(f, ts, "Q2?"), predict(frames(4, 56, 56, seed=9).numpy(), ts, "Q1?")]
    assert len(calls) == 2 and all(isinstance(o, str) for o in out)


# ---- one prompt for many responses; many prompts decoded together -----------------------


def test_shared_prompt_hidden_equals_full_rows_values_and_gradients(model, tok):
    pv, grid, spg, batch = setup_batch(model, tok)
    video = encode_video(model, pv, grid, spg)  # trainable tower: gradients reach it too
    P = int(batch.mask[0].nonzero()[0]) + 1
    prompt = batch.input_ids[0, :P].tolist()
    loss_w = torch.randn(batch.input_ids.shape + (64,), dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    full = vlm.video_hidden(model, video, batch.input_ids)  # [3, T, D]
    (full * loss_w).sum().backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)

    video = encode_video(model, pv, grid, spg)
    pos = vlm.prompt_positions(model, prompt, video)  # [3, P]
    h_p, h_r = vlm.shared_prompt_hidden(model, video, prompt, pos, batch.input_ids[:, P:])
    ours = torch.cat([h_p.expand(3, -1, -1), h_r], 1)  # [3, T, D]
    torch.testing.assert_close(ours, full.detach(), atol=1e-10, rtol=0)
    (ours * loss_w).sum().backward()
    got = grads(model)
    assert got.keys() == ref.keys() and any(k.startswith("model.visual") for k in got)
    for k in ref:
        # Qwen2's RMSNorm computes in float32 even in a float64 model, so gradients summed in
        # a different order (over 3 rows vs through one expanded prompt) agree to ~1e-7
        # relative, not 1e-12; the forward values above agree to 1e-10.
        tol = 1e-6 * float(ref[k].abs().max())
        torch.testing.assert_close(got[k], ref[k], atol=tol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_batched_sampling_of_several_prompts_matches_one_at_a_time(model, tok):
    videos, prompts, positions = [], [], []
    for seed, (n_frames, q) in enumerate([(4, "Which?"), (6, "A much longer question here?"), (4, "Q")]):
        pv, grid = patchify(frames(n_frames, 56, 56, seed=seed))
        with torch.no_grad():
            videos.append(encode_video(model, pv.double(), grid, 1.0))
        prompts.append(video_prompt_ids(tok, videos[-1].n_tokens, q))
        positions.append(vlm.prompt_positions(model, prompts[-1], videos[-1]))
    greedy, greedy_lp = vlm.sample_prompts(model, videos, prompts, positions, 2, 8, tok.eos_token_id, temperature=0.0)
    for i in range(3):
        alone, alone_lp = sample_with_video(model, videos[i], prompts[i], 1, 8, tok.eos_token_id, temperature=0.0)
        assert greedy[2 * i] == greedy[2 * i + 1] == alone[0]
        np.testing.assert_allclose(greedy_lp[2 * i], alone_lp[0], atol=1e-9)
    # sampled responses: their log-probs are the teacher-forced ones of the same tokens
    resp, lps = vlm.sample_prompts(model, videos, prompts, positions, 3, 10, tok.eos_token_id, 1.0,
                                   torch.Generator().manual_seed(3))
    for i in range(3):
        batch = make_batch([prompts[i]] * 3, resp[3 * i : 3 * i + 3], tok.pad_token_id)
        tf = video_logprobs(model, videos[i], batch)
        for j in range(3):
            np.testing.assert_allclose(tf[j][batch.mask[j] > 0].numpy(), lps[3 * i + j], atol=1e-9)


def test_top_p_sampling_keeps_the_nucleus_and_reports_full_distribution_logprobs(model, tok):
    pv, grid = patchify(frames(4, 56, 56, seed=1))
    with torch.no_grad():
        video = encode_video(model, pv.double(), grid, 1.0)
    prompt = video_prompt_ids(tok, video.n_tokens, "what colour?")
    positions = [vlm.prompt_positions(model, prompt, video)]
    greedy, _ = vlm.sample_prompts(model, [video], [prompt], positions, 1, 8, tok.eos_token_id, temperature=0.0)
    # A nucleus this small holds only the most likely token: top-p sampling decodes greedily,
    # while each token's log-prob is still that of the full tempered distribution.
    resp, lps = vlm.sample_prompts(model, [video], [prompt], positions, 3, 8, tok.eos_token_id, 0.7,
                                   torch.Generator().manual_seed(0), top_p=1e-9)
    assert resp == greedy * 3
    batch = make_batch([prompt] * 3, resp, tok.pad_token_id)
    tf = video_logprobs(model, video, batch, temperature=0.7)
    for j in range(3):
        np.testing.assert_allclose(tf[j][batch.mask[j] > 0].numpy(), lps[j], atol=1e-9)
    resp_full, _ = vlm.sample_prompts(model, [video], [prompt], positions, 3, 8, tok.eos_token_id, 0.7,
                                      torch.Generator().manual_seed(0))
    assert resp_full != greedy * 3  # without top-p the same draws leave the greedy path
