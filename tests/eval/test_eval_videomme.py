"""Video-MME-format evaluation with a stub predictor: exact breakdowns, missing videos, errors."""

import json
import logging

import numpy as np
import pytest

from longrl.errors import UserError
from longrl.eval.videomme import evaluate, load_annotations, question_text, score
from longrl.media.encode import write_video
from longrl.media.frames import FrameSampling

OPTS = ["A. red", "B. green", "C. blue", "D. yellow"]


def rec(qid, vid, duration, domain, task, answer, question=None, **extra):
    return {
        "video_id": vid, "duration": duration, "domain": domain, "sub_category": f"{domain}-sub",
        "task_type": task, "question_id": qid, "question": question or f"Question {qid}?",
        "options": OPTS, "answer": answer, **extra,
    }


RECORDS = [
    rec("001-1", "001", "short", "Knowledge", "Counting Problem", "A"),
    rec("001-2", "001", "short", "Knowledge", "Temporal Reasoning", "B"),
    rec("001-3", "001", "short", "Knowledge", "Counting Problem", "C"),
    rec("002-1", "002", "long", "Sports", "Counting Problem", "D", videoID="yt_abc"),
    rec("002-2", "002", "long", "Sports", "Action Recognition", "A", videoID="yt_abc"),
    rec("003-1", "003", "medium", "Sports", "Counting Problem", "B"),  # video missing
    rec("004-1", "004", "medium", "Life", "Counting Problem", "C"),  # video corrupt
    {"video_id": "001", "question_id": "001-open", "question": "What colour is the frame?", "answer": "Grey.",
     "duration": "short", "domain": "Knowledge", "task_type": "Open"},
]
RESPONSES = {
    "001-1": "<think>two flashes</think><answer>A</answer>",  # right
    "001-2": "The answer is C.",  # wrong
    "001-3": "C",  # right
    "002-1": "I think A or D",  # hedged: no letter, wrong
    "002-2": "(A) red",  # right
    "001-open": "<answer> grey </answer>",  # right after normalisation
}


@pytest.fixture()
def bench(tmp_path):
    vids = tmp_path / "videos"
    write_video(vids / "001.mp4", [np.full((32, 32, 3), 100, np.uint8)] * 8, fps=2)
    write_video(vids / "yt_abc.webm", [np.full((32, 32, 3), 50, np.uint8)] * 12, fps=4)
    (vids / "004.mp4").write_bytes(b"not a video")
    ann = tmp_path / "videomme.json"
    ann.write_text(json.dumps(RECORDS))
    return ann, vids


def stub_predict(seen):
    def predict(frames, timestamps, text):
        qid = next(q["question_id"] for q in RECORDS if text.startswith(q["question"]))
        seen.append((qid, frames.shape, list(timestamps)))
        return RESPONSES[qid]
    return predict


