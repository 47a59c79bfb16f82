"""The long-video benchmark: its clip has static stretches, its driver measures the recipe's
step in fresh processes and records the planner's estimate beside every measured row."""

import torch

from longrl.bench import long_video as lv


def test_clip_is_static_between_scene_cuts_except_the_square():
    clip = lv.synthetic_clip(40, 112, 224, scene_frames=16)  # [N, H, W, 3]
    assert clip.shape == (40, 112, 224, 3) and clip.dtype == torch.uint8
    changed = (clip[1:] != clip[:-1]).any(-1).float().mean((1, 2))  # fraction of pixels changed per frame
    cuts = {15, 31}  # frame 16 and 32 start new scenes
    assert all(changed[i] > 0.5 for i in cuts)
    assert all(0 < changed[i] < 0.1 for i in range(39) if i not in cuts)  # only the moving square


def test_frame_sizes_give_the_token_counts():
    a = lv.parse(["--tokens-per-frame", "64"])
    assert lv._video_tokens(a, 3600) == 230400  # the paper's hour: 3,600 frames, ~256k tokens
    for t, (h, w) in lv.FRAME_SIZES.items():
        assert h * w // (28 * 28) // 2 == t


def test_largest_fitting_grows_with_the_budget_and_with_reduction():
    a = lv.parse([])
    small, large = (lv.largest_fitting(a, "cached", g * 2**30, 1.0) for g in (1, 4))
    assert 0 < small < large
    assert lv.estimate(a, "cached", large, 1.0)["peak_bytes"] <= 4 * 2**30 < lv.estimate(a, "cached", large + 2, 1.0)["peak_bytes"]
    assert lv.largest_fitting(a, "cached_reduced", 4 * 2**30, 0.1) > large


def test_driver_records_measured_and_estimated():
    """One fresh process (the reduced row: a measured peak, the tokens kept, the estimate)."""
    res = lv.run(["--frames", "8", "--rows", "cached_reduced", "--tokens-per-frame", "16", "--group", "2",
                  "--response-len", "2", "--budget-gib", "1"])
    assert res["bench"] == "long_video" and set(res["versions"]) == {"torch", "transformers", "numpy"}
    (r,) = res["results"]
    assert r["row"] == "cached_reduced" and r["video_tokens"] == 16 * 8
    assert 0 < r["video_tokens_kept"] < r["video_tokens"]  # the scene is static but for the square
    assert r["peak_mib"] > 0 and r["estimated_peak_mib"] > 0 and r["step_cpu_s"] > 0
    assert abs(r["estimate_over_measured"] - r["estimated_peak_mib"] / r["peak_mib"]) < 0.01
    largest = res["largest_frames_within_budget"]["cached_reduced"]
    assert largest["frames"] > 8 and largest["how"].startswith("estimated") and largest["largest_measured_within_budget"] == 8
