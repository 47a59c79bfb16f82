"""Video token reduction end to end: chunked encoding == whole-video encoding, 'none' ==
today, the kept tokens' positions == the unreduced sequence's, gradients through the kept
tokens == a model fed the kept embeddings and positions by hand, a video with static
stretches loses at least half its tokens at the default threshold, and the policy's
rollouts, passes, cache and metrics all use the one reduced sequence.

Proportional attention (`video.proportional_attention`): a kept token whose key carries
+ log(count) is, to a query, exactly its dropped copies (checked where that identity is
exact: identical copies at one position, one layer); a zero bias is the plain causal path;
rollouts and every training pass apply the same bias; switching it off changes them."""

import numpy as np
import pytest
import torch

pytest.importorskip("av", reason="video tests need PyAV (pip install -e '.[video]')")

from longrl.config import VideoConfig, load_config  # noqa: E402
from longrl.data.example import Example  # noqa: E402
from longrl.data.video_task import VideoClip, VideoTask  # noqa: E402
from longrl.errors import UserError  # noqa: E402
from longrl.media.encode import write_video  # noqa: E402
from longrl.media.frames import FrameSampling, load_clip  # noqa: E402
from longrl.models.vlm import (  # noqa: E402
    TinyVLMShape, as_leaf, backward_vision, build_tiny_vlm, build_vlm_tokenizer, encode_frames,
    encode_video, lm_forward, lm_hidden, mrope_position_ids, patchify, prompt_positions, reduce_video, sample_prompts,
    seconds_per_grid, shared_prompt_hidden, video_hidden, video_inputs_embeds, video_loss_and_backward,
    video_prompt_ids, video_token_mask,
)
from longrl.streambp.logprobs import make_batch  # noqa: E402

QUESTION = "What colour?\nA. red\nB. blue"


@pytest.fixture(scope="module")
def tok():
    return build_vlm_tokenizer()


@pytest.fixture()
def model(tok):
    torch.manual_seed(0)
    return build_tiny_vlm(tok).double()


def still_frames(n: int = 12, seed: int = 0) -> torch.Tensor:
    """Random frames with a static stretch: frames 4..9 repeat frame 4. [n, 56, 56, 3] uint8"""
    g = torch.Generator().manual_seed(seed)
    f = torch.randint(0, 256, (n, 56, 56, 3), dtype=torch.uint8, generator=g)
    f[4:10] = f[4]
    return f


def scene_video(path, i: int = 0):
    """The built-in example's kind of video (`longrl data videos --kinds colour`): one shape
    on a plain background for half the timeline, nothing before or after."""
    from longrl.data.videos import make_item, render

    record, sprites, n_frames = make_item(0, i, 20.0, 30.0, 2, kinds=("colour",))
    return write_video(path, render(sprites, n_frames), fps=record["fps"])


# ---- the vision tower in chunks --------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 4, 7, 12, 64])
def test_chunked_encode_equals_the_whole_video(model, chunk):
    f = still_frames(11)  # odd: the last chunk pads its last frame, as the whole video does
    with torch.no_grad():
        pv, grid = patchify(f)
        whole = encode_video(model, pv.double(), grid, 1.0)
        chunked = encode_frames(model, f, 1.0, chunk)
    assert chunked.grid_thw.tolist() == whole.grid_thw.tolist() == [6, 4, 4]
    torch.testing.assert_close(chunked.embeds, whole.embeds, atol=1e-12, rtol=0)


# ---- positions and gradients of a reduced video ----------------------------------------


def reduced_rows(model, tok, threshold=0.05):
    """A static-stretch video, unreduced and reduced, and a batch of two responses on each."""
    with torch.no_grad():
        full = encode_frames(model, still_frames(), 1.5)
    red = reduce_video(full, "diff", threshold)
    responses = [tok("<answer>B</answer>")["input_ids"], tok("hm")["input_ids"]]
    batch_full = make_batch([video_prompt_ids(tok, full.n_tokens, QUESTION)] * 2, responses, tok.pad_token_id)
    batch_red = make_batch([video_prompt_ids(tok, red.n_tokens, QUESTION)] * 2, responses, tok.pad_token_id)
    return full, red, batch_full, batch_red


