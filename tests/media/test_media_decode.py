"""Decoding: round trips through three containers, seeking, and every kind of bad file."""

import dataclasses
import sys

import numpy as np
import pytest

from longrl.errors import UserError
from longrl.media import decode
from longrl.media.decode import decode_frames, probe
from longrl.media.encode import write_video


def gray_frames(n: int, size: int = 32) -> list[np.ndarray]:
    """Frame i is uniform grey level 4*i + 8, so a decoded frame names its own index."""
    return [np.full((size, size, 3), 4 * i + 8, np.uint8) for i in range(n)]


def frame_index(rgb: np.ndarray) -> int:
    return int(round((rgb.mean() - 8) / 4))


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".mkv"])
def test_probe_and_decode_round_trip(tmp_path, ext):
    path = write_video(tmp_path / f"v{ext}", gray_frames(20), fps=4)
    info = probe(path)
    assert info.n_frames == 20
    assert info.fps == pytest.approx(4.0)
    assert info.duration_s == pytest.approx(5.0)  # 20 frames of 0.25 s
    np.testing.assert_allclose(info.frame_times, np.arange(20) * 0.25, atol=1e-3)
    assert (info.width, info.height) == (32, 32)
    out = decode_frames(info, np.array([0, 7, 19]))
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    assert [frame_index(f) for f in out] == [0, 7, 19]


@pytest.mark.parametrize("keyframes_known", [True, False])
def test_seek_gives_the_same_frames_as_decoding_forward(tmp_path, monkeypatch, keyframes_known):
    path = write_video(tmp_path / "long.mp4", gray_frames(60), fps=2, gop=6)  # 30 s, keyframe every 3 s
    monkeypatch.setattr(decode, "SEEK_GAP_S", 2.0)  # without keyframes: seek on every jump below
    info = probe(path)
    keys = info.key_pts  # x264 may place a keyframe sooner than the GOP asks, never later
    assert keys is not None and keys[0] == info.frame_pts[0] and 10 <= len(keys) < 30
    assert np.isin(keys, info.frame_pts).all() and np.diff(np.searchsorted(info.frame_pts, keys)).max() <= 6
    if not keyframes_known:
        info = dataclasses.replace(info, key_pts=None)
    idx = np.array([1, 2, 13, 30, 31, 47, 59])
    seeked = decode_frames(info, idx, seek=True)
    forward = decode_frames(info, idx, seek=False)
    np.testing.assert_array_equal(seeked, forward)
    assert [frame_index(f) for f in seeked] == idx.tolist()


def long_gray_video(path, n: int):
    """`n` frames of 16x16 at 30 fps, a keyframe every 30; frame i has grey level 8 + i % 60 * 4."""
    return write_video(path, (np.full((16, 16, 3), 8 + (i % 60) * 4, np.uint8) for i in range(n)), fps=30, gop=30)


def test_frames_decoded_do_not_grow_with_the_video_length(tmp_path):
    """Eight frames sampled from a 10 s and a 100 s video: decoding seeks to each one's
    keyframe, so at most one 30-frame GOP is decoded per wanted frame whatever the length
    (decoding forward would touch every frame up to the last wanted one)."""
    from longrl.media.frames import frames_at, sample_times

    counts = {}
    for n in (300, 3000):
        info = probe(long_gray_video(tmp_path / f"v{n}.mp4", n))
        idx = frames_at(info.frame_times, sample_times(info.duration_s, None, 8))
        seek, forward = {}, {}
        got = decode_frames(info, idx, seek=True, stats=seek)
        np.testing.assert_array_equal(got, decode_frames(info, idx, seek=False, stats=forward))
        assert [int(round((f.mean() - 8) / 4)) for f in got] == (idx % 60).tolist()
        assert seek["decoded"] <= 8 * 30 and seek["seeks"] == 8
        assert forward["decoded"] >= idx[-1]  # every frame up to the last wanted one
        counts[n] = seek["decoded"]
    assert counts[3000] <= counts[300] + 8  # flat in the video's length (frame offsets in a GOP differ)


def test_bad_indices_are_a_programming_error(tmp_path):
    info = probe(write_video(tmp_path / "v.mkv", gray_frames(4), fps=2))
    for idx in ([], [2, 1], [0, 4], [1, 1]):
        with pytest.raises(ValueError):
            decode_frames(info, np.array(idx, dtype=np.int64))


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(UserError, match="not found: .*nope.mp4"):
        probe(tmp_path / "nope.mp4")


@pytest.mark.parametrize("content", [b"", b"this is not a video at all" * 50])
def test_garbage_file_is_a_user_error(tmp_path, content):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(UserError, match="bad.mp4"):
        probe(path)


def test_truncated_mp4_is_a_user_error(tmp_path):
    path = write_video(tmp_path / "cut.mp4", gray_frames(40), fps=4)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # mp4 keeps its index at the end: now missing
    with pytest.raises(UserError, match="cut.mp4"):
        probe(path)


@pytest.mark.parametrize("ext, fmt", [(".mkv", "matroska"), (".mp4", "mp4"), (".webm", "webm")])
def test_container_with_zero_frames_is_a_user_error(tmp_path, ext, fmt):
    av = pytest.importorskip("av")
    path = tmp_path / f"zero{ext}"
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("libvpx" if ext == ".webm" else "libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()  # header only, no frames
    assert path.stat().st_size > 0
    with pytest.raises(UserError, match=f"zero{ext}"):
        probe(path)


def test_audio_only_file_has_no_video_stream(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "sound.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(UserError, match="no video stream in .*sound.mkv"):
        probe(path)


def test_missing_pyav_explains_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(UserError, match=r"longrl\[video\]"):
        probe(tmp_path / "x.mp4")
