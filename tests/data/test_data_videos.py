"""Synthetic long-video QA: files, format, determinism, atomicity, and that answers are true."""

import json

import numpy as np
import pytest

from longrl.data import videos
from longrl.data.jsonl import load_jsonl_examples
from longrl.errors import UserError
from longrl.media.decode import decode_frames, probe

ARGS = ["--n", "8", "--seed", "3", "--min-seconds", "6", "--max-seconds", "40", "--eval-frac", "0.25"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "vids"
    assert videos.main(["--out", str(out), *ARGS]) == 0
    return out


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_layout_and_record_format(generated):
    train, evals = read(generated / "train.jsonl"), read(generated / "eval.jsonl")
    assert len(train) == 6 and len(evals) == 2
    assert sorted(p.name for p in generated.iterdir()) == ["eval.jsonl", "summary.json", "train.jsonl", "videos"]
    for r in train + evals:
        assert r["answer"] in "ABCD"
        assert r["solution"].startswith("<think>") and r["solution"].endswith(f"<answer>{r['answer']}</answer>")
        for letter, option in zip("ABCD", r["options"]):
            assert f"\n{letter}. {option}\n" in r["prompt"]
        info = probe(generated / r["media"][0])
        assert info.duration_s == pytest.approx(r["duration_s"], abs=1e-3)
        assert 6 <= r["duration_s"] <= 40 + 1
        assert (info.width, info.height) == (64, 64)
    assert [r["kind"] for r in train + evals] == list(videos.KINDS) * 2
    # the repository's JSONL loader reads it, resolving media next to the file
    examples = load_jsonl_examples(generated / "train.jsonl")
    assert examples[0].meta["kind"] == "temporal" and examples[0].media[0].endswith("vid-000000.mp4")


def test_same_seed_same_data_and_items_do_not_depend_on_n(generated, tmp_path):
    again = tmp_path / "again"
    videos.main(["--out", str(again), *ARGS])
    assert (again / "train.jsonl").read_text() == (generated / "train.jsonl").read_text()
    a, b = probe(generated / "videos/vid-000003.mp4"), probe(again / "videos/vid-000003.mp4")
    idx = np.arange(a.n_frames)
    np.testing.assert_array_equal(decode_frames(a, idx), decode_frames(b, idx))
    # item i depends only on (seed, i): a shorter run is a prefix
    short = tmp_path / "short"
    videos.main(["--out", str(short), "--n", "3", "--eval-frac", "0", *ARGS[2:8]])
    assert read(short / "train.jsonl") == read(generated / "train.jsonl")[:3]
    other = tmp_path / "other"
    videos.main(["--out", str(other), "--n", "3", "--eval-frac", "0", "--seed", "4", *ARGS[4:8]])
    assert read(other / "train.jsonl") != read(short / "train.jsonl")


# ---- the answer is what the video shows -------------------------------------------------


def colour_mask(frames, colour):
    """[F, H, W] True where a pixel is close to `colour` (after lossy compression)."""
    ref = np.array(videos.COLOURS.get(colour, (255, 255, 255)), dtype=float)
    return np.linalg.norm(frames.astype(float) - ref, axis=-1) < 70


def runs(present):
    """Number of separate stretches of True in a 1-D bool array."""
    present = np.asarray(present, dtype=int)
    return int(np.sum(np.diff(np.concatenate([[0], present])) == 1))


def all_frames(path):
    info = probe(path)
    return decode_frames(info, np.arange(info.n_frames))  # [F, 64, 64, 3]


def check_answer(r, frames):
    """Assert that record `r`'s answer is what `frames` [F, 64, 64, 3] show."""
    answer = r["options"]["ABCD".index(r["answer"])]
    if r["kind"] == "temporal":
        firsts = {o: np.argmax(colour_mask(frames, o.split()[0]).sum((1, 2)) > 20) for o in r["options"]}
        order = sorted(r["options"], key=firsts.get)
        assert answer == (order[-1] if "last" in r["prompt"] else order[0])
    elif r["kind"] == "counting":
        colour = r["prompt"].split("did the ")[1].split()[0]
        assert runs(colour_mask(frames, colour).sum((1, 2)) > 20) == int(answer)
    elif r["kind"] == "spatial":
        ys, xs = np.nonzero(colour_mask(frames, "red").sum(0))
        cx, cy = xs.mean(), ys.mean()
        side = {"left": cx < 24, "right": cx > 40, "top": cy < 24, "bottom": cy > 40}
        assert [k for k, v in side.items() if v] == [answer]
    elif r["kind"] == "colour":  # the one shape is the answer's colour, options always the palette
        assert r["options"] == list(videos.PALETTE)
        seen = [c for c in videos.PALETTE if colour_mask(frames, c).sum((1, 2)).max() > 100]
        assert seen == [answer]
    else:  # goal: the dot ends closest to the answer's box
        ys, xs = np.nonzero(np.linalg.norm(frames[-1].astype(float) - 255, axis=-1) < 60)
        dot = np.array([xs.mean(), ys.mean()])
        colours = [o.split()[1] for o in r["options"]]
        boxes = {}
        for c in colours:
            by, bx = np.nonzero(colour_mask(frames[:1], c)[0])
            boxes[c] = np.array([bx.mean(), by.mean()])
        nearest = min(colours, key=lambda c: np.linalg.norm(boxes[c] - dot))
        assert answer == f"the {nearest} box"


def test_answers_match_the_decoded_video(generated):
    for r in read(generated / "train.jsonl") + read(generated / "eval.jsonl"):
        check_answer(r, all_frames(generated / r["media"][0]))


def test_answers_match_the_rendered_scene_over_many_items():
    for i in range(48):
        record, sprites, n_frames = videos.make_item(11, i, 6.0, 30.0, 2)
        check_answer(record, np.stack(list(videos.render(sprites, n_frames))))


def test_colour_kind_answers_match_the_scene_and_cover_the_palette():
    letters = []
    for i in range(24):
        record, sprites, n_frames = videos.make_item(5, i, 4.0, 30.0, 2, kinds=("colour",))
        check_answer(record, np.stack(list(videos.render(sprites, n_frames))))
        assert record["solution"] == f"<think>It is {record['options']['ABCD'.index(record['answer'])]}.</think><answer>{record['answer']}</answer>"
        letters.append(record["answer"])
    assert set(letters) == set("ABCD")


def test_colour_slip_changes_only_blue_and_yellow_demonstrations():
    wrong = right = 0
    for i in range(80):
        clean, sprites, _ = videos.make_item(5, i, 4.0, 30.0, 2, kinds=("colour",))
        slipped, sprites2, _ = videos.make_item(5, i, 4.0, 30.0, 2, kinds=("colour",), slip=0.5)
        assert {k: v for k, v in slipped.items() if k != "solution"} == {k: v for k, v in clean.items() if k != "solution"}
        colour = clean["options"]["ABCD".index(clean["answer"])]
        if slipped["solution"] != clean["solution"]:
            bad = videos.CONFUSED[colour]  # only a confusable colour is ever changed, always the same way
            assert slipped["solution"] == f"<think>It is {bad}.</think><answer>{'ABCD'[videos.PALETTE.index(bad)]}</answer>"
            wrong += 1
        elif colour in videos.CONFUSED:
            right += 1
    assert 0.3 < wrong / (wrong + right) < 0.7  # slip=0.5 of the ~40 blue/yellow items


def test_answer_letters_are_balanced_within_each_kind():
    for k, kind in enumerate(videos.KINDS):
        letters = [videos.make_item(0, 4 * i + k, 6.0, 30.0, 2)[0]["answer"] for i in range(100)]
        counts = [letters.count(x) for x in "ABCD"]
        assert min(counts) >= 12, (kind, counts)  # 25 expected each


# ---- bad input and atomicity ------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [["--n", "0"], ["--min-seconds", "30", "--max-seconds", "10"], ["--kinds", "temporal,plot"], ["--fps", "0"]],
)
def test_bad_arguments_are_user_errors_and_write_nothing(tmp_path, bad):
    with pytest.raises(UserError):
        videos.main(["--out", str(tmp_path / "o"), *bad])
    assert not (tmp_path / "o").exists()


