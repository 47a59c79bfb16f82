"""Embedding cache: keys follow content, sampling and encoder tag; memory LRU; disk layer."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from longrl.media.cache import EmbeddingCache, cache_key, file_digest


def test_key_follows_content_not_path(tmp_path):
    a = tmp_path / "a.mp4"
    a.write_bytes(b"video bytes")
    b = tmp_path / "sub" / "b.mp4"
    b.parent.mkdir()
    shutil.copy(a, b)
    s = {"fps": 1.0, "max_frames": 8}
    assert cache_key(a, s, "enc") == cache_key(b, s, "enc")
    assert cache_key(a, s, "enc") != cache_key(a, {"fps": 2.0, "max_frames": 8}, "enc")
    assert cache_key(a, s, "enc") != cache_key(a, s, "enc-v2")
    before = cache_key(a, s, "enc")
    a.write_bytes(b"other bytes")
    os.utime(a, ns=(1, 1))  # a new mtime: the digest is recomputed
    assert cache_key(a, s, "enc") != before
    assert file_digest(a) == hashlib.sha256(b"other bytes").hexdigest()


def test_memory_lru_and_counters():
    cache = EmbeddingCache(max_items=2)
    calls = []

    def compute(k):
        calls.append(k)
        return {"emb": torch.full((2, 3), float(len(k)))}

    for k in ["a", "bb", "a", "ccc", "bb"]:
        cache.get_or_compute(k, lambda k=k: compute(k))
    # "a" was used again before "ccc" arrived, so "bb" was the least recent and evicted
    assert calls == ["a", "bb", "ccc", "bb"]
    assert (cache.hits, cache.misses) == (1, 4)


def test_put_detaches():
    cache = EmbeddingCache()
    x = torch.ones(3, requires_grad=True)
    cache.put("k", {"emb": x * 2})
    got = cache.get("k")["emb"]
    assert not got.requires_grad and got.grad_fn is None
    assert torch.equal(got, torch.full((3,), 2.0))


def test_disk_round_trip_survives_a_new_cache(tmp_path):
    first = EmbeddingCache(tmp_path / "c")
    emb = torch.randn(5, 4)
    grid = torch.tensor([[2, 4, 4]])
    first.put("key1", {"emb": emb, "grid": grid})
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["key1.safetensors"]  # no temp files left
    second = EmbeddingCache(tmp_path / "c")
    got = second.get("key1")
    assert torch.equal(got["emb"], emb) and torch.equal(got["grid"], grid)
    assert second.get("nokey") is None
    assert (second.hits, second.misses) == (1, 1)


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads resident memory from /proc")
def test_disk_entries_load_lazily_memory_mapped(tmp_path):
    """A long video's embeddings come back from disk memory-mapped: reading the entry
    costs no resident memory until its rows are used, so an embedding file need not fit
    in memory twice (the write goes from the tensor's own buffer, then a rename)."""
    import os

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    embeds = torch.arange(8 * 2**20, dtype=torch.float32).view(-1, 64)  # 32 MiB
    EmbeddingCache(tmp_path).put("k", {"embeds": embeds})
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]  # no temporary left behind
    before = resident()
    got = EmbeddingCache(tmp_path).get("k")["embeds"]
    assert resident() - before < 8 * 2**20
    torch.testing.assert_close(got[-3:], embeds[-3:], atol=0, rtol=0)
    assert torch.equal(got, embeds)
