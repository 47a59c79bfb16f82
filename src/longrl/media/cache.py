"""A cache of per-video tensors (vision-tower embeddings), in memory and optionally on disk.

MR-SP stage 1 in "Scaling RL to Long Videos" (arXiv 2507.07966) encodes each video once and
reuses its embeddings for every rollout and training pass of a step. Within a step that is
just holding a tensor (`models.vlm.encode_video`); this cache extends it across steps and
runs: a video seen again with the same sampling and the same vision weights is not decoded
or encoded again.

The key is the file's content hash (not its path, so a moved or re-downloaded file still
hits, and an edited file misses), the frame-sampling parameters, and a caller-chosen tag
naming the encoder (e.g. the vision weights' version): embeddings from other weights must
never be returned.

Departures: the paper caches inside its training job only; the disk layer here is an
addition (safetensors files, written atomically, one per key). Eviction from memory is LRU
by entry count, not by bytes.

Long videos: an entry read from disk is memory-mapped (safetensors' default backend), so
its pages are read when used and count against the page cache, not the process; the write
goes from the tensors' own buffers. Neither needs a second copy of an hour-long video's
embeddings in memory (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of the file's bytes; remembered per (path, size, mtime) so big files hash once."""
    st = os.stat(path)
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def cache_key(path: str | Path, sampling: dict, tag: str) -> str:
    """Key for `path`'s tensors under `sampling` (a JSON-able dict) and encoder `tag`."""
    blob = json.dumps({"file": file_digest(path), "sampling": sampling, "tag": tag}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class EmbeddingCache:
    """Maps a key to a dict of tensors. Memory LRU of `max_items`, plus `directory` if given."""

    def __init__(self, directory: str | Path | None = None, max_items: int = 32):
        self.directory = Path(directory) if directory else None
        self.max_items = max_items
        self._mem: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key]
        if self.directory is not None and (self.directory / f"{key}.safetensors").is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(self.directory / f"{key}.safetensors"))
            self._remember(key, tensors)
            self.hits += 1
            return tensors
        self.misses += 1
        return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        # Detached copies: a cached embedding must not keep a step's autograd graph alive.
        tensors = {k: v.detach() for k, v in tensors.items()}
        self._remember(key, tensors)
        if self.directory is not None:
            self._save(key, tensors)

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        found = self.get(key)
        if found is None:
            found = compute()
            self.put(key, found)
            found = self._mem[key]
        return found

    def _remember(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self._mem[key] = tensors
        self._mem.move_to_end(key)
        while len(self._mem) > self.max_items:
            self._mem.popitem(last=False)

    def _save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
            os.replace(tmp, self.directory / f"{key}.safetensors")
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