def test_crash_midway_leaves_no_output(tmp_path, monkeypatch):
    import longrl.media.encode as encode

    real, calls = encode.write_video, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(encode, "write_video", flaky)
    with pytest.raises(RuntimeError):
        videos.main(["--out", str(tmp_path / "o"), "--n", "3", "--min-seconds", "6", "--max-seconds", "8"])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------
# A generated directory is reused only while it matches the config (data/video_task.py)
# ----------------------------------------------------------------------------------------

SMALL = ["task.name=videos", "task.kwargs.min_seconds=3", "task.kwargs.max_seconds=4",
         "video.max_frames=2", "video.max_pixels=3136"]


def _video_task(d, *overrides):
    from longrl.config import load_config
    from longrl.data.video_task import load_video_task

    cfg = load_config(None, [*SMALL, f"task.train_file={d}/train.jsonl", *overrides])
    return load_video_task(cfg, lambda text, ex: 0.0)


def test_a_runs_own_data_is_regenerated_when_the_config_changes(tmp_path, monkeypatch):
    """The issue's case: a directory an earlier run generated is not silently reused with
    fewer videos (or other settings) than the config now asks for."""
    import longrl.data.videos as gen

    d = tmp_path / "v"
    task = _video_task(d, "task.n_train=3", "task.n_eval=1")
    summary = json.loads((d / "summary.json").read_text())
    assert (len(task.train), len(task.eval), summary["made_by"]) == (3, 1, "longrl train (task.train_file)")
    assert summary["settings"] == {"seed": 1234, "min_seconds": 3.0, "max_seconds": 4.0, "fps": 2,
                                   "kinds": ["colour"], "slip": 0.0}
    task = _video_task(d, "task.n_train=5", "task.n_eval=2")  # more than was made: made again
    assert (len(task.train), len(task.eval)) == (5, 2)
    assert json.loads((d / "summary.json").read_text())["train"] == 5
    _video_task(d, "task.n_train=5", "task.n_eval=2", "task.kwargs.slip=0.5")
    assert json.loads((d / "summary.json").read_text())["settings"]["slip"] == 0.5
    # a config it matches (fewer videos are a prefix) reuses it: nothing is generated
    monkeypatch.setattr(gen, "generate", lambda *a, **k: pytest.fail("regenerated matching data"))
    task = _video_task(d, "task.n_train=4", "task.n_eval=1", "task.kwargs.slip=0.5")
    assert (len(task.train), len(task.eval)) == (4, 1)