def kept_columns(model, batch_full, red) -> torch.Tensor:
    """[T_full] bool: the unreduced rows' columns that stay (every text token, kept video tokens)."""
    ids = batch_full.input_ids[0]
    start = int((ids == model.config.video_token_id).nonzero()[0])
    cols = torch.ones(ids.shape[0], dtype=torch.bool)
    cols[start : start + red.n_full] = red.keep
    return cols


def test_reduction_none_is_the_video_unchanged(model, tok):
    full, _, batch_full, _ = reduced_rows(model, tok)
    assert reduce_video(full, "none", 0.5) is full
    assert full.keep is None and full.n_full == full.n_tokens


def test_static_frames_are_dropped_and_kept_positions_equal_the_unreduced_ones(model, tok):
    full, red, batch_full, batch_red = reduced_rows(model, tok)
    # 6 temporal steps (frame pairs) of 4 tokens; steps 2, 3 and 4 are frames 4..9, all one
    # frame: step 2 is new, steps 3 and 4 repeat it and are dropped.
    assert full.n_tokens == 24 and red.n_tokens == 16
    assert red.keep.view(6, 4).tolist() == [[True] * 4] * 3 + [[False] * 4] * 2 + [[True] * 4]
    torch.testing.assert_close(red.embeds, full.embeds[red.keep], atol=0, rtol=0)
    pos_full = model.model.get_rope_index(  # the model's own numbering of the unreduced rows
        batch_full.input_ids, mm_token_type_ids=(batch_full.input_ids == model.config.video_token_id).int() * 2,
        video_grid_thw=full.grid_thw.view(1, 3).expand(2, 3), second_per_grid_ts=torch.full((2,), 1.5))[0]
    cols = kept_columns(model, batch_full, red)
    pos_red = mrope_position_ids(model, batch_red.input_ids, red)  # [3, 2, T_red]
    assert pos_red.shape[-1] == int(cols.sum())
    torch.testing.assert_close(pos_red, pos_full[:, :, cols], atol=0, rtol=0)
    assert int(pos_red[0, 0, -1]) == int(pos_full[0, 0, -1])  # the response continues where it would have


@pytest.mark.parametrize("train_vision", [False, True])
def test_gradients_through_kept_tokens_equal_a_hand_fed_reference(model, tok, train_vision):
    """The library's path on the reduced video vs the language model fed by hand: token
    embeddings with the kept video embeddings spliced in, at the unreduced positions of the
    kept columns, full logits. A trainable tower gets its gradient through the kept tokens."""
    model.model.visual.requires_grad_(train_vision)
    f = still_frames()
    adv = torch.tensor([1.0, -0.7], dtype=torch.float64)

    def encode():
        with torch.set_grad_enabled(train_vision):
            return encode_frames(model, f, 1.5, 4)

    _, red, batch_full, batch = reduced_rows(model, tok)
    loss_fn = lambda logp: -(adv[:, None] * logp * batch.mask).sum() / batch.mask.sum()  # noqa: E731

    video = reduce_video(encode(), "diff", 0.05)
    assert torch.equal(video.keep, red.keep)
    leaf = as_leaf(video) if train_vision else video
    loss, _, logp = video_loss_and_backward(model, leaf, batch, loss_fn, chunk=3)
    if train_vision:
        backward_vision(video, leaf)
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    full = encode()  # the reference: everything by hand
    kept = full.embeds[red.keep]  # [Nk, D]
    emb = model.get_input_embeddings()(batch.input_ids).clone()  # [2, T, D]
    start = int((batch.input_ids[0] == model.config.video_token_id).nonzero()[0])
    emb = torch.cat([emb[:, :start], kept.expand(2, -1, -1), emb[:, start + red.n_tokens:]], 1)
    pos_full = model.model.get_rope_index(
        batch_full.input_ids, mm_token_type_ids=(batch_full.input_ids == model.config.video_token_id).int() * 2,
        video_grid_thw=full.grid_thw.view(1, 3).expand(2, 3), second_per_grid_ts=torch.full((2,), 1.5))[0]
    pos = pos_full[:, :, kept_columns(model, batch_full, red)]
    hidden = model.model.language_model(inputs_embeds=emb, position_ids=pos, use_cache=False).last_hidden_state
    ref_logp = torch.log_softmax(model.lm_head(hidden), -1).gather(-1, batch.targets[..., None]).squeeze(-1)
    ref_loss = loss_fn(ref_logp * batch.mask)
    ref_loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(logp, (ref_logp * batch.mask).detach(), atol=1e-12, rtol=0)
    assert ours.keys() == ref.keys() and any("visual" in n for n in ref) == train_vision
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], atol=1e-11, rtol=1e-9)


