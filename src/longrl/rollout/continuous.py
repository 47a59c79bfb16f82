"""Continuous batching over a Hugging Face causal LM: fixed decoding slots, per-request resume
and abort, per-token behaviour log-probs and policy versions.

Built for APRIL (Active Partial Rollouts, arXiv 2509.18521), which needs an engine that can
stop any request at any step and hand back what it has, and later continue it from its token
ids. Shapes: B = active requests (rows), C = cached key/value columns, P = longest prefill,
V = vocabulary, H = key/value heads, D = head dim.

How it works
- `num_slots` requests decode at once. Each `step()` first admits waiting requests into free
  slots and prefills them (one batched forward), then decodes one token for every active
  request (one batched forward). A request that finishes frees its slot for the next step.
- Prefill covers the context minus its last token; the last token is fed by the decode step.
  So every step feeds exactly one token per row, whether the row is new or old.
- One key/value cache (a `DynamicCache`) holds every active row, *right-aligned*: row b's
  tokens occupy the last `cached[b]` columns. Rotary position is applied before keys are
  cached, so a key's column does not matter, only the mask. We pass our own 4-D additive
  mask (`[B, 1, q, C]`, never `[T, T]` per head) and explicit position ids, so a row computes
  exactly what it would alone. Rows are added (left-padding the shorter side) and removed
  (dropping rows, trimming columns no row needs) only when requests join or leave.
- Sampling uses one `random.Random` per request, seeded by the request's `seed`: a request's
  samples do not depend on which other requests share its batch or on the slot count.
  Tokens are drawn by inverse CDF from one uniform per row.

Behaviour log-prob: the log-prob of the sampled token under `logits / temperature` before
top-p truncation (plain logits when temperature is 0), the same convention as
`rollout/sampling.py`, so the trainer recomputes it with the same temperature. With the
usual temperature 1 it is the policy's own `log_softmax(logits)[token]`.

Policy version: every generated token is tagged with `engine.policy_version` at the step that
produced it. The engine holds a reference to the policy model; the trainer updates the
weights in place and bumps the version between calls (never while requests are active: keys
cached under old weights would silently mix policies).

Departures and limits
- Not the paged-attention / flattened-batch design of vLLM or transformers'
  `ContinuousBatchingManager` (5.x): that manager runs a background thread, reports log-probs
  of the processed (temperature / top-p) scores, and drops a cancelled request's tokens,
  while APRIL needs synchronous control, aborts that return partial work, and trainer
  log-probs. A hand-written engine of this size does what is needed.
- Needs `eager` or `sdpa` attention (we pass a 4-D mask) and no sliding-window layers.
  GLA models (`model.arch=gla`, pure or hybrid) instead keep one recurrent state per row
  (plus the sliding-window layers' last keys), joined and dropped by row (`_RecurrentRows`).
- Memory is `B * C` per layer with C = the longest active context: rows shorter than the
  longest waste padded columns (no paging).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from longrl.models.compat import cache_kwargs, returned_cache
from longrl.rollout.sampling import top_p_filter

FINISH_REASONS = ("stop", "length", "abort")


def mix_seed(*parts: int) -> int:
    """Fold integers into one 63-bit seed (splitmix64 steps), stable across runs and Pythons."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


@dataclass
class Request:
    """One generation request."""

    request_id: Hashable
    prompt_ids: list[int]
    max_new_tokens: int
    """New tokens to generate in this request (not counting `resume_ids`)."""
    resume_ids: list[int] = field(default_factory=list)
    """Response tokens already generated earlier; the request continues after them."""
    seed: int | None = None
    """Seed of this request's sampler; None: drawn from the engine's seed and a counter."""
    stop_ids: tuple[int, ...] = ()
    """Ids that end this request like EOS (finish 'stop'): a tool call's end tag."""


@dataclass
class Result:
    """What a request produced in this engine (tokens after `resume_ids` only)."""

    request_id: Hashable
    token_ids: list[int]
    logprobs: list[float]
    """Behaviour log-prob of each token in `token_ids` (see module docstring)."""
    versions: list[int]
    """`policy_version` of the engine when each token was sampled."""
    finish_reason: str
    """'stop' (EOS, which is the last token), 'length' (max_new_tokens) or 'abort'."""


