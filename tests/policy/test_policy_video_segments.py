"""Rows holding several videos (the prompt's and the segments `video_frames` spliced in): the
policy's log-probs equal the model's ordinary forward with `pixel_values_videos` for every
video, StreamBP equals the chunked update, segments are encoded once per step and cached
across steps, and the single-video rows of a mixed micro-batch are untouched."""

import pytest
import torch

pytest.importorskip("av", reason="video tests need PyAV (pip install -e '.[video]')")

from longrl.config import load_config  # noqa: E402
from longrl.data import video_task as V  # noqa: E402
from longrl.media.segments import Segment, decode_segment  # noqa: E402
from longrl.models.vlm import VIDEO_PAD, VISION_END, VISION_START, patchify, seconds_per_grid  # noqa: E402
from longrl.policy.video import VideoPolicy, load_video_policy  # noqa: E402
from longrl.rewards.verifiers import answer_scorer  # noqa: E402
from longrl.rollout.episodes import episode_example  # noqa: E402
from longrl.streambp.logprobs import make_batch  # noqa: E402

TINY = [
    "task.name=videos", "task.n_train=2", "task.n_eval=1", "task.kwargs.kinds=colour", "task.kwargs.fps=4",
    "task.kwargs.min_seconds=4", "task.kwargs.max_seconds=5",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
    "video.max_frames=4", "video.max_pixels=3136", "train.stream_chunk=5", "run.progress=false",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vseg") / "videos"
    V.load_video_task(load_config(None, [*TINY, f"task.train_file={d}/train.jsonl"]), answer_scorer("mcq"))
    return d


def setup(data_dir, *extra, train_vision=False):
    cfg = load_config(None, [*TINY, f"task.train_file={data_dir}/train.jsonl", *extra])
    task = V.load_video_task(cfg, answer_scorer("mcq"))
    torch.manual_seed(0)
    model, tok = load_video_policy(cfg.model, torch.device("cpu"), train_vision=train_vision)
    model = model.double()  # float64: the paths below agree to ~1e-12
    return VideoPolicy(model, tok, task, cfg), task, tok


def segment(path, start, end, task, fps=4.0, frames=8):
    from dataclasses import replace

    return Segment.of(path, start, end, replace(task.sampling, fps=fps, max_frames=frames)).spec()


def n_tokens(spec):
    from longrl.tools.video_frames import video_tokens

    return video_tokens(tuple(decode_segment(spec).frames.shape))


def two_segment_row(policy, task, tok):
    """A prompt + response whose response holds two segments (16 and 4 video tokens) between
    model text: (row example, prompt ids, response ids)."""
    ex = task.train[0]
    path = ex.media[0]
    prompt = policy.encode_prompts([ex])[0]
    a, b = segment(path, 0.5, 2.5, task), segment(path, 1.0, 1.5, task)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    mark = lambda spec: ids(VISION_START + VIDEO_PAD * n_tokens(spec) + VISION_END)  # noqa: E731
    resp = ids("look") + ids("<result>") + mark(a) + ids("</result>again<result>")
    off_b = len(resp) + 1
    resp_a_off = len(ids("look")) + len(ids("<result>")) + 1
    resp += mark(b) + ids("</result><answer>B</answer>")
    return episode_example(ex, [(a, resp_a_off), (b, off_b)]), prompt, resp


def reference_logprobs(model, task, row_ex, batch, i):
    """Row i by the model's own forward: pixels of every video in, its video columns typed 2."""
    clips = [task.clips[row_ex.media[0]]] + [decode_segment(s) for s in row_ex.media[1:]]
    pvs, grids, spgs = [], [], []
    for c in clips:
        pv, grid = patchify(c.frames)
        pvs.append(pv.double())
        grids.append(grid)
        spgs.append(c.second_per_grid if hasattr(c, "second_per_grid") else seconds_per_grid(c.timestamps))
    ids = batch.input_ids[i : i + 1]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values_videos=torch.cat(pvs), video_grid_thw=torch.stack(grids),
                       mm_token_type_ids=(ids == model.config.video_token_id).int() * 2,
                       second_per_grid_ts=torch.tensor(spgs), use_cache=False).logits
    return torch.log_softmax(logits[0], -1).gather(-1, batch.targets[i, :, None]).squeeze(-1) * batch.mask[i]


