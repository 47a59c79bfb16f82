"""task.name=hf:<source>: data sets read with the `datasets` library, built here from
in-memory rows (saved data sets, JSON/JSONL/parquet/arrow/CSV files, a hub id in a
temporary cache), column mapping, chat prompts, and every bad input as one UserError."""

import json
import os

import pytest

datasets = pytest.importorskip("datasets")

from longrl.config import TaskConfig
from longrl.data.hf_datasets import load_hf_examples
from longrl.data.registry import load_task_examples
from longrl.errors import UserError

ROWS = {
    "question": [f"{i}+{i}=" for i in range(20)],
    "final": [2 * i for i in range(20)],  # numbers: become strings
    "worked": [f"<think>{i}+{i}</think><answer>{2 * i}</answer>" for i in range(20)],
    "key": [f"q{i}" for i in range(20)],
    "tests": [[f"f({i})"] for i in range(20)],  # an unmapped column: kept in meta
}
MAPPING = {"prompt_column": "question", "answer_column": "final", "solution_column": "worked", "id_column": "key"}


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face caches for each test (datasets' prepared data, the hub's files),
    and a working directory with nothing in it that a hub id could name."""
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "hf"


def task(source, **kw):
    return TaskConfig(name=f"hf:{source}", **{**MAPPING, **kw})


def test_saved_dataset_with_a_column_mapping(tmp_path):
    """Columns map to the example's fields, the rest go to meta; without a held-out split a
    seeded fifth (at most n_eval) is split off, the same one for the same seed."""
    datasets.Dataset.from_dict(ROWS).save_to_disk(tmp_path / "saved")
    train, held = load_hf_examples(task(tmp_path / "saved", n_eval=3, seed=5))
    assert (len(train), len(held)) == (17, 3)
    assert sorted(e.id for e in train + held) == sorted(ROWS["key"])
    ex = next(e for e in train + held if e.id == "q7")
    assert (ex.prompt, ex.answer, ex.solution, ex.messages, ex.meta) == (
        "7+7=", "14", "<think>7+7</think><answer>14</answer>", [], {"tests": ["f(7)"]})
    again = load_hf_examples(task(tmp_path / "saved", n_eval=3, seed=5))
    assert [e.id for e in again[1]] == [e.id for e in held]
    assert [e.id for e in load_hf_examples(task(tmp_path / "saved", n_eval=3, seed=6))[1]] != [e.id for e in held]
    # unmapped optional columns: ids are row numbers, demonstrations empty
    bare = load_hf_examples(TaskConfig(name=f"hf:{tmp_path / 'saved'}", prompt_column="question", answer_column="final"))[0]
    assert all(e.solution == "" and e.id.endswith(f":{ROWS['question'].index(e.prompt)}") for e in bare)


def test_dataset_dict_splits_and_a_held_out_split(tmp_path):
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS),
                              "test": datasets.Dataset.from_dict({k: v[:4] for k, v in ROWS.items()})})
    d["test"] = d["test"].map(lambda r: {"key": "t" + r["key"]})
    d.save_to_disk(tmp_path / "dd")
    train, held = load_hf_examples(task(tmp_path / "dd", eval_split="test", n_eval=3))
    assert len(train) == 20 and [e.id for e in held] == ["tq0", "tq1", "tq2"]
    with pytest.raises(UserError, match=r"task.eval_split='validation': .* has splits \['test', 'train'\]; set task.eval_split"):
        load_hf_examples(task(tmp_path / "dd", eval_split="validation"))
    with pytest.raises(UserError, match=r"task.split='dev': .* has splits \['test', 'train'\]"):
        load_hf_examples(task(tmp_path / "dd", split="dev"))
    # through the registry: held-out prompts are dropped from training, as for every task
    ex = load_task_examples(task(tmp_path / "dd", eval_split="test", n_eval=4))
    assert len(ex.train) == 16 and ex.check_answer is None


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "arrow", "csv"])
def test_local_files_read_as_the_saved_dataset(tmp_path, fmt):
    flat = {k: v for k, v in ROWS.items() if k != "tests"}  # csv holds no lists
    ds = datasets.Dataset.from_dict(flat)
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        ds.to_json(path, lines=True)
    elif fmt == "json":
        path.write_text(json.dumps(ds.to_list()))
    elif fmt == "parquet":
        ds.to_parquet(path)
    elif fmt == "csv":
        ds.to_csv(path, index=False)
    else:  # the arrow file save_to_disk writes
        ds.save_to_disk(tmp_path / "saved")
        os.rename(next((tmp_path / "saved").glob("*.arrow")), path)
    train, held = load_hf_examples(task(path, n_eval=4, seed=1))
    got = sorted((e.id, e.prompt, e.answer, e.solution) for e in train + held)
    assert got == sorted(zip(flat["key"], flat["question"], map(str, flat["final"]), flat["worked"]))


def test_a_separate_eval_file(tmp_path):
    datasets.Dataset.from_dict(ROWS).to_parquet(tmp_path / "train.parquet")
    datasets.Dataset.from_dict({k: v[:5] for k, v in ROWS.items()}).map(
        lambda r: {"key": "e" + r["key"]}).to_json(tmp_path / "eval.jsonl")
    train, held = load_hf_examples(task(tmp_path / "train.parquet", eval_file=str(tmp_path / "eval.jsonl"), n_eval=10))
    assert len(train) == 20 and [e.id for e in held] == [f"eq{i}" for i in range(5)]
    with pytest.raises(UserError, match="task.eval_split .* or task.eval_file, not both"):
        load_hf_examples(task(tmp_path / "train.parquet", eval_file="x.jsonl", eval_split="test"))


def test_chat_prompts_reach_the_chat_template(tmp_path):
    """A list of messages is kept as the chat (the template renders it, with the system
    message first unless the chat has one); its text is the prompt for the tiny tokenizer."""
    from longrl.eval.accuracy import encode_prompts
    from longrl.models.load import format_prompt, set_system_prompt
    from longrl.models.tiny import build_tiny_tokenizer

    chats = [[{"role": "user", "content": f"{i}+{i}="}] for i in range(8)]
    chats[0] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "0+0="}]
    datasets.Dataset.from_dict({"messages": chats, "answer": [str(2 * i) for i in range(8)]}).save_to_disk(tmp_path / "c")
    train, held = load_hf_examples(TaskConfig(name=f"hf:{tmp_path / 'c'}", prompt_column="messages", n_eval=1))
    by_answer = {e.answer: e for e in train + held}
    assert by_answer["0"].prompt == "Be brief.\n\n0+0=" and by_answer["0"].messages == chats[0]
    assert by_answer["6"].prompt == "3+3=" and by_answer["6"].messages == chats[3]

    tok = build_tiny_tokenizer()
    assert format_prompt(tok, by_answer["6"].prompt, by_answer["6"].messages) == "3+3="  # no template: the text
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    set_system_prompt(tok, "Answer in tags.")
    assert format_prompt(tok, by_answer["6"].prompt, by_answer["6"].messages) == (
        "<|system|>Answer in tags.\n<|user|>3+3=\n<|assistant|>")
    assert format_prompt(tok, by_answer["0"].prompt, by_answer["0"].messages) == (
        "<|system|>Be brief.\n<|user|>0+0=\n<|assistant|>")
    ids = encode_prompts(tok, [by_answer["6"]])[0]
    assert tok.decode(ids) == "<|system|>Answer in tags.\n<|user|>3+3=\n<|assistant|>"


def test_a_hub_id_prepared_by_load_dataset_resolves_offline(tmp_path, caches):
    """What an earlier `load_dataset("<id>")` left in HF_DATASETS_CACHE: prepared here by the
    library's own JSON builder under the id's cache name (an id without a namespace: the
    builder refuses local files for a namespaced repo), the source files then deleted, so
    only the cache can answer."""
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, rows in (("train", 12), ("test", 3)):
        files[split] = str(tmp_path / f"{split}.jsonl")
        datasets.Dataset.from_dict({k: v[:rows] for k, v in ROWS.items()}).map(
            lambda r, s=split: {"key": f"{s}-{r['key']}"}).to_json(files[split])
    Json(cache_dir=datasets.config.HF_DATASETS_CACHE, dataset_name="longrl_tiny_qa", config_name="default",
         config_id="default", data_files=files, hash="0123abcd").download_and_prepare()
    for f in files.values():
        os.remove(f)
    train, held = load_hf_examples(task("longrl_tiny_qa", eval_split="test"))
    assert (len(train), [e.id for e in held]) == (12, ["test-q0", "test-q1", "test-q2"])
    with pytest.raises(UserError, match="task.subset='main': Couldn't find cache for longrl_tiny_qa for config 'main'"):
        load_hf_examples(task("longrl_tiny_qa", subset="main"))


def test_a_hub_id_downloaded_as_files_resolves_from_the_hub_cache(caches):
    """`hf download org/name --repo-type dataset` leaves datasets--org--name/refs/main and
    snapshots/<commit>/...: the files of that snapshot are read (the datasets cache has nothing)."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = caches / "hub" / "datasets--longrl-test--tiny-qa"
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit / "data"
    datasets.Dataset.from_dict(ROWS).to_parquet(snap / "train-00000-of-00001.parquet")
    datasets.Dataset.from_dict({k: v[:2] for k, v in ROWS.items()}).map(
        lambda r: {"key": "t" + r["key"]}).to_parquet(snap / "test-00000-of-00001.parquet")
    train, held = load_hf_examples(task("longrl-test/tiny-qa", eval_split="test"))
    assert (len(train), [e.id for e in held]) == (20, ["tq0", "tq1"])