def test_a_video_with_static_stretches_loses_half_its_tokens_at_the_default_threshold(model, tmp_path):
    """The example task's kind of video, decoded (with its compression noise), sampled
    32 frames uniformly and encoded by the tiny tower: at video.drop_threshold's default at
    least half the tokens go, and every temporal step where the shape appears or vanishes
    keeps tokens (video.max_unseen's default 0: the threshold alone). With a refresh of 1
    (every patch seen at least every other step) the still stretches shed half of their
    tokens, the whole video less (the first step and the shape's steps stay)."""
    default, unseen = VideoConfig().drop_threshold, 1
    assert VideoConfig().max_unseen == 0
    dropped, dropped_refreshed = [], []
    for i in range(3):
        clip = load_clip(scene_video(tmp_path / f"v{i}.mp4", i), FrameSampling(fps=None, max_frames=32, max_pixels=3136))
        with torch.no_grad():
            video = encode_frames(model.float(), clip.frames, seconds_per_grid(clip.timestamps))
        red = reduce_video(video, "diff", default)
        dropped.append(1 - red.n_tokens / red.n_full)
        refreshed = reduce_video(video, "diff", default, unseen)
        dropped_refreshed.append(1 - refreshed.n_tokens / refreshed.n_full)
        assert bool(refreshed.keep[red.keep].all())  # the refresh only adds tokens
        steps = red.keep.view(int(video.grid_thw[0]), -1).any(1)  # [Tg] steps keeping any token
        pix = clip.frames.view(16, 2, -1).float()  # the raw change between steps, as a check
        changed = (pix[1:].mean(1) - pix[:-1].mean(1)).abs().amax(1) > 40  # [Tg-1] the shape came or went
        assert steps[1:][changed].all()
    assert min(dropped) >= 0.5, dropped
    assert min(dropped_refreshed) >= 0.35, dropped_refreshed  # 0.375-0.44 here: 16 steps, the first kept whole


# ---- the policy: one reduced sequence for rollouts, passes, cache and metrics -----------


def make_task(tmp_path, n: int = 2):
    paths = [str(scene_video(tmp_path / f"s{i}.mp4", i)) for i in range(n)]
    sampling = FrameSampling(fps=None, max_frames=16, max_pixels=3136)
    clips = {}
    for p in paths:
        c = load_clip(p, sampling)
        clips[p] = VideoClip(c.frames, seconds_per_grid(c.timestamps))
    examples = [Example(f"q{i}", QUESTION, "A", media=[p]) for i, p in enumerate(paths)]
    from longrl.rewards.verifiers import answer_scorer

    return VideoTask("videos:test", examples, examples, answer_scorer("mcq"), clips, sampling)


def policy_for(tmp_path, task, *overrides):
    from longrl.policy.video import VideoPolicy, load_video_policy

    cfg = load_config(None, ["task.name=videos", f"task.train_file={tmp_path}/x.jsonl", "model.tiny.hidden_size=32",
                             "model.tiny.num_layers=1", "model.tiny.intermediate_size=64", *overrides])
    torch.manual_seed(0)
    model, tok = load_video_policy(cfg.model, torch.device("cpu"))
    return VideoPolicy(model.double(), tok, task, cfg), cfg


def one_update(policy, task):
    """Log-probs and every gradient of one micro-batch: two rows on each of the two videos."""
    examples = [task.train[0], task.train[0], task.train[1], task.train[1]]
    prompts = policy.encode_prompts(examples)
    batch = make_batch(prompts, [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]], policy.tokenizer.pad_token_id)
    policy.model.zero_grad(set_to_none=True)
    policy.start_step(0)
    _, _, logp = policy.loss_and_backward(batch, examples, lambda lp: -(lp * batch.mask).sum() / batch.mask.sum())
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return prompts, logp.detach(), grads, policy.logprobs(batch, examples)


