"""Hugging Face hub ids resolved from the local cache only: nothing here downloads.

A model (`model.path`) or a data set (`task.name=hf:<id>`) may be named the way people hold
it, `org/name`, once it is in this machine's Hugging Face cache (`hf download org/name`, or
any earlier `from_pretrained` / `load_dataset`). The cache is read with huggingface_hub's
own lookup (`snapshot_download(local_files_only=True)`: the snapshot `refs/main` points to,
under `HF_HUB_CACHE`, which follows `HF_HOME`), so what counts as cached is exactly what
transformers and datasets would find offline.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(name: str) -> bool:
    """`name` has the shape of a hub repository id (`gpt2`, `org/name`); the hub refuses
    '--' and '..' in names, so those are paths."""
    return bool(_HUB_ID.fullmatch(name)) and "--" not in name and ".." not in name


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The local snapshot directory of `repo_id` at its cached `main`, or None when the cache
    does not hold it (never a download, whatever HF_HUB_OFFLINE says)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def download_hint(repo_id: str, repo_type: str = "model") -> str:
    """How a user puts `repo_id` in the cache once, on a machine with network."""
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    return f"`hf download {repo_id}{kind}`"