def test_a_hub_id_not_cached_says_how_to_fetch_it(caches):
    with pytest.raises(UserError, match=r"task.name=hf:openai/gsm8k: neither a local path nor a data set in the local "
                                        r"Hugging Face cache \(.*\); longrl never downloads: fetch it once with "
                                        r"`hf download openai/gsm8k --repo-type dataset`"):
        load_hf_examples(task("openai/gsm8k"))
    with pytest.raises(UserError, match="task.name=hf:data/missing.parquet: no such file or directory"):
        load_hf_examples(task("data/missing.parquet"))
    with pytest.raises(UserError, match="task.name=hf: needs a source"):
        load_hf_examples(task(""))


def _saved(tmp_path, **columns):
    datasets.Dataset.from_dict(columns).save_to_disk(tmp_path / "bad")
    return tmp_path / "bad"


@pytest.mark.parametrize("columns,kw,message", [
    ({"q": ["a"], "answer": ["1"]}, {}, r"task.prompt_column='prompt': .* has no such column \(its columns: q, answer\)"),
    ({"prompt": ["a"], "a": ["1"]}, {}, r"task.answer_column='answer': .* has no such column"),
    ({"prompt": ["a"], "answer": ["1"]}, {"solution_column": "cot"}, r"task.solution_column='cot'"),
    ({"prompt": [1], "answer": ["1"]}, {}, r"row 0: prompt column 'prompt' holds a int; it must hold a string or a list"),
    ({"prompt": [" "], "answer": ["1"]}, {}, r"row 0: prompt column 'prompt' is empty"),
    ({"prompt": ["a"], "answer": [["1"]]}, {}, r"row 0: answer column 'answer' holds a list"),
    ({"prompt": ["a"], "answer": [True]}, {}, r"row 0: answer column 'answer' holds a bool"),
    ({"prompt": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "4"}]], "answer": ["4"]}, {},
     r"row 0: the chat in 'prompt' ends with the assistant's message"),
    ({"prompt": [[{"role": "narrator", "content": "q"}]], "answer": ["4"]}, {}, r"is not a chat message"),
    ({"prompt": ["a", "b"], "answer": ["1", "2"], "i": ["x", "x"]}, {"id_column": "i"},
     r"row 1: id 'x' already used by row 0"),
    ({"prompt": ["a", "b"], "answer": ["1", "2"]}, {}, r"has 2 rows in split 'train': too few to split off"),
], ids=["prompt-col", "answer-col", "solution-col", "prompt-int", "prompt-empty", "answer-list", "answer-bool",
        "chat-ends-assistant", "chat-bad-role", "dup-id", "too-few"])