def test_reduction_none_is_bit_equal_to_the_whole_video_encode(tmp_path):
    """video.token_reduction=none with chunked encoding (the default path now) vs the whole
    video through the tower at once (what the policy did before): the same prompts and
    bit-equal log-probs and gradients."""
    task = make_task(tmp_path)
    a = one_update(policy_for(tmp_path, task, "video.encode_chunk=4")[0], task)
    b = one_update(policy_for(tmp_path, task, "video.encode_chunk=0")[0], task)
    assert a[0] == b[0]
    assert torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def test_policy_rollouts_and_passes_share_the_reduced_sequence(tmp_path):
    from longrl.media.cache import EmbeddingCache
    from longrl.recipes.grpo import rollout
    from longrl.rollout.hf import HFBackend

    task = make_task(tmp_path)
    cache_dir = tmp_path / "cache"
    full, _ = policy_for(tmp_path, task, f"video.embed_cache_dir={cache_dir}")
    red, cfg = policy_for(tmp_path, task, "video.token_reduction=diff", f"video.embed_cache_dir={cache_dir}")
    ex = task.train[:2]
    n_full = [len(r.prompt_ids) for r in full.requests(ex)]  # encodes (no reduction: prompts from the frame count)
    n_red = [len(p) for p in red.encode_prompts(ex)]  # encodes: the kept count needs the embeddings
    assert [len(r.prompt_ids) for r in red.requests(ex)] == n_red
    assert all(r < f for r, f in zip(n_red, n_full))
    assert len(list(cache_dir.glob("*.safetensors"))) == 4  # the reduction is part of the key
    frac = red.step_metrics()["video/tokens_kept_frac"]
    dropped = sum(f - r for f, r in zip(n_full, n_red))  # 16 frames of 56x56: 8 steps x 4 tokens per video
    assert frac == pytest.approx(1 - dropped / (2 * 32)) and frac < 0.8
    assert full.step_metrics()["video/tokens_kept_frac"] == 1.0
    # A second policy reads the reduced embeddings and keep mask back from disk: same prompts.
    again, _ = policy_for(tmp_path, task, "video.token_reduction=diff", f"video.embed_cache_dir={cache_dir}")
    assert [len(p) for p in again.encode_prompts(ex)] == n_red and again.totals["encodes"] == 0
    assert isinstance(red.cache, EmbeddingCache)
    ev, _ = policy_for(tmp_path, task, "video.token_reduction=diff")  # held-out requests: outside the counts
    assert [len(r.prompt_ids) for r in ev.requests(ex, eval=True)] == n_red
    assert ev.totals["encodes"] == 0 and "video/tokens_kept_frac" not in ev.step_metrics()

    # Rollouts decode on the reduced prompt; the trainer's log-probs of them are the same.
    backend = HFBackend(red.model, eos_id=red.tokenizer.eos_token_id, pad_id=red.tokenizer.pad_token_id)
    cfg.rollout.max_new_tokens = 5
    roll = rollout(red, backend, ex, task, cfg, torch.Generator().manual_seed(0), version=0)
    batch = make_batch(roll.prompt_ids, roll.response_ids, red.tokenizer.pad_token_id)
    assert [len(p) for p in roll.prompt_ids] == [n for n in n_red for _ in range(cfg.rl.group_size)]
    logp = red.logprobs(batch, roll.examples)
    for i, lp in enumerate(roll.behaviour_logprobs):
        torch.testing.assert_close(logp[i][batch.mask[i] > 0], torch.tensor(lp, dtype=torch.float64),
                                   atol=1e-9, rtol=0)


def test_reduction_with_a_trainable_tower_or_bad_values_is_refused(tmp_path):
    base = ["task.name=videos", f"task.train_file={tmp_path}/x.jsonl"]
    for over, msg in [(["video.token_reduction=diff", "video.train_vision=true"], "frozen vision tower"),
                      (["video.token_reduction=dif"], "did you mean 'diff'"),
                      (["video.drop_threshold=-0.1"], "cosine distance"),
                      (["video.encode_chunk=-1"], "encode_chunk"),
                      (["video.max_unseen=-1"], "video.max_unseen")]:
        with pytest.raises(UserError, match=msg):
            load_config(None, [*base, *over])
    assert np.isclose(VideoConfig().drop_threshold, 0.05)


