"""`search`: BM25 over a local corpus of documents (bm25s), the top-k passages as text.

The corpus is a list of strings, or a JSONL file of {"text": ...} objects (optional "title",
prepended). Like every user file it may be hostile: lines are read with a length cap, and a
bad line is refused by number before the run starts (UserError). Departure from
MMSearch-R1, which searches the web: a local corpus keeps runs offline and repeatable.
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_DOC_BYTES = 1 << 20
"""Longest corpus line read (1 MiB)."""


class BM25Search:
    name = "search"
    description = "search(query): the most relevant passages of the corpus"

    def __init__(self, docs: list[str], top_k: int = 1):
        bm25s = _import_bm25s()

        if not docs:
            from longrl.errors import UserError

            raise UserError("the search corpus has no documents; give at least one {\"text\": ...} line")
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be at least 1")
        self.docs, self.top_k = list(docs), min(top_k, len(docs))
        self._bm25s = bm25s
        tokens = bm25s.tokenize(self.docs, stopwords="en", show_progress=False)
        if not tokens.vocab:
            from longrl.errors import UserError

            raise UserError("the search corpus has no word to index (only stop words, punctuation or one-letter "
                            "tokens); give documents with text")
        self.index = bm25s.BM25()
        self.index.index(tokens, show_progress=False)

    @classmethod
    def from_jsonl(cls, path: str | Path, top_k: int = 1) -> "BM25Search":
        return cls(read_corpus(path), top_k)

    def __call__(self, query: str) -> str:
        query = query.strip()
        if not query:
            return "no results (empty query)"
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab:  # only stop words or punctuation: nothing to match
            return "no results"
        ids, scores = self.index.retrieve(tokens, k=self.top_k, show_progress=False)
        hits = [self.docs[int(i)] for i, s in zip(ids[0], scores[0]) if s > 0]
        return " ".join(hits) if hits else "no results"


def _import_bm25s():
    """bm25s, on its numpy backend. Where numba is installed bm25s imports it for its JIT
    backend; numba's function wrappers then break vLLM 0.32's scan of every loaded module when
    its engine starts (AttributeError in vllm/triton_utils/dispatcher.py), and a corpus of
    passages needs no JIT. So numba is hidden while bm25s loads, unless something already
    imported it."""
    import sys

    hide = "numba" not in sys.modules
    if hide:
        sys.modules["numba"] = None  # `import numba` raises ImportError: bm25s falls back to numpy
    try:
        import bm25s
    except ImportError as e:
        from longrl.errors import UserError

        raise UserError(f"tools.enabled=[search] needs bm25s: pip install -e \".[agents]\" ({e})") from None
    finally:
        if hide:
            del sys.modules["numba"]
    return bm25s


def read_corpus(path: str | Path) -> list[str]:
    """Documents of a JSONL corpus file; one UserError naming the line for anything wrong."""
    from longrl.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"tools.search_corpus {path}: not a file; give a JSONL file with one {{\"text\": ...}} per line")
    docs = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_DOC_BYTES + 2), b""), start=1):
            if len(raw.rstrip(b"\r\n")) > MAX_DOC_BYTES:
                raise UserError(f"{path}:{lineno}: document longer than 1 MiB; split it into passages")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{path}:{lineno}: not a JSON object ({e}); write one {{\"text\": ...}} per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f"{path}:{lineno}: needs a string \"text\" field")
            title = obj.get("title")
            docs.append(f"{title}: {obj['text']}" if isinstance(title, str) and title else obj["text"])
    if not docs:
        raise UserError(f"{path}: no documents; add one {{\"text\": ...}} object per line")
    return docs