def test_data_made_with_longrl_data_videos_is_refused_not_replaced_when_it_falls_short(tmp_path):
    """The user's generated set: its own settings stand unless task.kwargs names one; too few
    videos, or a named setting that differs, is one UserError saying what differs, and the
    directory is left as it was."""
    from longrl.config import load_config
    from longrl.data.video_task import load_video_task

    d = tmp_path / "mine"
    assert videos.main(["--out", str(d), "--n", "4", "--eval-frac", "0.25", "--kinds", "colour",
                        "--min-seconds", "3", "--max-seconds", "5"]) == 0
    before = (d / "summary.json").read_text()

    def run(*overrides):
        cfg = load_config(None, ["task.name=videos", f"task.train_file={d}/train.jsonl", "video.max_frames=2",
                                 "video.max_pixels=3136", *overrides])
        return load_video_task(cfg, lambda text, ex: 0.0)

    task = run("task.n_train=3", "task.n_eval=1")  # seed 0, 3-5 s: not the config's defaults, still used
    assert (len(task.train), len(task.eval)) == (3, 1)
    with pytest.raises(UserError, match=r"mine was generated with `longrl data videos` but does not match the config "
                                        r"\(3 train videos where task.n_train = 5; 1 eval videos where task.n_eval = 2\): "
                                        r"remake it with `longrl data videos --out"):
        run("task.n_train=5", "task.n_eval=2")
    with pytest.raises(UserError, match=r"kinds=\['colour'\] where the config says \['counting'\]"):
        run("task.n_train=3", "task.n_eval=1", "task.kwargs.kinds=counting")
    assert (d / "summary.json").read_text() == before
    # a held-out file elsewhere: the directory's own eval count does not matter
    (tmp_path / "held.jsonl").write_text((d / "eval.jsonl").read_text().replace('"videos/', f'"{d}/videos/'))
    assert len(run("task.n_train=3", "task.n_eval=2", f"task.eval_file={tmp_path / 'held.jsonl'}").eval) == 1


def test_an_older_summary_is_checked_on_its_counts_and_data_not_generated_is_used_as_it_is(tmp_path):
    from longrl.config import load_config
    from longrl.data.video_task import load_video_task

    d = tmp_path / "old"
    assert videos.main(["--out", str(d), "--n", "2", "--eval-frac", "0.5", "--kinds", "colour",
                        "--min-seconds", "3", "--max-seconds", "4"]) == 0
    summary = json.loads((d / "summary.json").read_text())
    for key in ("settings", "made_by"):  # as written before they were recorded
        del summary[key]
    (d / "summary.json").write_text(json.dumps(summary))

    def run(*overrides):
        cfg = load_config(None, ["task.name=videos", f"task.train_file={d}/train.jsonl", "video.max_frames=2",
                                 "video.max_pixels=3136", "task.kwargs.kinds=counting", *overrides])
        return load_video_task(cfg, lambda text, ex: 0.0)

    assert len(run("task.n_train=1", "task.n_eval=1").train) == 1
    with pytest.raises(UserError, match=r"1 train videos where task.n_train = 3"):
        run("task.n_train=3", "task.n_eval=1")
    (d / "summary.json").unlink()  # no longer the generator's: the user's data, used as it is
    assert len(run("task.n_train=3", "task.n_eval=1").train) == 1