def test_streambp_on_a_reduced_video_equals_the_chunked_update(tmp_path):
    """StreamBP builds whole rows itself (video spliced in, M-RoPE positions): on a reduced
    video it gives the chunked path's log-probs and gradients (rows share prompts, hence
    the relative tolerance: see test_policy_video's StreamBP test)."""
    task = make_task(tmp_path)
    a = one_update(policy_for(tmp_path, task, "video.token_reduction=diff")[0], task)
    b = one_update(policy_for(tmp_path, task, "video.token_reduction=diff", "train.backprop=streambp",
                              "train.stream_chunk=5")[0], task)
    assert a[0] == b[0]
    torch.testing.assert_close(b[1], a[1], atol=1e-10, rtol=0)
    for n in a[2]:
        err = float((b[2][n] - a[2][n]).abs().max()) / max(float(a[2][n].abs().max()), 1e-6)
        assert err < 1e-7, (n, err)


@pytest.mark.slow
def test_an_hour_long_video_at_3600_frames(model, tmp_path):
    """The example task's kind of scene over an hour at 2 fps (7,200 frames; four objects
    come and go): 3,600 frames decoded, encoded 256 at a time, reduced and positioned. The
    static hour drops to a handful of tokens, while every appearance and disappearance (and
    the first step) stays."""
    from longrl.data.videos import make_item, render

    record, sprites, n = make_item(0, 0, 3600.0, 3600.0, 2, kinds=("temporal",))
    path = write_video(tmp_path / "hour.mp4", render(sprites, n), fps=record["fps"], gop=20)
    stats = {}
    clip = load_clip(path, FrameSampling(fps=None, max_frames=3600, max_pixels=3136), stats=stats)
    assert clip.frames.shape == (3600, 56, 56, 3) and stats["decoded"] == n
    with torch.no_grad():
        video = encode_frames(model.float(), clip.frames, seconds_per_grid(clip.timestamps), 256)
    red = reduce_video(video, "diff", VideoConfig().drop_threshold)
    assert video.n_tokens == 7200 and red.n_tokens < 0.01 * 7200
    steps = red.keep.view(1800, 4).any(1).nonzero().view(-1).tolist()  # temporal steps keeping tokens
    events = {round(1800 * s.first / 12) for s in sprites} | {round(1800 * (s.last + 1) / 12) for s in sprites}
    assert steps[0] == 0 and events - {1800} <= set(steps)
    tok = build_vlm_tokenizer()
    pos = mrope_position_ids(model, torch.tensor([video_prompt_ids(tok, red.n_tokens, QUESTION)]), red)  # [3, 1, P]
    full = mrope_position_ids(model, torch.tensor([video_prompt_ids(tok, video.n_tokens, QUESTION)]), video)
    ids = video_prompt_ids(tok, video.n_tokens, QUESTION)
    start = ids.index(model.config.video_token_id)
    cols = torch.cat([torch.arange(start), start + red.keep.nonzero().view(-1), torch.arange(start + 7200, len(ids))])
    assert torch.equal(pos, full[..., cols])  # every kept token and the text at their unreduced positions
    assert int(pos[0, 0, start + red.n_tokens - 1]) > 1000  # the last kept token is late in the hour


# ---- proportional attention ----------------------------------------------------------


def one_layer(tok):
    torch.manual_seed(0)
    return build_tiny_vlm(tok, TinyVLMShape(num_layers=1)).double()


