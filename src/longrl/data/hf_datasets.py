"""Examples from data sets as people hold them, read with the `datasets` library (the
`datasets` extra): `task.name=hf:<source>`.

`<source>` is, tried in this order,
- a local file: `.json` / `.jsonl` (one object per line or a list), `.parquet`, `.arrow`, `.csv`;
- a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- any other local directory of data files (as a hub repository lays them out);
- a hub id (`org/name`) that this machine's cache already holds: the data set as `load_dataset`
  prepared it (HF_DATASETS_CACHE), else the repository files `hf download --repo-type dataset`
  left in the hub cache. Nothing is downloaded: the lookups run with the hub offline.

Columns are mapped by `task.prompt_column` and `task.answer_column` (required),
`task.solution_column` and `task.id_column` (optional); every other column goes to
`Example.meta`, as in JSONL files (so `tests` reaches reward.correctness=code). A prompt is a
string, or a chat: a list of `{"role", "content"}` messages whose last one is not the
assistant's. A chat prompt keeps its messages in `Example.messages` (a chat-template
tokenizer sees those) and their contents, joined by blank lines, in `Example.prompt`.

Training rows come from `task.split`; held-out rows from `task.eval_split` of the same data
set, or from `task.eval_file` (a local file or saved data set), or else are split off the
training rows as for JSONL (a seeded fifth, at most `task.n_eval`). Every split is read
whole (like JSONL); `task.n_eval` caps the held-out rows. Bad input - a missing column, an
unknown split, a hub id not cached, a value of the wrong type - is one UserError naming it.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

from longrl.config import TaskConfig
from longrl.data.example import Example
from longrl.errors import UserError

PREFIX = "hf:"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
"""Local file suffix -> the `datasets` packaged builder that reads it."""
ROLES = ("system", "user", "assistant", "tool")


def load_hf_examples(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples of `task.name=hf:<source>`."""
    source = cfg.name[len(PREFIX):].strip()
    if not source:
        raise UserError("task.name=hf: needs a source: hf:<file>, hf:<saved dataset dir> or hf:<org/name> (a hub id in the local cache)")
    if cfg.eval_split and cfg.eval_file:
        raise UserError("give the held-out set once: task.eval_split (a split of the same data set) or task.eval_file, not both")
    splits = _load(source, cfg.subset, f"task.name=hf:{source}")
    train = _examples(_split(splits, cfg.split, source, "task.split"), cfg, f"{source}[{cfg.split}]")
    if cfg.eval_split:
        held = _examples(_split(splits, cfg.eval_split, source, "task.eval_split"), cfg, f"{source}[{cfg.eval_split}]")
    elif cfg.eval_file:
        local = _load(cfg.eval_file, "", f"task.eval_file={cfg.eval_file}")
        held = _examples(_split(local, cfg.split, cfg.eval_file, "task.split"), cfg, cfg.eval_file)
    else:
        return _split_off(train, cfg, source)
    return train, held[: cfg.n_eval]


# ----------------------------------------------------------------------------------------
# Finding and reading the data set
# ----------------------------------------------------------------------------------------


def _load(source: str, subset: str, key: str) -> dict:
    """split name -> `datasets.Dataset` of `source`; every failure a UserError starting with
    `key` (the setting that named it, e.g. 'task.name=hf:org/name')."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{key} reads data with the `datasets` library: pip install -e \".[datasets]\"") from None
    path = Path(source).expanduser()
    if path.exists() and subset:
        raise UserError(f"task.subset={subset!r} names a configuration of a hub data set, but {key} is a local "
                        "path: drop task.subset")
    with _offline(), _as_user_error(key):
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"{key} is a {path.suffix or 'suffix-less'} file; give a "
                                f"{', '.join(FILE_BUILDERS)} file or a saved dataset directory")
            return {"train": datasets.load_dataset(builder, data_files=str(path), split="train")}
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            return dict(datasets.load_dataset(str(path)))
        return _from_cache(source, subset, key)


def _from_cache(source: str, subset: str, key: str) -> dict:
    """A hub id from the `datasets` cache (what an earlier load_dataset prepared), else from
    the repository files in the hub cache."""
    import datasets

    from longrl import hub

    if not hub.is_hub_id(source) or Path(source).suffix.lower() in FILE_BUILDERS:  # a data file's name: a path
        raise UserError(f"{key}: no such file or directory; give a local data file, a saved dataset directory, "
                        "or a hub id (org/name) that is in the local Hugging Face cache")
    not_cached = (f"{key}: neither a local path nor a data set in the local Hugging Face cache "
                  f"({datasets.config.HF_DATASETS_CACHE}, {hub.hub_cache_dir()}); longrl never downloads: fetch it "
                  f"once with {hub.download_hint(source, 'dataset')} (HF_HOME sets where the cache is), or give a local file")
    try:
        return dict(datasets.load_dataset(source, name=subset or None))
    except ValueError as e:  # a cached data set, but not that configuration (or it has several)
        if "config" in str(e).lower():
            raise UserError(f"task.subset={subset!r}: {_first_line(e)}; set task.subset to a cached configuration") from None
        raise
    except (ConnectionError, FileNotFoundError):
        pass
    snapshot = hub.cached_snapshot(source, repo_type="dataset")
    if snapshot is None:
        raise UserError(not_cached)
    return dict(datasets.load_dataset(str(snapshot), name=subset or None))


@contextlib.contextmanager
def _offline():
    """The hub offline for `datasets` and `huggingface_hub` during a load, whatever the
    environment says (HF_HUB_OFFLINE is read once, at import): a cache miss fails at once
    instead of trying the network."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _as_user_error(key: str):
    """What `datasets` raises on unreadable input (a corrupt file, a bad JSON line), as one line."""
    import pyarrow
    from datasets.exceptions import DatasetGenerationError

    try:
        yield
    except UserError:
        raise
    except (DatasetGenerationError, pyarrow.ArrowException, OSError, ValueError, KeyError, TypeError) as e:
        cause = e.__cause__ if isinstance(e, DatasetGenerationError) and e.__cause__ else e
        raise UserError(f"{key}: could not read it ({type(cause).__name__}: {_first_line(cause)}); "
                        "check the file or directory") from None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _split(splits: dict, name: str, source: str, key: str):
    if name not in splits:
        if len(splits) == 1 and key == "task.split":  # a single file or Dataset: its one split, whatever it is called
            return next(iter(splits.values()))
        raise UserError(f"{key}={name!r}: '{source}' has splits {sorted(splits)}; set {key} to one of them")
    return splits[name]


