"""APRIL scheduler: invariants over many steps with a fake engine; exactness with the real one."""

import itertools
import random
from collections import deque

import pytest
import torch

from longrl.rollout.april import AprilScheduler, offpolicy_mask, tis_weights
from longrl.rollout.continuous import ContinuousEngine, Request, Result, mix_seed


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads only spin on a shared machine (4x slower under load)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


class FakeEngine:
    """The engine interface without a model: each request stops at a length drawn from a
    Pareto tail by its seed (or at its budget); tokens and log-probs come from the same RNG."""

    def __init__(self, num_slots):
        self.num_slots = num_slots
        self.policy_version = 0
        self.steps = self.busy_slot_steps = self.tokens_generated = 0
        self._waiting, self._active = deque(), []

    @property
    def has_work(self):
        return bool(self._waiting or self._active)

    def submit(self, requests):
        for r in requests:
            assert r.max_new_tokens >= 1
            self._waiting.append(r)

    def step(self):
        while self._waiting and len(self._active) < self.num_slots:
            r = self._waiting.popleft()
            rng = random.Random(r.seed)
            stop_at = int(3 * rng.paretovariate(1.1))  # long tail
            self._active.append((r, rng, stop_at, Result(r.request_id, [], [], [], "")))
        if not self._active:
            return []
        self.steps += 1
        self.busy_slot_steps += len(self._active)
        finished, keep = [], []
        for r, rng, stop_at, res in self._active:
            res.token_ids.append(rng.randrange(1, 10**6))
            res.logprobs.append(-rng.random())
            res.versions.append(self.policy_version)
            self.tokens_generated += 1
            if len(res.token_ids) >= stop_at:
                res.finish_reason = "stop"
            elif len(res.token_ids) >= r.max_new_tokens:
                res.finish_reason = "length"
            (finished if res.finish_reason else keep).append((r, rng, stop_at, res))
        self._active = keep
        return [item[3] for item in finished]

    def abort_all(self):
        out = [res for _, _, _, res in self._active] + [Result(r.request_id, [], [], [], "") for r in self._waiting]
        for res in out:
            res.finish_reason = "abort"
        self._active, self._waiting = [], deque()
        return out


def _snapshot(scheduler):
    return {(s.group_id, s.index): (list(s.response_ids), list(s.logprobs), list(s.versions))
            for g in scheduler.buffer for s in g.samples}