def still_video(model, steps: int = 5):
    """A video of `steps` identical temporal steps (the tower attends within a step, with
    spatial positions only, so every step's tokens are the same) -> (full, reduced with bias)."""
    g = torch.Generator().manual_seed(1)
    frame = torch.randint(0, 256, (1, 56, 56, 3), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        full = encode_frames(model, frame.expand(2 * steps, -1, -1, -1).contiguous(), 1.0)
    S = full.n_tokens // steps
    assert torch.equal(full.embeds[:S].repeat(steps, 1), full.embeds)  # exact repeats
    red = reduce_video(full, "diff", 0.0, 0, proportional=True)  # only the first step stays
    assert red.n_tokens == S and torch.allclose(red.key_bias, torch.full((S,), float(steps)).log().double())
    return full, red, S


def test_a_kept_token_with_log_count_bias_attends_like_its_copies(tok):
    """One layer, identical copies at one position: the text after the video sees exactly
    what it sees in the unreduced row. Without the bias it does not."""
    model = one_layer(tok)
    steps = 5
    full, red, S = still_video(model, steps)
    answer = tok("B. blue", add_special_tokens=False)["input_ids"]
    ids_red = torch.tensor([video_prompt_ids(tok, red.n_tokens, QUESTION) + answer])  # [1, Tr]
    ids_full = torch.tensor([video_prompt_ids(tok, full.n_tokens, QUESTION) + answer])  # [1, Tf]
    # The unreduced row with every copy at its first step's position (then its key and value
    # are the kept token's exactly); text keeps the positions both rows give it.
    pos = mrope_position_ids(model, ids_full, full).clone()  # [3, 1, Tf]
    start = int(video_token_mask(model, ids_full, full.n_tokens)[0].int().argmax())
    for t in range(1, steps):
        pos[:, :, start + t * S : start + (t + 1) * S] = pos[:, :, start : start + S]
    with torch.no_grad():
        ref = lm_hidden(model, video_inputs_embeds(model, ids_full, full), pos)[0, start + full.n_tokens :]
        got = video_hidden(model, red, ids_red)[0, start + red.n_tokens :]
        plain = video_hidden(model, reduce_video(full, "diff", 0.0, 0), ids_red)[0, start + red.n_tokens :]
    assert torch.equal(mrope_position_ids(model, ids_red, red)[:, 0, start + red.n_tokens :],
                       pos[:, 0, start + full.n_tokens :])
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    assert float((plain - ref).abs().max()) > 1e-3  # dropping without the bias is not the same


def test_a_zero_bias_is_the_plain_causal_path(tok):
    """bias_mask with zeros == the model's own causal (and padding) masking, in the full-row,
    shared-prompt and batched-sampling passes."""
    torch.manual_seed(0)
    model = build_tiny_vlm(tok).double()
    full, red, S = still_video(model, 4)
    zero = type(red)(red.embeds, red.grid_thw, red.second_per_grid, red.keep, torch.zeros_like(red.key_bias))
    none = type(red)(red.embeds, red.grid_thw, red.second_per_grid, red.keep)
    prompt = video_prompt_ids(tok, red.n_tokens, QUESTION)
    ids = torch.tensor([prompt + [5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(video_hidden(model, zero, ids), video_hidden(model, none, ids), atol=1e-12, rtol=0)
        pos = prompt_positions(model, prompt, red)
        resp = torch.tensor([[5, 6, 7], [8, 9, 10]])
        for a, b in zip(shared_prompt_hidden(model, zero, prompt, pos, resp),
                        shared_prompt_hidden(model, none, prompt, pos, resp)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        # two prompts of different lengths: left-padded caches, a [rows, K] padding mask
        short = video_prompt_ids(tok, red.n_tokens, "Colour?")
        args = ([prompt, short], [pos, prompt_positions(model, short, red)], 2, 4, tok.eos_token_id)
        a = sample_prompts(model, [zero, zero], *args, temperature=1.0, generator=torch.Generator().manual_seed(0))
        b = sample_prompts(model, [none, none], *args, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-10, rtol=0)


def explicit_mask(key_bias, q_len, key_keep=None):
    """The additive [B, 1, Q, K] mask the bias column stands for: causal by index (the queries
    are the last q_len keys), padding keys never attended, key_bias on what is allowed."""
    B, K = key_bias.shape
    q_idx = torch.arange(K - q_len, K)
    allowed = (torch.arange(K)[None, :] <= q_idx[:, None]).expand(B, -1, -1)
    if key_keep is not None:
        allowed = allowed & key_keep.bool()[:, None, :]
    return torch.where(allowed, key_bias[:, None, :].expand(B, q_len, K), torch.finfo(key_bias.dtype).min)[:, None]


def test_the_bias_column_equals_an_explicit_additive_mask(tok):
    """lm_forward's extra head dimension (models.key_bias) == the same bias added to the
    logits through a [B, 1, Q, K] mask: full rows with left padding, and a cached decode step."""
    from transformers import DynamicCache

    from longrl.models.compat import cache_kwargs

    torch.manual_seed(0)
    model = build_tiny_vlm(tok).double()
    lm = model.model.language_model
    x = torch.randn(2, 7, model.config.text_config.hidden_size, dtype=torch.float64)  # [B, T, D]
    pos = torch.arange(7)[None, None].expand(3, 2, 7)
    bias = torch.rand(2, 8, dtype=torch.float64) * 2  # [B, K]: 7 prompt keys + 1 decoded
    keep = torch.ones(2, 8, dtype=torch.long)
    keep[1, :2] = 0  # row 1 left-padded
    with torch.no_grad():
        ref = lm(inputs_embeds=x, position_ids=pos, attention_mask=explicit_mask(bias[:, :7], 7, keep[:, :7]),
                 use_cache=False).last_hidden_state
        got = lm_forward(model, bias[:, :7], inputs_embeds=x, position_ids=pos, attention_mask=keep[:, :7],
                         use_cache=False).last_hidden_state
        torch.testing.assert_close(got[0], ref[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(got[1, 2:], ref[1, 2:], atol=1e-12, rtol=0)
        plain = lm(inputs_embeds=x, position_ids=pos, attention_mask=keep[:, :7], use_cache=False).last_hidden_state
        assert float((plain[0] - ref[0]).abs().max()) > 1e-3  # the bias matters
        assert model.config.text_config._attn_implementation == "sdpa"  # the context restored it
        step = torch.randn(2, 1, x.shape[-1], dtype=torch.float64)
        outs = []
        for biased in (True, False):
            cache = DynamicCache(config=model.config.text_config)
            if biased:
                lm_forward(model, bias[:, :7], inputs_embeds=x, position_ids=pos, attention_mask=keep[:, :7],
                           **cache_kwargs(lm, cache), use_cache=True)
                outs.append(lm_forward(model, bias, inputs_embeds=step, position_ids=torch.full((3, 2, 1), 7),
                                       attention_mask=keep, **cache_kwargs(lm, cache), use_cache=True).last_hidden_state)
            else:
                lm(inputs_embeds=x, position_ids=pos, attention_mask=explicit_mask(bias[:, :7], 7, keep[:, :7]),
                   **cache_kwargs(lm, cache), use_cache=True)
                outs.append(lm(inputs_embeds=step, position_ids=torch.full((3, 2, 1), 7),
                               attention_mask=explicit_mask(bias, 1, keep), **cache_kwargs(lm, cache),
                               use_cache=True).last_hidden_state)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=0)


def test_rollouts_and_every_pass_apply_the_bias_and_switching_it_off_changes_them(tmp_path):
    """The policy on reduced videos: sampled rollouts' log-probs == the trainer's under the
    bias (shared-prompt pass), StreamBP == the chunked update under the bias, and
    video.proportional_attention=false gives other log-probs."""
    from longrl.recipes.grpo import rollout
    from longrl.rollout.hf import HFBackend

    task = make_task(tmp_path)
    on, cfg = policy_for(tmp_path, task, "video.token_reduction=diff", "video.max_unseen=0")
    off, _ = policy_for(tmp_path, task, "video.token_reduction=diff", "video.max_unseen=0",
                        "video.proportional_attention=false")
    ex = task.train[:2]
    videos = [on._video(on.model, e.media[0]) for e in ex]
    assert all(v.key_bias is not None and float(v.key_bias.max()) > 0 for v in videos)  # something was dropped
    assert all(off._video(off.model, e.media[0]).key_bias is None for e in ex)

    backend = HFBackend(on.model, eos_id=on.tokenizer.eos_token_id, pad_id=on.tokenizer.pad_token_id)
    cfg.rollout.max_new_tokens = 5
    roll = rollout(on, backend, ex, task, cfg, torch.Generator().manual_seed(0), version=0)
    batch = make_batch(roll.prompt_ids, roll.response_ids, on.tokenizer.pad_token_id)
    assert off.encode_prompts(roll.examples) == roll.prompt_ids  # the same reduced prompts
    logp_on, logp_off = on.logprobs(batch, roll.examples), off.logprobs(batch, roll.examples)
    for i, lp in enumerate(roll.behaviour_logprobs):
        torch.testing.assert_close(logp_on[i][batch.mask[i] > 0], torch.tensor(lp, dtype=torch.float64),
                                   atol=1e-9, rtol=0)
    assert float((logp_on - logp_off).abs().max()) > 1e-4

    a = one_update(policy_for(tmp_path, task, "video.token_reduction=diff", "video.max_unseen=0")[0], task)
    b = one_update(policy_for(tmp_path, task, "video.token_reduction=diff", "video.max_unseen=0",
                              "train.backprop=streambp", "train.stream_chunk=5")[0], task)
    c = one_update(off, task)
    torch.testing.assert_close(b[1], a[1], atol=1e-10, rtol=0)
    for n in a[2]:
        err = float((b[2][n] - a[2][n]).abs().max()) / max(float(a[2][n].abs().max()), 1e-6)
        assert err < 1e-7, (n, err)
    assert float((a[1] - c[1]).abs().max()) > 1e-4
