import json

import pytest

from longrl.data.jsonl import load_jsonl_examples
from longrl.errors import UserError


def _write(tmp_path, text, name="set.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_fields_and_meta(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")
    path = _write(
        tmp_path,
        "\n".join(
            [
                json.dumps({"prompt": "3+4?", "answer": "7"}),
                "",  # blank lines are skipped
                json.dumps({"prompt": "2*3?", "answer": 6, "id": "six", "solution": "<answer>6</answer>", "level": 2}),
                "   ",
                json.dumps({"prompt": "what?", "answer": 1.5, "id": 9, "media": "clip.mp4"}),
                json.dumps({"prompt": "who?", "answer": "x", "media": [str(tmp_path / "clip.mp4")], "tags": ["a"]}),
            ]
        )
        + "\n",
    )
    a, b, c, d = load_jsonl_examples(path)
    assert (a.id, a.prompt, a.answer, a.solution, a.media, a.meta) == ("set.jsonl:1", "3+4?", "7", "", [], {})
    assert (b.id, b.answer, b.solution, b.meta) == ("six", "6", "<answer>6</answer>", {"level": 2})
    assert (c.id, c.answer, c.media) == ("9", "1.5", [str(tmp_path / "clip.mp4")])  # relative to the file
    assert (d.id, d.media, d.meta) == ("set.jsonl:6", [str(tmp_path / "clip.mp4")], {"tags": ["a"]})


def test_utf8_bom_and_no_trailing_newline(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "caf\u00e9?", "answer": "oui"}).encode())
    (ex,) = load_jsonl_examples(str(path))
    assert ex.prompt == "caf\u00e9?"


GOOD = json.dumps({"prompt": "p", "answer": "a"})


@pytest.mark.parametrize(
    "lines, lineno, fragment",
    [
        ([GOOD, '{"prompt": "p", "answer": "a"', GOOD], 2, "not valid JSON"),
        ([GOOD, "", "{prompt: p}"], 3, "not valid JSON"),
        (["[1, 2]"], 1, "expected a JSON object"),
        ([GOOD, json.dumps({"answer": "a"})], 2, '"prompt" is missing'),
        ([json.dumps({"prompt": "  ", "answer": "a"})], 1, '"prompt" is not a non-empty string'),
        ([json.dumps({"prompt": 5, "answer": "a"})], 1, '"prompt" is not a non-empty string'),
        ([json.dumps({"prompt": "p"})], 1, '"answer" is missing'),
        ([json.dumps({"prompt": "p", "answer": None})], 1, '"answer" is missing'),
        ([json.dumps({"prompt": "p", "answer": True})], 1, '"answer" is a bool'),
        ([json.dumps({"prompt": "p", "answer": [1]})], 1, '"answer" is a list'),
        ([json.dumps({"prompt": "p", "answer": "a", "id": [1]})], 1, '"id" must be'),
        ([json.dumps({"prompt": "p", "answer": "a", "solution": 3})], 1, '"solution" must be'),
        ([json.dumps({"prompt": "p", "answer": "a", "media": 3})], 1, '"media" must be'),
        ([json.dumps({"prompt": "p", "answer": "a", "media": "nope.mp4"})], 1, "media file 'nope.mp4' not found"),
        ([GOOD, json.dumps({"prompt": "p", "answer": "a", "id": "set.jsonl:1"})], 2, "already used on line 1"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, lines, lineno, fragment):
    path = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        load_jsonl_examples(path)
    message = str(err.value)
    assert f"{path}:{lineno}:" in message
    assert fragment in message


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes((GOOD + "\n").encode() + b'{"prompt": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(UserError, match=r"latin\.jsonl:2: not UTF-8"):
        load_jsonl_examples(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match="no examples") as err:
        load_jsonl_examples(path)
    assert str(path) in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist") as err:
        load_jsonl_examples(tmp_path / "absent.jsonl")
    assert "absent.jsonl" in str(err.value) and "JSONL file" in str(err.value)
    with pytest.raises(UserError, match="is a directory"):
        load_jsonl_examples(tmp_path)


def test_line_size_cap(tmp_path):
    """A line is read up to the cap and no further: at the cap it loads, one byte over it is
    refused naming the line (the default cap, 4 MiB, is far past any usable prompt)."""
    from longrl.data.jsonl import MAX_LINE_BYTES

    line = json.dumps({"prompt": "p", "answer": "a"})
    fits = _write(tmp_path, line + "\r\n" + line.replace('"p"', '"pq"'))  # line 2 is one byte longer
    assert len(load_jsonl_examples(fits, max_line_bytes=len(line) + 1)) == 2
    with pytest.raises(UserError, match=rf"set.jsonl:2: line longer than {len(line)} bytes"):
        load_jsonl_examples(fits, max_line_bytes=len(line))
    big = _write(tmp_path, line + "\n" + json.dumps({"prompt": "x" * MAX_LINE_BYTES, "answer": "a"}) + "\n", "big.jsonl")
    with pytest.raises(UserError, match="big.jsonl:2: line longer than 4 MiB"):
        load_jsonl_examples(big)