def test_breakdowns_are_exact(bench, tmp_path, caplog):
    ann, vids = bench
    seen = []
    with caplog.at_level(logging.WARNING, logger="longrl.eval.videomme"):
        report = evaluate(load_annotations(ann), vids, stub_predict(seen), FrameSampling(fps=None, max_frames=4), tmp_path / "out")
    assert report["n_questions"] == 8 and report["n_asked"] == 6 and report["n_not_asked"] == 2
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["accuracy_all"] == pytest.approx(4 / 8)
    assert report["missing_videos"] == ["003"] and report["unreadable_videos"] == ["004"]
    assert "004.mp4" in report["video_problems"]["004"]["error"]
    assert report["by_duration"] == {
        "long": {"n": 2, "correct": 1, "accuracy": 0.5},
        "short": {"n": 4, "correct": 3, "accuracy": 0.75},
    }
    assert report["by_domain"] == {
        "Knowledge": {"n": 4, "correct": 3, "accuracy": 0.75},
        "Sports": {"n": 2, "correct": 1, "accuracy": 0.5},
    }
    assert report["by_task_type"]["Counting Problem"] == {"n": 3, "correct": 2, "accuracy": 2 / 3}
    assert report["by_task_type"]["Temporal Reasoning"]["correct"] == 0
    assert report["by_task_type"]["Open"] == {"n": 1, "correct": 1, "accuracy": 1.0}
    assert "2 of 8 questions not asked" in caplog.text
    # each video decoded once, four uniform frames, times from the file
    assert {s[1] for s in seen} == {(4, 56, 56, 3)}
    np.testing.assert_allclose(dict((q, t) for q, _, t in seen)["001-1"], [0.5, 1.5, 2.5, 3.5])
    rows = [json.loads(x) for x in (tmp_path / "out/videomme_results.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [r["question_id"] for r in RECORDS[:3]] + ["001-open", "002-1", "002-2", "003-1", "004-1"]
    by_id = {r["question_id"]: r for r in rows}
    assert by_id["003-1"]["status"] == "missing_video" and by_id["003-1"]["response"] is None
    assert by_id["002-1"]["predicted"] is None and by_id["001-2"]["predicted"] == "C"
    assert json.loads((tmp_path / "out/videomme_summary.json").read_text())["accuracy"] == pytest.approx(4 / 6)


def test_question_text_and_scoring(tmp_path):
    q = load_annotations_from([rec("1", "v", "short", "d", "t", "B", question="Which?")], tmp_path)[0]
    assert question_text(q) == "Which?\nA. red\nB. green\nC. blue\nD. yellow\n" + \
        "Answer with the option's letter from the given choices directly."
    assert score(q, "B. green") == ("B", True)
    assert score(q, "E") == (None, False)  # not an option letter


def load_annotations_from(records, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_annotations(tmp_path / "a.jsonl")


def test_nested_early_format_is_flattened(tmp_path):
    nested = [{"video_id": "010", "duration_category": "long", "video_category": "Artistic Performance",
               "questions": [{"question_id": "010-1", "task_type": "OCR Problems", "question": "Q?",
                              "options": OPTS, "answer": "D"}]}]
    (q,) = load_annotations_from(nested, tmp_path)
    assert (q.video_id, q.duration, q.domain, q.task_type, q.answer) == ("010", "long", "Artistic Performance", "OCR Problems", "D")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"video_id": "1", "question": "Q?"}, "missing field"),
        ({"video_id": "1", "question": "Q?", "answer": "E", "options": OPTS}, "not one of the option letters"),
        ({"video_id": "1", "question": "Q?", "answer": "A", "options": ["red", "green"]}, "options"),
    ],
)
def test_bad_records_name_the_line(bad, message, tmp_path):
    with pytest.raises(UserError, match=rf"a.jsonl line 1: .*{message}"):
        load_annotations_from([bad], tmp_path)


def test_duplicate_ids_and_missing_folder(tmp_path):
    with pytest.raises(UserError, match="appears twice"):
        load_annotations_from([rec("1", "v", "s", "d", "t", "A")] * 2, tmp_path)
    qs = load_annotations_from([rec("1", "v", "s", "d", "t", "A")], tmp_path)
    with pytest.raises(UserError, match="video folder not found"):
        evaluate(qs, tmp_path / "nope", lambda *a: "A")


def test_run_videomme_with_the_tiny_model(bench, tmp_path):
    from longrl.eval.videomme import run_videomme

    ann, vids = bench
    report = run_videomme(ann, vids, "tiny", tmp_path / "o", max_frames=4, max_new_tokens=4)
    assert (report["model"], report["n_questions"], report["n_asked"]) == ("tiny", 8, 6)
    rows = [json.loads(x) for x in (tmp_path / "o/videomme_results.jsonl").read_text().splitlines()]
    assert all(isinstance(r["response"], str) for r in rows if r["status"] == "ok")