@dataclass
class _Row:
    request: Request
    rng: random.Random
    next_input: int  # token fed at the next decode step
    cached: int  # tokens of this row in the key/value cache
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def result(self, finish_reason: str) -> Result:
        return Result(self.request.request_id, self.token_ids, self.logprobs, self.versions, finish_reason)


class ContinuousEngine:
    """Fixed-slot continuous batching. `submit`, then `step` until `has_work` is False."""

    def __init__(
        self,
        model,
        num_slots: int,
        eos_token_id: int | Iterable[int] | None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        pad_token_id: int = 0,
    ):
        # GLA models (`longrl.models.gla_hf`) keep a recurrent state per row instead of keys
        # and values; see `_RecurrentRows`.
        self._recurrent = bool(getattr(model, "recurrent_cache", False))
        attn = getattr(model.config, "_attn_implementation", None) or "eager"
        if not self._recurrent and attn not in ("eager", "sdpa"):
            raise ValueError(f"ContinuousEngine passes a 4-D attention mask; needs eager or sdpa attention, got {attn!r}")
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be at least 1")
        self.model = model
        self.num_slots = num_slots
        if eos_token_id is None:
            self.eos_ids = frozenset()
        elif isinstance(eos_token_id, int):
            self.eos_ids = frozenset([eos_token_id])
        else:
            self.eos_ids = frozenset(eos_token_id)
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.policy_version = 0
        self._n_seeded = 0
        self._waiting: deque[Request] = deque()
        self._rows: list[_Row] = []  # row i of the cache <-> self._rows[i]
        self._cache: DynamicCache | None = None  # None: no cached columns yet
        # Counters for throughput and slot utilisation; never reset by the engine.
        self.steps = 0  # decode steps
        self.busy_slot_steps = 0  # sum over decode steps of active rows
        self.tokens_generated = 0
        self.prefill_tokens = 0

    # ------------------------------------------------------------------ public API

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_work(self) -> bool:
        return bool(self._rows or self._waiting)

    def submit(self, requests: Iterable[Request]) -> None:
        """Queue requests (first in, first admitted)."""
        for r in requests:
            if r.max_new_tokens < 1:
                raise ValueError(f"request {r.request_id!r}: max_new_tokens={r.max_new_tokens} must be at least 1")
            if len(r.prompt_ids) + len(r.resume_ids) < 1:
                raise ValueError(f"request {r.request_id!r}: empty prompt")
            self._waiting.append(r)

    @torch.no_grad()
    def step(self) -> list[Result]:
        """Admit waiting requests into free slots, decode one token per active request.

        Returns the requests that finished at this step.
        """
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling; the trainer's mode is restored below
        try:
            return self._step()
        finally:
            self.model.train(was_training)

    def _step(self) -> list[Result]:
        self._admit()
        if not self._rows:
            return []
        B = len(self._rows)
        C = self._columns()
        dev = self.device
        input_ids = torch.tensor([[r.next_input] for r in self._rows], device=dev)  # [B, 1]
        if self._recurrent:  # every row's state is current: no mask, no positions
            out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True,
                             **cache_kwargs(self.model, self._cache))
        else:
            cached = torch.tensor([r.cached for r in self._rows], device=dev)  # [B]
            mask = _decode_mask(cached, C, self.model.dtype)  # [B, 1, 1, C+1]
            cache = self._cache if self._cache is not None else DynamicCache()
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=cached[:, None], use_cache=True,
                             **cache_kwargs(self.model, cache))
        self._cache = returned_cache(out)
        logits = out.logits[:, -1].float()  # [B, V]
        u = torch.tensor([r.rng.random() for r in self._rows], device=dev)  # [B]
        tokens, logprobs = sample_with_uniforms(logits, u, self.temperature, self.top_p)  # [B], [B]
        self.steps += 1
        self.busy_slot_steps += B
        self.tokens_generated += B
        finished, keep = [], []
        for i, (row, tok, lp) in enumerate(zip(self._rows, tokens.tolist(), logprobs.tolist())):
            row.token_ids.append(tok)
            row.logprobs.append(lp)
            row.versions.append(self.policy_version)
            row.cached += 1
            row.next_input = tok
            if tok in self.eos_ids or tok in row.request.stop_ids:
                finished.append(row.result("stop"))
            elif len(row.token_ids) >= row.request.max_new_tokens:
                finished.append(row.result("length"))
            else:
                keep.append(i)
        if len(keep) < B:
            self._keep_rows(keep)
        return finished

    def abort(self, request_id: Hashable) -> Result | None:
        """Stop one request; returns what it generated so far (None if unknown or finished)."""
        for i, row in enumerate(self._rows):
            if row.request.request_id == request_id:
                self._keep_rows([j for j in range(len(self._rows)) if j != i])
                return row.result("abort")
        for r in self._waiting:
            if r.request_id == request_id:
                self._waiting.remove(r)
                return Result(r.request_id, [], [], [], "abort")
        return None

    def abort_all(self) -> list[Result]:
        """Stop every active and waiting request; returns their partial results."""
        results = [row.result("abort") for row in self._rows]
        results += [Result(r.request_id, [], [], [], "abort") for r in self._waiting]
        self._rows, self._cache = [], None
        self._waiting.clear()
        return results

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run `requests` to completion on an idle engine; results in request order."""
        if self.has_work:
            raise RuntimeError("generate() needs an idle engine; drive a busy one with submit() and step()")
        self.submit(requests)
        done = {}
        while self.has_work:
            for res in self.step():
                done[res.request_id] = res
        return [done[r.request_id] for r in requests]

    # ------------------------------------------------------------------ slots and cache

    def _new_row(self, req: Request) -> _Row:
        seed = req.seed
        if seed is None:
            seed = mix_seed(self.seed, self._n_seeded)
            self._n_seeded += 1
        context = list(req.prompt_ids) + list(req.resume_ids)
        return _Row(req, random.Random(seed), next_input=context[-1], cached=len(context) - 1)

    def _admit(self) -> None:
        new = []
        while self._waiting and len(self._rows) + len(new) < self.num_slots:
            new.append(self._new_row(self._waiting.popleft()))
        if not new:
            return
        # Prefill in buckets of similar length: one long resumed context in a batch of short
        # prompts would otherwise pad every row to its length.
        new.sort(key=lambda r: r.cached)
        if self._recurrent:
            parts = [self._cache] + [_RecurrentRows.prefill(self, new[b]) for b in _length_buckets([r.cached for r in new])]
            self._rows.extend(new)
            self._cache = _RecurrentRows.concat([p for p in parts if p is not None])
            return
        parts = [(None if self._cache is None else _cache_tensors(self._cache), len(self._rows))]
        for bucket in _length_buckets([r.cached for r in new]):
            rows = new[bucket]
            parts.append((self._prefill(rows), len(rows)))
        self._rows.extend(new)
        merged = _concat_rows(parts)
        self._cache = None if merged is None else DynamicCache(ddp_cache_data=merged)

    def _prefill(self, rows: list[_Row]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Cache each row's context minus its last token, right-aligned; None if all empty."""
        contexts = [(list(r.request.prompt_ids) + list(r.request.resume_ids))[:-1] for r in rows]
        lens = [len(c) for c in contexts]
        P = max(lens)
        if P == 0:
            return None
        dev = self.device
        ids = torch.full((len(rows), P), self.pad_token_id, dtype=torch.long, device=dev)  # [n, P]
        for i, c in enumerate(contexts):
            if c:
                ids[i, P - len(c):] = torch.tensor(c, device=dev)
        start = P - torch.tensor(lens, device=dev)  # [n] first real column of each row
        col = torch.arange(P, device=dev)  # [P]
        positions = (col[None, :] - start[:, None]).clamp(min=0)  # [n, P]
        mask = _prefill_mask(start, P, self.model.dtype)  # [n, 1, P, P]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **cache_kwargs(self.model, DynamicCache()))
        self.prefill_tokens += sum(lens)
        return _cache_tensors(returned_cache(out))

    def _columns(self) -> int:
        return 0 if self._cache is None else self._cache.get_seq_length()

    def _keep_rows(self, keep: list[int]) -> None:
        """Drop all rows not in `keep` and trim columns that no remaining row uses."""
        self._rows = [self._rows[i] for i in keep]
        if self._recurrent:
            self._cache = _RecurrentRows.select(self._cache, torch.tensor(keep, device=self.device)) if self._rows else None
            return
        if not self._rows or self._cache is None:
            self._cache = None if not self._rows else self._cache
            return
        idx = torch.tensor(keep, device=self.device)
        need = max(r.cached for r in self._rows)
        kv = [(k.index_select(0, idx)[..., k.shape[-2] - need:, :], v.index_select(0, idx)[..., v.shape[-2] - need:, :])
              for k, v in _cache_tensors(self._cache)]  # each [B', H, need, D]
        self._cache = DynamicCache(ddp_cache_data=kv) if need > 0 else None