def test_two_segment_logprobs_equal_the_models_forward(data_dir):
    policy, task, tok = setup(data_dir)
    row_ex, prompt, resp = two_segment_row(policy, task, tok)
    plain = task.train[0]
    assert len(row_ex.media) == 3 and len(row_ex.meta["media_offsets"]) == 2
    # A mixed micro-batch: the two-segment row, and a plain row of the same prompt.
    batch = make_batch([prompt, prompt], [resp, resp[:3]], tok.pad_token_id)
    policy.start_step(0)
    ours = policy.logprobs(batch, [row_ex, plain], temperature=1.0)  # [2, T]
    ref = reference_logprobs(policy.model, task, row_ex, batch, 0)
    torch.testing.assert_close(ours[0], ref, atol=1e-9, rtol=0)
    # The plain row is the single-video path, bit for bit.
    alone = policy.logprobs(make_batch([prompt], [resp[:3]], tok.pad_token_id), [plain], temperature=1.0)
    assert torch.equal(ours[1, : alone.shape[1]], alone[0])


@pytest.mark.parametrize("train_vision", [False, True])
def test_streambp_equals_chunked_on_a_two_segment_row(data_dir, train_vision):
    """loss_and_backward on rows with segments: the shared-prompt chunked path and StreamBP's
    whole-row path give the same loss, log-probs and every gradient (the vision tower's too
    when it trains: its gradient flows through every segment's single encode)."""
    results = {}
    for mode in ("chunked", "streambp"):
        policy, task, tok = setup(data_dir, f"train.backprop={mode}",
                                  f"video.train_vision={str(train_vision).lower()}", train_vision=train_vision)
        row_ex, prompt, resp = two_segment_row(policy, task, tok)
        batch = make_batch([prompt, prompt], [resp, resp[:5]], tok.pad_token_id)
        weights = torch.linspace(0.5, 1.5, batch.input_ids.shape[1], dtype=torch.float64)
        policy.start_step(0)
        policy.model.zero_grad()
        loss, _, logp = policy.loss_and_backward(batch, [row_ex, task.train[0]],
                                                 lambda lp: (-(lp * weights).sum(), {}))
        results[mode] = (loss.detach(), logp.detach(),
                         {k: p.grad.clone() for k, p in policy.model.named_parameters() if p.grad is not None})
    (l1, p1, g1), (l2, p2, g2) = results["chunked"], results["streambp"]
    torch.testing.assert_close(l1, l2, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(p1, p2, atol=1e-9, rtol=0)
    assert g1.keys() == g2.keys() and any(k.startswith("model.visual") for k in g1) == train_vision
    for k in g1:  # the two rows share a prompt: the chunked path sums their gradients before the
        # RMSNorm's float32 backward, StreamBP after (as tests/policy/test_policy_video.py says)
        err = float((g2[k] - g1[k]).abs().max()) / max(float(g1[k].abs().max()), 1e-6)
        assert err < 1e-7, (k, err)


def test_a_segment_is_encoded_once_per_step_and_cached_across_steps(data_dir):
    policy, task, tok = setup(data_dir)
    row_ex, prompt, resp = two_segment_row(policy, task, tok)
    batch = make_batch([prompt] * 3, [resp, resp, resp[:2]], tok.pad_token_id)
    rows = [row_ex, row_ex, task.train[0]]
    policy.start_step(0)
    policy.encode_prompts([task.train[0]])
    start = dict(policy.totals)
    for _ in range(3):  # old, reference-like and update passes of one step
        policy.logprobs(batch, rows)
    policy.loss_and_backward(batch, rows, lambda lp: (-lp.sum(), {}))
    d = {k: policy.totals[k] - start[k] for k in start}
    assert d["encodes"] == 3  # the prompt's video and the two segments, once each
    # A pixel pipeline encodes every video of every row in every pass: 4 passes x (3 + 3 + 1).
    assert d["naive_encodes"] == 4 * 7
    policy.start_step(1)  # the next step: the frozen tower's embeddings come from the cache
    policy.logprobs(batch, rows)
    assert policy.totals["encodes"] - start["encodes"] == 3
    assert policy.totals["cache_hits"] - start["cache_hits"] == 3


def test_segment_specs_round_trip_and_key_the_cache_apart(data_dir):
    policy, task, _ = setup(data_dir)
    path = task.train[0].media[0]
    a = segment(path, 0.5, 2.5, task)
    assert Segment.parse(a) == Segment.of(path, 0.5, 2.5, Segment.parse(a).sampling())
    assert Segment.parse(segment(path, 0.51, 2.49, task)) == Segment.parse(a)  # rounded to 0.1 s: one entry
    keys = {policy._cache_key(s) for s in (a, segment(path, 0.5, 2.0, task), segment(path, 0.5, 2.5, task, fps=2.0),
                                            path)}
    assert len(keys) == 4  # range, fps and the whole video: four cache entries