def test_bad_data_is_one_user_error(tmp_path, columns, kw, message):
    with pytest.raises(UserError, match=message):
        load_hf_examples(TaskConfig(name=f"hf:{_saved(tmp_path, **columns)}", **kw))


def test_unreadable_or_unknown_files_are_user_errors(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + bytes(30))
    with pytest.raises(UserError, match=r"task.name=hf:.*broken.parquet: could not read it"):
        load_hf_examples(task(tmp_path / "broken.parquet"))
    (tmp_path / "bad.jsonl").write_text('{"question": "1+1=", "final": 2}\n{"question": \n')
    with pytest.raises(UserError, match=r"bad.jsonl: could not read it"):
        load_hf_examples(task(tmp_path / "bad.jsonl"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"notes.txt is a .txt file; give a .json, .jsonl, .parquet, .arrow, .csv file"):
        load_hf_examples(task(tmp_path / "notes.txt"))
    datasets.Dataset.from_dict(ROWS).save_to_disk(tmp_path / "saved")
    with pytest.raises(UserError, match="task.subset='main' names a configuration of a hub data set"):
        load_hf_examples(task(tmp_path / "saved", subset="main"))


def test_a_short_training_run_on_a_saved_dataset(tmp_path):
    """`longrl train task.name=hf:DIR` end to end on the tiny model (the registry, the scorer
    picked for a task without its own check, SFT on the mapped demonstrations, RL)."""
    from longrl.cli import main

    datasets.Dataset.from_dict(ROWS).save_to_disk(tmp_path / "saved")
    args = ["train", f"task.name=hf:{tmp_path / 'saved'}", *(f"task.{k}={v}" for k, v in MAPPING.items()),
            "task.n_eval=4", f"run.out_dir={tmp_path}", "run.name=r", "run.progress=false", "sft.steps=2",
            "sft.batch_size=4", "rl.steps=1", "rl.prompts_per_step=2", "rl.group_size=2",
            "rollout.max_new_tokens=8", "eval.max_new_tokens=8"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["rl_steps"] == 1
    assert main(args[:1] + [f"task.name=hf:{tmp_path / 'saved'}", "task.prompt_column=nope"]) == 2
