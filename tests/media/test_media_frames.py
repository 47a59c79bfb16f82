"""Frame sampling, target sizes, resizing and whole-clip loading."""

import logging
import math

import numpy as np
import pytest
import torch

from longrl.errors import UserError
from longrl.media.encode import write_video
from longrl.media.frames import (
    FrameSampling,
    SkipLog,
    fit_size,
    frames_at,
    iter_clips,
    load_clip,
    resize_frames,
    sample_times,
)


def gray_video(path, n, fps, size=32):
    return write_video(path, [np.full((size, size, 3), 4 * i + 8, np.uint8) for i in range(n)], fps=fps)


# ---- sampling -------------------------------------------------------------------------


def test_sample_times_hand_worked():
    np.testing.assert_allclose(sample_times(10.0, fps=1.0, max_frames=64), np.arange(10) + 0.5)
    # 10 s at 1 fps would be 10 frames > 4: uniform slots of 2.5 s, centred
    np.testing.assert_allclose(sample_times(10.0, fps=1.0, max_frames=4), [1.25, 3.75, 6.25, 8.75])
    np.testing.assert_allclose(sample_times(6.0, fps=None, max_frames=3), [1.0, 3.0, 5.0])
    # shorter than one slot: still one frame
    np.testing.assert_allclose(sample_times(0.3, fps=1.0, max_frames=8), [0.5])
    with pytest.raises(ValueError):
        sample_times(1.0, fps=0.0, max_frames=1)


def test_frames_at_picks_the_frame_on_screen_and_dedupes():
    frame_times = np.array([0.0, 0.5, 1.0, 1.5])
    assert frames_at(frame_times, np.array([0.1, 0.49, 0.5, 1.2, 9.0])).tolist() == [0, 1, 2, 3]
    assert frames_at(frame_times, np.array([-1.0])).tolist() == [0]


# ---- sizes ----------------------------------------------------------------------------


def test_fit_size_hand_worked():
    px = 28 * 28
    assert fit_size(64, 64, 28, 4 * px, 64 * px) == (56, 56)
    assert fit_size(20, 20, 28, 4 * px, 64 * px) == (56, 56)  # grown to the minimum
    # 1080p into 64 patches: scale = sqrt(1080*1920/50176) = 6.42 -> 168.2 x 299.0 -> floor
    assert fit_size(1080, 1920, 28, 4 * px, 64 * px) == (168, 280)
    with pytest.raises(UserError, match="elongated"):
        fit_size(2, 1000, 28, px, 64 * px)


def test_fit_size_properties_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(x) for x in rng.integers(8, 3000, size=2))
        if max(h, w) / min(h, w) > 20:
            continue
        lo, hi = sorted(int(x) for x in rng.integers(1, 400, size=2) * 784)
        th, tw = fit_size(h, w, 28, lo, hi)
        assert th % 28 == 0 and tw % 28 == 0 and th >= 28 and tw >= 28
        assert th * tw <= hi or min(th, tw) == 28
        # a small source grows to the minimum whenever whole patches (ceil) fit the maximum
        s = math.sqrt(lo / (h * w))
        if h * w < lo and math.ceil(h * s / 28) * math.ceil(w * s / 28) * 784 <= hi:
            assert th * tw >= lo
        # aspect kept to within one patch of rounding on the shorter side
        assert abs(th / tw - h / w) <= (h / w) * (28 / min(th, tw)) * 1.01


def test_resize_matches_pil_bicubic():
    from PIL import Image

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(40, 52, 3), dtype=np.uint8)
    ours = resize_frames(torch.from_numpy(img)[None], (28, 56))[0].numpy().astype(int)
    ref = np.asarray(Image.fromarray(img).resize((56, 28), Image.BICUBIC)).astype(int)
    # torch's bicubic uses a = -0.75, PIL's a = -0.5: a few levels apart on noise, close on average
    assert np.abs(ours - ref).max() <= 8
    assert np.abs(ours - ref).mean() < 0.5