@pytest.mark.parametrize("partial,over_provision,max_staleness", [
    (True, 2.0, 2), (True, 1.5, 0), (True, 2.0, None), (False, 2.0, 2), (False, 1.0, 2),
])
def test_invariants_over_many_steps(partial, over_provision, max_staleness):
    G, N, max_new = 4, 3, 40
    engine = FakeEngine(num_slots=8)
    sched = AprilScheduler(engine, group_size=G, max_new_tokens=max_new, over_provision=over_provision,
                           max_staleness=max_staleness, partial=partial, seed=7)
    prompts = ((f"p{i}", [i, i + 1]) for i in itertools.count())
    trained, seen_groups, consumed, dropped = set(), set(), 0, 0
    generated = trained_tokens = discarded = 0
    parked_before, resumed_extends = {}, 0
    for step in range(60):
        version = engine.policy_version
        groups, stats = sched.next_step(prompts, N)
        consumed += stats.prompts_used
        dropped += stats.dropped_groups
        assert len(groups) == N and stats.groups == N
        for group in groups:
            gid = group[0].group_id
            assert gid not in seen_groups  # never returned twice, never split across steps
            seen_groups.add(gid)
            assert [s.index for s in group] == list(range(G))
            assert {(s.group_id, s.prompt_id) for s in group} == {(gid, group[0].prompt_id)}
            for s in group:
                assert (s.group_id, s.index) not in trained
                trained.add((s.group_id, s.index))
                assert s.finish_reason in ("stop", "length")
                assert 1 <= len(s.response_ids) <= max_new
                if s.finish_reason == "length":
                    assert len(s.response_ids) == max_new
                assert len(s.response_ids) == len(s.logprobs) == len(s.versions)
                assert s.versions == sorted(s.versions) and s.versions[-1] <= version
                if max_staleness is not None:
                    assert version - min(s.versions) <= max_staleness
                if not partial:
                    assert len(set(s.versions)) == 1  # never resumed
        # A sample parked last step either continues its parked tokens, or was reset for staleness.
        now = {(s.group_id, s.index): s for group in groups for s in group}
        now.update({(s.group_id, s.index): s for g in sched.buffer for s in g.samples})
        for key, (ids, lps, vers) in parked_before.items():
            s = now[key]  # a parked sample never disappears
            stale = max_staleness is not None and vers and version - min(vers) > max_staleness
            extends = s.response_ids[:len(ids)] == ids and s.logprobs[:len(ids)] == lps and s.versions[:len(ids)] == vers
            assert extends != bool(stale)
            resumed_extends += bool(extends and ids and len(s.response_ids) > len(ids))
        parked_before = _snapshot(sched)
        # Stats agree with a recount from the returned samples.
        ages = [version - v for group in groups for s in group for v in s.versions]
        assert stats.trained_tokens == len(ages)
        assert stats.offpolicy_token_frac == pytest.approx(sum(a > 0 for a in ages) / len(ages))
        assert stats.mean_staleness == pytest.approx(sum(ages) / len(ages))
        assert 0.0 < stats.slot_utilisation <= 1.0
        generated += stats.tokens_generated
        trained_tokens += stats.trained_tokens
        discarded += stats.discarded_tokens
        engine.policy_version += 1  # the optimizer step
    # No group lost or duplicated: every consumed prompt is trained, still buffered, or (only
    # without partial rollouts) dropped at a stop.
    buffered = {g.group_id for g in sched.buffer}
    assert not buffered & seen_groups
    assert len(buffered) + len(seen_groups) + dropped == consumed
    assert (dropped > 0) == (not partial and over_provision > 1.0)
    # Every generated token is trained, discarded, or still parked: none counted twice.
    in_buffer = sum(len(s.response_ids) for g in sched.buffer for s in g.samples)
    assert generated == trained_tokens + discarded + in_buffer
    if partial and max_staleness != 0:
        assert resumed_extends > 0  # resumption really happened
    if partial and over_provision > 1.0:
        assert len(buffered) > 0
    if not partial and over_provision == 1.0:
        assert discarded == 0 and not buffered


def test_staleness_zero_means_on_policy_only():
    engine = FakeEngine(num_slots=6)
    sched = AprilScheduler(engine, group_size=3, max_new_tokens=30, max_staleness=0, partial=True, seed=1)
    prompts = ((i, [i]) for i in itertools.count())
    resets = 0
    for _ in range(15):
        groups, stats = sched.next_step(prompts, 2)
        assert stats.offpolicy_token_frac == 0.0 and stats.max_staleness == 0
        resets += stats.stale_resets
        engine.policy_version += 1
    assert resets > 0


def _greedy_reference(model, prompt, n, eos):
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            tok = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok == eos:
            break
    return out


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [(f"q{i}", [rng.randrange(50) for _ in range(rng.randint(2, 6))]) for i in range(n)]


def test_synchronous_mode_reproduces_plain_generation(tiny_qwen):
    """partial=False, over_provision=1.0: exactly the samples of one plain generate() call."""
    model = tiny_qwen(seed=5).eval()
    G, N, max_new = 3, 4, 12
    prompts = _prompts(N, seed=1)
    # Greedy: every sample equals the no-cache, no-batching reference.
    engine = ContinuousEngine(model, num_slots=5, eos_token_id=11, temperature=0.0)
    sched = AprilScheduler(engine, G, over_provision=1.0, partial=False, max_new_tokens=max_new)
    groups, stats = sched.next_step(prompts, N)
    assert [g[0].prompt_id for g in groups] == [p for p, _ in prompts]
    for (pid, ids), group in zip(prompts, groups):
        ref = _greedy_reference(model, ids, max_new, 11)
        assert all(s.response_ids == ref for s in group)
    assert stats.discarded_tokens == 0 and not sched.buffer
    # Sampled: the same tokens and log-probs as generate() with the documented per-sample seeds.
    engine = ContinuousEngine(model, num_slots=5, eos_token_id=11, temperature=1.0, top_p=0.95)
    sched = AprilScheduler(engine, G, over_provision=1.0, partial=False, max_new_tokens=max_new, seed=3)
    groups, _ = sched.next_step(prompts, N)
    plain = ContinuousEngine(model, num_slots=2, eos_token_id=11, temperature=1.0, top_p=0.95)
    reqs = [Request((gi, i), ids, max_new, seed=mix_seed(3, gi, i, 1)) for gi, (_, ids) in enumerate(prompts)
            for i in range(G)]
    results = plain.generate(reqs)
    samples = [s for g in groups for s in g]
    assert [s.response_ids for s in samples] == [r.token_ids for r in results]
    torch.testing.assert_close(torch.tensor([x for s in samples for x in s.logprobs]),
                               torch.tensor([x for r in results for x in r.logprobs]), atol=1e-5, rtol=0)
    assert [s.finish_reason for s in samples] == [r.finish_reason for r in results]
    assert len({tuple(s.response_ids) for s in samples}) > N  # samples within a group differ