def test_parquet_annotations_read_as_the_json_ones(tmp_path):
    """Video-MME is distributed as parquet (flat rows, `options` a list column): the same
    questions come out as from the JSON export, whatever the file is named."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    flat = [r for r in RECORDS if "options" in r]
    columns = sorted({k for r in flat for k in r})  # every row has every column; null where a record lacks it
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in flat]), tmp_path / "test-00000-of-00001.bin")
    (tmp_path / "a.json").write_text(json.dumps(flat))
    assert load_annotations(tmp_path / "test-00000-of-00001.bin") == load_annotations(tmp_path / "a.json")


def test_unreadable_annotation_files_are_user_errors(tmp_path, monkeypatch):
    bad = tmp_path / "a.json"
    bad.write_bytes(json.dumps([rec("1", "v", "s", "d", "t", "A", question="Qu\u00e9?")]).encode().replace(b"\\u00e9", b"\xe9"))
    with pytest.raises(UserError, match="a.json: not UTF-8 text"):
        load_annotations(bad)
    junk = tmp_path / "a.parquet"
    junk.write_bytes(b"PAR1" + bytes(40))
    with pytest.raises(UserError, match="a.parquet: not a readable parquet file"):
        load_annotations(junk)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)  # the videomme extra not installed
    with pytest.raises(UserError, match=r"needs pyarrow: pip install -e \"\.\[videomme\]\""):
        load_annotations(junk)


def test_run_videomme_refuses_bad_arguments_before_loading_a_model(bench, tmp_path, monkeypatch):
    import longrl.models.vlm as vlm
    from longrl.eval.videomme import run_videomme

    monkeypatch.setattr(vlm, "load_vlm", lambda *a, **k: pytest.fail("model loaded before the arguments were checked"))
    ann, vids = bench
    for kwargs, message in [({"max_frames": 0}, "--max-frames 0"), ({"fps": -1.0}, "fps=-1.0 must be positive"),
                            ({"videos_dir": tmp_path / "nope"}, "video folder not found"),
                            ({"model_path": ""}, "needs model=PATH"),
                            ({"max_new_tokens": 0}, "eval.max_new_tokens=0"), ({"max_pixels": 0}, "video.max_pixels=0")]:
        with pytest.raises(UserError, match=message):
            run_videomme(ann, kwargs.pop("videos_dir", vids), **{"model_path": "tiny", **kwargs})


def test_videomme_cli_needs_a_model_and_refuses_keys_it_does_not_use(bench, tmp_path, monkeypatch, capsys):
    """Without model= the CLI used to score a random untrained model with exit 0, and took any
    key silently: now a forgotten model, an unknown key, a bad value or --config is exit 2
    with one line, before any model loads; model=tiny asks for the untrained VLM by name."""
    import longrl.models.vlm as vlm
    from longrl.cli import main
    from longrl.eval.videomme import videomme_options

    ann, vids = bench
    base = ["eval", "--videomme", str(ann), "--videos", str(vids)]
    real_load = vlm.load_vlm
    monkeypatch.setattr(vlm, "load_vlm", lambda *a, **k: pytest.fail("model loaded before the arguments were checked"))
    for extra, message in [([], "longrl eval --videomme needs model=PATH"),
                           (["model=tiny", "eval.max_new_token=4"], ("unknown key 'eval.max_new_token' for longrl eval "
                                                                     "--videomme (did you mean eval.max_new_tokens?)")),
                           (["model=tiny", "rl.lr=0.1"], "unknown key 'rl.lr'"),
                           (["model=tiny", "video.fps=fast"], "video.fps='fast' is not a number"),
                           (["model=tiny", "video.max_pixels"], "'video.max_pixels' is not key=value"),
                           (["model=tiny", "--config", str(ann)], "--config is for the task eval")]:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert videomme_options(["model.path=m", "eval.max_new_tokens=7", "video.fps=0", "video.max_pixels=784"]) == {
        "model_path": "m", "max_new_tokens": 7, "fps": None, "max_pixels": 784}
    monkeypatch.setattr(vlm, "load_vlm", real_load)
    assert main(base + ["model=tiny", "eval.max_new_tokens=2", "--max-frames", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["model"], result["n_questions"], result["n_asked"]) == ("tiny", 8, 6)