class _RecurrentRows:
    """Row operations for a model whose cache is a recurrent state (`model.recurrent_cache`,
    e.g. GLA's `GLACache`), in place of the key/value columns above: the cache type brings
    its own `select_rows` / `concat_rows`, the engine knows nothing of what it holds.
    Prefill feeds each context minus its last token, left-padded; a padding token leaves a
    recurrent state untouched and is never attended to, so a row's state is what it would
    be alone (the model's padding contract, tested in tests/models)."""

    @staticmethod
    def prefill(engine: "ContinuousEngine", rows: list[_Row]):
        contexts = [(list(r.request.prompt_ids) + list(r.request.resume_ids))[:-1] for r in rows]
        P = max(1, max(len(c) for c in contexts))  # an all-padding column when every context is empty
        dev = engine.device
        ids = torch.full((len(rows), P), engine.pad_token_id, dtype=torch.long, device=dev)  # [n, P]
        valid = torch.zeros((len(rows), P), dtype=torch.long, device=dev)  # [n, P]
        for i, c in enumerate(contexts):
            if c:
                ids[i, P - len(c):] = torch.tensor(c, device=dev)
                valid[i, P - len(c):] = 1
        out = engine.model(input_ids=ids, attention_mask=valid, use_cache=True, logits_to_keep=1)
        engine.prefill_tokens += sum(len(c) for c in contexts)
        return returned_cache(out)  # the model's own cache type

    @staticmethod
    def concat(caches: list):
        return type(caches[0]).concat_rows(caches)

    @staticmethod
    def select(cache, idx: torch.Tensor):
        return cache.select_rows(idx)