def test_partial_rollouts_resume_exactly_under_greedy(tiny_qwen):
    """With fixed weights and greedy decoding, parking and resuming must not change a token."""
    model = tiny_qwen(seed=6).eval()
    G, N, max_new, eos = 2, 2, 16, 11
    prompts = iter(_prompts(40, seed=2))
    engine = ContinuousEngine(model, num_slots=3, eos_token_id=eos, temperature=0.0)
    sched = AprilScheduler(engine, G, 2.0, None, True, max_new_tokens=max_new)
    parked = resumed = 0
    refs = {}
    for _ in range(6):
        groups, stats = sched.next_step(prompts, N)
        parked += stats.parked_samples
        resumed += sum(v < engine.policy_version for g in groups for s in g for v in s.versions[:1])
        for group in groups:
            for s in group:
                key = tuple(s.prompt_ids)
                refs.setdefault(key, _greedy_reference(model, s.prompt_ids, max_new, eos))
                assert s.response_ids == refs[key]
                assert s.finish_reason == ("stop" if refs[key][-1] == eos else "length")
        engine.policy_version += 1  # weights unchanged: greedy tokens must not move
    assert parked > 0 and resumed > 0


def test_offpolicy_mask_hand_worked():
    versions = torch.tensor([[3, 3, 2, -1], [1, 2, 3, 3]])
    keep = offpolicy_mask(versions, current_version=3)
    assert keep.tolist() == [[True, True, False, False], [False, False, True, True]]


def test_tis_weights_values_and_detach():
    trainer = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    behaviour = torch.tensor([[-1.0, -1.0, -2.0]])
    w = tis_weights(trainer, behaviour, clip=2.0)
    expected = torch.tensor([[1.0, torch.e ** -1, 2.0]])  # exp(0), exp(-1), min(exp(1.5), 2)
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad
    torch.manual_seed(0)
    a, b = torch.randn(4, 9), torch.randn(4, 9)
    brute = torch.tensor([[min(float(torch.exp(x - y)), 1.5) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)])
    torch.testing.assert_close(tis_weights(a, b, 1.5), brute)


def test_rollout_benchmark_runs_small(capsys):
    from longrl.bench.rollout import run

    report = run(["--json", "--steps", "2", "--groups", "2", "--group-size", "2", "--slots", "4",
                  "--max-new-tokens", "24", "--hidden", "32", "--device", "cpu", "--threads", "0"])
    assert set(report) >= {"sync", "april", "speedup", "speedup_per_engine_step"}
    assert report["sync"]["offpolicy_token_frac"] == 0.0 and report["sync"]["discarded_tokens"] == 0
    assert report["sync"]["trained_tokens"] == report["sync"]["tokens_generated"] > 0
    assert report["april"]["trained_tokens"] > 0 and 0 < report["april"]["slot_utilisation"] <= 1
    assert '"speedup"' in capsys.readouterr().out


def test_pareto_eos_sets_the_stop_probability(tiny_qwen):
    from longrl.bench.rollout import ParetoEOS

    model = ParetoEOS(tiny_qwen().eval(), eos_id=1, prompt_len=4, alpha=1.0, scale=8.0)
    ids = torch.randint(2, 50, (2, 10))
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(10).expand(2, 10)).logits  # [2, 10, V]
    p_eos = torch.softmax(logits, -1)[..., 1]
    n = (torch.arange(10) + 1 - 4).clamp(min=0)  # response tokens before the predicted one
    torch.testing.assert_close(p_eos, (1.0 / (8.0 + n.float())).expand(2, 10), atol=1e-6, rtol=0)