# ----------------------------------------------------------------------------------------
# Rows -> examples
# ----------------------------------------------------------------------------------------


def _examples(ds, cfg: TaskConfig, where: str) -> list[Example]:
    columns = list(ds.column_names)
    wanted = {"task.prompt_column": cfg.prompt_column, "task.answer_column": cfg.answer_column,
              "task.solution_column": cfg.solution_column, "task.id_column": cfg.id_column}
    for key, col in wanted.items():
        if col and col not in columns:
            raise UserError(f"{key}={col!r}: {where} has no such column (its columns: {', '.join(columns)}); "
                            f"set {key} to the column that holds it")
    if len(ds) == 0:
        raise UserError(f"{where}: no rows; give a split that holds examples")
    mapped = {c for c in wanted.values() if c}
    out, seen = [], {}
    for i, row in enumerate(ds):
        ex = _example(row, i, cfg, where, mapped)
        if ex.id in seen:
            raise UserError(f"{where} row {i}: id {ex.id!r} already used by row {seen[ex.id]}; "
                            "task.id_column must hold unique ids (or leave it empty to number the rows)")
        seen[ex.id] = i
        out.append(ex)
    return out


def _example(row: dict, i: int, cfg: TaskConfig, where: str, mapped: set) -> Example:
    at = f"{where} row {i}"
    prompt, messages = _prompt(row[cfg.prompt_column], at, cfg.prompt_column)
    answer = row[cfg.answer_column]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise UserError(f"{at}: answer column {cfg.answer_column!r} holds a {type(answer).__name__}; it must hold "
                        "the reference answer as a string or number (set task.answer_column)")
    solution = row[cfg.solution_column] if cfg.solution_column else ""
    if not isinstance(solution, str):
        raise UserError(f"{at}: solution column {cfg.solution_column!r} holds a {type(solution).__name__}; "
                        "it must hold a demonstration response (a string)")
    ex_id = row[cfg.id_column] if cfg.id_column else f"{where}:{i}"
    if isinstance(ex_id, bool) or not isinstance(ex_id, (str, int)):
        raise UserError(f"{at}: id column {cfg.id_column!r} holds a {type(ex_id).__name__}; ids are strings or integers")
    return Example(id=str(ex_id), prompt=prompt, answer=str(answer), solution=solution, messages=messages,
                   meta={k: v for k, v in row.items() if k not in mapped})


def _prompt(value, at: str, column: str) -> tuple[str, list[dict]]:
    """(prompt text, chat messages or []) of one prompt cell."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{at}: prompt column {column!r} is empty; every row needs a prompt")
        return value, []
    shape = 'a string or a list of {"role": ..., "content": "..."} messages'
    if not isinstance(value, list) or not value:
        raise UserError(f"{at}: prompt column {column!r} holds a {type(value).__name__}; it must hold {shape}")
    messages = []
    for m in value:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise UserError(f"{at}: prompt column {column!r}: {m!r} is not a chat message; it must hold {shape} "
                            f"(roles {', '.join(ROLES)})")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] == "assistant":
        raise UserError(f"{at}: the chat in {column!r} ends with the assistant's message; a prompt ends where the "
                        "model answers (put the reference in task.answer_column, a demonstration in task.solution_column)")
    return "\n\n".join(m["content"] for m in messages), messages


def _split_off(train: list[Example], cfg: TaskConfig, source: str) -> tuple[list[Example], list[Example]]:
    """No held-out split named: a seeded fifth of the rows (at most task.n_eval), as for JSONL."""
    shuffled = train[:]
    random.Random(cfg.seed).shuffle(shuffled)
    n_eval = min(cfg.n_eval, len(shuffled) // 5)
    if n_eval < 1:
        raise UserError(f"task.name=hf:{source} has {len(train)} rows in split {cfg.split!r}: too few to split off "
                        "a held-out set; give task.eval_split or task.eval_file")
    return shuffled[n_eval:], shuffled[:n_eval]