# ---------------------------------------------------------------------- tensor helpers


def sample_with_uniforms(
    logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V], uniforms u [B] in [0, 1) -> (tokens [B], behaviour logprobs [B]).

    Inverse-CDF sampling: row b takes the first token whose cumulative (top-p renormalised)
    probability exceeds u[b], so each row's draw depends only on its own uniform.
    Temperature 0 is greedy (u unused).
    """
    if temperature == 0.0:
        logp = torch.log_softmax(logits, dim=-1)  # [B, V]
        tokens = logits.argmax(dim=-1)  # [B]
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [B, V]
    probs = logp.exp()  # [B, V]
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    cdf = probs.cumsum(-1)  # [B, V]
    target = (u * cdf[:, -1]).to(cdf.dtype)[:, None]  # [B, 1]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [B]
    # Round-off can leave target >= cdf[-1]: take the last token with mass instead.
    last = (probs > 0).long().cumsum(-1).argmax(-1)  # [B]
    tokens = torch.minimum(tokens, last)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(item[0], item[1]) for item in cache]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 where allowed, the dtype's minimum elsewhere).

    A finite minimum (not -inf) keeps a fully masked row from producing NaN.
    """
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _decode_mask(cached: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """cached [B] tokens per row, right-aligned in C columns -> mask [B, 1, 1, C+1]."""
    col = torch.arange(C + 1, device=cached.device)  # [C+1]
    allowed = col[None, :] >= (C - cached)[:, None]  # [B, C+1]
    return _additive(allowed, dtype)[:, None, None, :]


def _prefill_mask(start: torch.Tensor, P: int, dtype: torch.dtype) -> torch.Tensor:
    """start [n] first real column per row -> causal padded mask [n, 1, P, P].

    A padding query attends to itself only, so no query row is fully masked.
    """
    i = torch.arange(P, device=start.device)  # [P]
    causal = i[None, :] <= i[:, None]  # [P(q), P(k)]
    real_key = i[None, None, :] >= start[:, None, None]  # [n, 1, P(k)]
    allowed = (causal[None] & real_key) | torch.eye(P, dtype=torch.bool, device=start.device)[None]  # [n, P, P]
    return _additive(allowed, dtype)[:, None]


def _length_buckets(lens: list[int]) -> list[slice]:
    """Split ascending lengths into runs whose padded size is at most twice their tokens."""
    buckets, start, total = [], 0, 0
    for j, n in enumerate(lens):
        if j > start and (j - start + 1) * n > 2 * (total + n):
            buckets.append(slice(start, j))
            start, total = j, 0
        total += n
    buckets.append(slice(start, len(lens)))
    return buckets


def _concat_rows(parts: list[tuple[list | None, int]]):
    """Stack right-aligned caches `(kv or None, rows)` by row, left-padding to the most columns.

    A part with None has no columns: it gets zero columns, which the masks never let anyone
    attend to. Returns None when no part has columns.
    """
    parts = [(kv, n) for kv, n in parts if n > 0]
    with_kv = [kv for kv, _ in parts if kv is not None]
    if not with_kv:
        return None
    ref = with_kv[0]
    C = max(kv[0][0].shape[-2] for kv in with_kv)
    out = []
    for layer, (k_ref, v_ref) in enumerate(ref):
        ks, vs = [], []
        for kv, n in parts:
            if kv is None:
                ks.append(k_ref.new_zeros((n, k_ref.shape[1], C, k_ref.shape[3])))  # [n, H, C, D]
                vs.append(v_ref.new_zeros((n, v_ref.shape[1], C, v_ref.shape[3])))
            else:
                k, v = kv[layer]
                ks.append(F.pad(k, (0, 0, C - k.shape[-2], 0)))  # left-pad columns
                vs.append(F.pad(v, (0, 0, C - v.shape[-2], 0)))
        out.append((torch.cat(ks, 0), torch.cat(vs, 0)))
    return out


class ContinuousBackend:
    """The `continuous` rollout backend: a `ContinuousEngine` behind the backend interface
    (`rollout/base.py`). APRIL drives it through submit/step/abort_all; `generate` runs a
    batch of requests to completion. Token-only requests (no video embeddings yet)."""

    name = "continuous"
    supports_partial = True

    def __init__(self, model, num_slots: int, **engine_kwargs):
        self.engine = ContinuousEngine(model, num_slots, **engine_kwargs)

    # ---- the engine protocol APRIL uses
    policy_version = property(lambda self: self.engine.policy_version)
    num_slots = property(lambda self: self.engine.num_slots)
    steps = property(lambda self: self.engine.steps)
    busy_slot_steps = property(lambda self: self.engine.busy_slot_steps)
    tokens_generated = property(lambda self: self.engine.tokens_generated)
    has_work = property(lambda self: self.engine.has_work)

    def submit(self, requests: Iterable[Request]) -> None:
        self.engine.submit(requests)

    def step(self) -> list[Result]:
        return self.engine.step()

    def abort_all(self) -> list[Result]:
        return self.engine.abort_all()

    def sync_weights(self, model, version: int) -> None:
        """The engine runs the trainer's model in place; only the version tag changes (call
        it between steps: keys cached under old weights would mix policies)."""
        if self.engine.has_work:
            raise RuntimeError("sync_weights on a busy engine: finish or abort its requests first")
        self.engine.model, self.engine.policy_version = model, version

    def release_memory(self) -> None:
        """Nothing to free: the engine's cache is dropped when its last request leaves."""

    def generate(self, requests, sampling, generator=None):
        """`request.n` samples per request. Continuous batching draws from one stream per
        sample: each is seeded from `generator` (the trainer's checkpointed sampler, so a
        resumed run draws the same), or from the engine's seed and a counter without one."""
        from longrl.rollout.engine import Generation

        if any(r.media is not None for r in requests):
            raise ValueError("the continuous backend takes token-only requests (no video embeddings yet)")
        eng = self.engine
        kept = eng.temperature, eng.top_p  # APRIL's sampling settings, restored below
        eng.temperature, eng.top_p = sampling.temperature, sampling.top_p
        n = sum(r.n for r in requests)
        seeds = (torch.randint(0, 2**62, (n,), generator=generator).tolist() if generator is not None else [None] * n)
        flat = [Request((k, i), r.prompt_ids, sampling.max_new_tokens, stop_ids=sampling.stop_ids) for k, r in enumerate(requests)
                for i in range(r.n)]
        for req, seed in zip(flat, seeds):
            req.seed = seed
        try:
            return [Generation(res.token_ids, res.logprobs, res.finish_reason) for res in eng.generate(flat)]
        finally:
            eng.temperature, eng.top_p = kept