def test_resize_keeps_constant_frames_and_same_size():
    frames = torch.full((5, 30, 40, 3), 77, dtype=torch.uint8)
    out = resize_frames(frames, (56, 84), chunk=2)
    assert out.shape == (5, 56, 84, 3) and out.dtype == torch.uint8 and (out == 77).all()
    assert resize_frames(frames, (30, 40)) is frames


# ---- clips ----------------------------------------------------------------------------


def test_load_clip_fps_and_uniform(tmp_path):
    path = gray_video(tmp_path / "v.mp4", 40, fps=4)  # 10 s
    clip = load_clip(path, FrameSampling(fps=1.0, max_frames=64))
    np.testing.assert_allclose(clip.timestamps, np.arange(10) + 0.5, atol=1e-3)  # a frame starts at each k + 0.5
    assert clip.frames.shape == (10, 56, 56, 3)
    assert clip.duration_s == pytest.approx(10.0) and clip.source_fps == pytest.approx(4.0)
    levels = clip.frames.float().mean(dim=(1, 2, 3))
    np.testing.assert_allclose(levels.numpy(), 4 * np.arange(2, 40, 4) + 8, atol=3)

    uniform = load_clip(path, FrameSampling(fps=None, max_frames=4))
    # slot centres 1.25, 3.75, 6.25, 8.75 s each fall on a frame start (0.25 s apart)
    np.testing.assert_allclose(uniform.timestamps, [1.25, 3.75, 6.25, 8.75], atol=1e-3)
    np.testing.assert_allclose(uniform.frames.float().mean(dim=(1, 2, 3)).numpy(), [28, 68, 108, 148], atol=3)

    # faster than the source frame rate: each source frame once
    fast = load_clip(path, FrameSampling(fps=10.0, max_frames=1000, factor=0))
    assert fast.frames.shape == (40, 32, 32, 3)


def test_total_pixel_budget_shrinks_frames(tmp_path):
    path = gray_video(tmp_path / "v.webm", 16, fps=2, size=128)
    big = load_clip(path, FrameSampling(fps=None, max_frames=8, min_pixels=784, max_pixels=16 * 784))
    small = load_clip(path, FrameSampling(fps=None, max_frames=8, min_pixels=784, max_pixels=16 * 784, total_pixels=8 * 4 * 784))
    assert big.frames.shape == (8, 112, 112, 3)
    assert small.frames.shape == (8, 56, 56, 3)  # 4 patches of 28x28 per frame


def test_iter_clips_skips_bad_videos_with_count_and_warning(tmp_path, caplog):
    good = [gray_video(tmp_path / f"g{i}.mkv", 6, fps=2) for i in range(2)]
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"junk" * 100)
    missing = tmp_path / "missing.webm"
    skips = SkipLog()
    with caplog.at_level(logging.WARNING, logger="longrl.media.frames"):
        clips = list(iter_clips([good[0], bad, missing, good[1]], FrameSampling(), skips))
    assert [c.path for c in clips] == [str(good[0]), str(good[1])]
    assert skips.seen == 4
    assert [p for p, _ in skips.skipped] == [str(bad), str(missing)]
    assert "skipped 2 of 4 videos" in caplog.text
    assert "bad.mp4" in caplog.text and "missing.webm" in caplog.text


def test_load_clip_resizes_as_it_decodes_and_never_holds_the_video(tmp_path):
    """64 frames of 224x224 to 56x56, four at a time: the same clip as decoding everything
    then resizing, while the decoded frames held at once (numpy, traced) stay a few frames
    instead of the whole video at its file size."""
    import tracemalloc

    from longrl.media.decode import decode_frames, probe

    g = np.random.default_rng(0)
    path = write_video(tmp_path / "big.mp4", [g.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(64)], fps=8)
    s = FrameSampling(fps=None, max_frames=64, max_pixels=56 * 56)
    tracemalloc.start()
    clip = load_clip(path, s, chunk=4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    info = probe(path)
    whole = torch.from_numpy(decode_frames(info, np.arange(64)))  # [64, 224, 224, 3]
    assert torch.equal(clip.frames, resize_frames(whole, (56, 56)))
    assert peak < whole.numel() / 4, (peak, whole.numel())  # 9.6 MB of frames; a chunk is 0.6 MB
