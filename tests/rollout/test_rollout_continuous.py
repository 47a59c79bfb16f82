"""Continuous batching engine: equal to one-at-a-time generation, exact log-probs, resume, abort."""

import random

import pytest
import torch

from longrl.rollout.continuous import ContinuousEngine, Request, _length_buckets, mix_seed, sample_with_uniforms


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads only spin on a shared machine (4x slower under load)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _reference(model, prompt, n, eos, temperature=0.0):
    """Greedy decoding with no cache and no batching: a full forward per token."""
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        ids.append(tok)
        if tok in eos:
            break
    return out


def _teacher_forced(model, prompt, response, temperature=1.0):
    """log p(response_t | prefix) from one forward over prompt + response."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1]  # [T, V]
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def _requests(n, vocab, seed=0, max_len=20):
    rng = random.Random(seed)
    return [Request(i, [rng.randrange(vocab) for _ in range(rng.randint(1, 9))], rng.randint(1, max_len))
            for i in range(n)]


def test_greedy_continuous_equals_one_by_one(tiny_qwen):
    model = tiny_qwen().eval()
    reqs = _requests(12, 50)
    free = [_reference(model, r.prompt_ids, r.max_new_tokens, set()) for r in reqs]
    # An EOS id that some responses produce part-way: lengths then vary for two reasons.
    counts = {}
    for out in free:
        for t in out[1:]:
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=counts.get)
    refs = [out[:out.index(eos) + 1] if eos in out else out for out in free]
    engine = ContinuousEngine(model, num_slots=3, eos_token_id=eos, temperature=0.0)
    results = engine.generate(reqs)
    reasons = set()
    for req, res, ref in zip(reqs, results, refs):
        assert res.token_ids == ref
        expected = "stop" if ref[-1] == eos else "length"
        assert res.finish_reason == expected
        reasons.add(expected)
        lp = _teacher_forced(model, req.prompt_ids, ref)
        torch.testing.assert_close(torch.tensor(res.logprobs), lp, atol=1e-5, rtol=0)
        assert res.versions == [0] * len(ref)
    assert reasons == {"stop", "length"}
    assert engine.tokens_generated == sum(len(r) for r in refs)
    assert engine.busy_slot_steps == engine.tokens_generated
    assert engine.steps * 3 >= engine.busy_slot_steps > engine.steps * 2  # mostly full slots
    assert not engine.has_work


def test_admitting_very_different_lengths_together(tiny_qwen):
    """Short prompts and long resumed contexts join in one step (prefilled in separate buckets)."""
    model = tiny_qwen(seed=4).eval()
    rng = random.Random(5)
    reqs = [Request(i, [rng.randrange(50) for _ in range(n)], 6) for i, n in enumerate([1, 2, 30, 3, 45, 2, 60])]
    engine = ContinuousEngine(model, num_slots=4, eos_token_id=None, temperature=0.0)
    for req, res in zip(reqs, engine.generate(reqs)):
        assert res.token_ids == _reference(model, req.prompt_ids, 6, set())
        torch.testing.assert_close(torch.tensor(res.logprobs), _teacher_forced(model, req.prompt_ids, res.token_ids),
                                   atol=1e-5, rtol=0)


def test_length_buckets_hand_worked():
    assert _length_buckets([16] * 30 + [500]) == [slice(0, 30), slice(30, 31)]
    assert _length_buckets([1, 2, 3, 4]) == [slice(0, 4)]
    assert _length_buckets([0, 0, 5]) == [slice(0, 2), slice(2, 3)]  # 3 rows * 5 > 2 * 5 tokens
    assert _length_buckets([10, 10, 50]) == [slice(0, 2), slice(2, 3)]  # 3 * 50 > 2 * 70
    assert _length_buckets([10, 10, 40]) == [slice(0, 3)]  # 3 * 40 <= 2 * 60
    assert _length_buckets([10, 30, 40]) == [slice(0, 3)]  # 3 * 40 <= 2 * 80


def test_resume_continues_like_an_uninterrupted_run(tiny_qwen):
    model = tiny_qwen(seed=1).eval()
    prompt = [3, 14, 15, 9, 2]
    engine = ContinuousEngine(model, num_slots=2, eos_token_id=None, temperature=0.0)
    (full,) = engine.generate([Request("a", prompt, 24)])
    for k in (1, 7, 23):
        (head,) = engine.generate([Request("h", prompt, k)])
        (tail,) = engine.generate([Request("t", prompt, 24 - k, resume_ids=head.token_ids)])
        assert head.token_ids + tail.token_ids == full.token_ids
        torch.testing.assert_close(torch.tensor(head.logprobs + tail.logprobs), torch.tensor(full.logprobs),
                                   atol=1e-5, rtol=0)
        assert tail.finish_reason == "length"


def test_sampling_does_not_depend_on_slots_and_logprobs_are_exact(tiny_qwen):
    model = tiny_qwen(seed=2).eval()
    reqs = _requests(9, 50, seed=3, max_len=15)
    for i, r in enumerate(reqs):
        r.seed = 100 + i
    out = {}
    for slots in (1, 4):
        engine = ContinuousEngine(model, num_slots=slots, eos_token_id=7, temperature=0.8, top_p=0.9)
        out[slots] = engine.generate(reqs)
    for req, a, b in zip(reqs, out[1], out[4]):
        assert a.token_ids == b.token_ids
        lp = _teacher_forced(model, req.prompt_ids, a.token_ids, temperature=0.8)
        torch.testing.assert_close(torch.tensor(b.logprobs), lp, atol=1e-5, rtol=0)
    # Different seeds give different samples (a sampler that ignores its seed would fail).
    assert len({tuple(r.token_ids) for r in out[4]}) > 1


def test_abort_returns_partial_work_and_leaves_others_intact(tiny_qwen):
    model = tiny_qwen(seed=3).eval()
    reqs = _requests(5, 50, seed=4, max_len=12)
    for r in reqs:
        r.max_new_tokens = 12
    refs = [_reference(model, r.prompt_ids, 12, set()) for r in reqs]
    engine = ContinuousEngine(model, num_slots=2, eos_token_id=None, temperature=0.0)
    engine.submit(reqs)
    for _ in range(5):
        assert engine.step() == []
    # Requests 0, 1 are active with 5 tokens; 2, 3, 4 wait.
    res0 = engine.abort(0)
    assert res0.finish_reason == "abort" and res0.token_ids == refs[0][:5]
    assert len(res0.logprobs) == len(res0.versions) == 5
    res3 = engine.abort(3)
    assert res3.token_ids == [] and res3.finish_reason == "abort"
    assert engine.abort(3) is None
    finished = {}
    while len(finished) < 2:
        for res in engine.step():
            finished[res.request_id] = res
    assert set(finished) == {1, 2}  # request 2 took the freed slot and ran to the end
    assert finished[1].token_ids == refs[1] and finished[2].token_ids == refs[2]
    engine.step()
    rest = engine.abort_all()
    assert [r.request_id for r in rest] == [4]
    assert rest[0].token_ids == refs[4][:len(rest[0].token_ids)] and len(rest[0].token_ids) == 6
    assert not engine.has_work


def test_tokens_are_tagged_with_the_policy_version(tiny_qwen):
    model = tiny_qwen().train()  # the trainer's mode: the engine samples in eval mode and restores it
    engine = ContinuousEngine(model, num_slots=1, eos_token_id=None, temperature=0.0)
    engine.submit([Request("x", [1, 2, 3], 6)])
    engine.step()
    engine.step()
    engine.policy_version = 5
    results = []
    while engine.has_work:
        results += engine.step()
    assert results[0].versions == [0, 0, 5, 5, 5, 5]
    assert model.training
    with pytest.raises(RuntimeError):
        engine.submit([Request("y", [1], 2)])
        engine.generate([Request("z", [1], 2)])


def test_sample_with_uniforms_hand_worked():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    tok = [int(sample_with_uniforms(logits, torch.tensor([u]), 1.0, 1.0)[0]) for u in (0.1, 0.49, 0.51, 0.79, 0.81, 0.99)]
    assert tok == [0, 0, 1, 1, 2, 2]
    # top_p=0.6 keeps {0, 1} (mass before token 1 is 0.5 < 0.6), renormalised to 0.625 / 0.375.
    tok = [int(sample_with_uniforms(logits, torch.tensor([u]), 1.0, 0.6)[0]) for u in (0.6, 0.64, 0.99)]
    assert tok == [0, 1, 1]
    _, lp = sample_with_uniforms(logits, torch.tensor([0.99]), 1.0, 0.6)
    assert lp.item() == pytest.approx(torch.log(torch.tensor(0.3)).item(), abs=1e-6)  # before top-p
    tok, lp = sample_with_uniforms(logits, torch.tensor([0.99]), 0.0, 1.0)
    assert tok.item() == 0 and lp.item() == pytest.approx(torch.log(torch.tensor(0.5)).item(), abs=1e-6)


def test_sample_with_uniforms_matches_the_distribution():
    """A grid of K uniforms hits each token in proportion to its (tempered, top-p) mass."""
    torch.manual_seed(0)
    B, V, K = 3, 11, 4000
    logits = torch.randn(B, V) * 2
    u = (torch.arange(K) + 0.5) / K  # [K]
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.3, 0.8)):
        tokens, _ = sample_with_uniforms(logits.repeat_interleave(K, 0), u.repeat(B), temperature, top_p)
        freq = torch.zeros(B, V).scatter_add_(1, tokens.view(B, K), torch.ones(B, K)) / K
        p = torch.softmax(logits / temperature, -1)
        # brute-force nucleus: smallest prefix of the sorted tokens with mass >= top_p
        for b in range(B):
            order = p[b].argsort(descending=True)
            mass, keep = 0.0, []
            for t in order.tolist():
                if mass >= top_p:
                    break
                keep.append(t)
                mass += p[b, t].item()
            want = torch.zeros(V)
            want[keep] = p[b, keep] / p[b, keep].sum()
            torch.testing.assert_close(freq[b], want, atol=2.0 / K, rtol=0)


def test_mix_seed_is_stable_and_spreads():
    assert mix_seed(0, 1, 2) == mix_seed(0, 1, 2)
    seeds = {mix_seed(0, g, i) for g in range(20) for i in range(20)}
    assert len(seeds) == 400
    assert all(0 <= s < 2**63 for s in seeds)


# ---- GLA: a recurrent state per row instead of key/value columns --------------------------


def _gla(softmax_every, seed=0):
    from longrl.models.gla import GLAConfig
    from longrl.models.gla_hf import build_gla_model

    torch.manual_seed(seed)
    shape = GLAConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=2, mlp_hidden=64, chunk_size=4,
                      softmax_every=softmax_every, window=6)
    return build_gla_model(shape, pad_token_id=0, eos_token_id=1).double().eval()


@pytest.mark.parametrize("softmax_every", [0, 2], ids=["gla", "hybrid"])
def test_gla_greedy_continuous_equals_one_by_one_with_exact_logprobs(softmax_every):
    model = _gla(softmax_every)
    reqs = _requests(10, 50, seed=7)
    reqs.append(Request("long", [random.Random(1).randrange(50) for _ in range(25)], 9))  # longer than the window
    engine = ContinuousEngine(model, num_slots=3, eos_token_id=None, temperature=0.0)
    results = engine.generate(reqs)
    for req, res in zip(reqs, results):
        assert res.token_ids == _reference(model, req.prompt_ids, req.max_new_tokens, set())
        torch.testing.assert_close(torch.tensor(res.logprobs, dtype=torch.float64),
                                   _teacher_forced(model, req.prompt_ids, res.token_ids), atol=1e-6, rtol=0)
    assert engine.steps * 3 >= engine.busy_slot_steps > engine.steps * 2  # rows joined and left mid-run


@pytest.mark.parametrize("softmax_every", [0, 2], ids=["gla", "hybrid"])
def test_gla_sampling_resume_and_abort(softmax_every):
    model = _gla(softmax_every, seed=3)
    prompt = [3, 14, 15, 9, 2, 6, 5, 3]
    engine = ContinuousEngine(model, num_slots=2, eos_token_id=None, temperature=1.0)
    (full,) = engine.generate([Request("a", prompt, 20, seed=11)])
    torch.testing.assert_close(torch.tensor(full.logprobs, dtype=torch.float64),
                               _teacher_forced(model, prompt, full.token_ids), atol=1e-6, rtol=0)
    # Abort part-way while other rows decode beside it, then resume from the partial tokens.
    engine.submit([Request("a", prompt, 20, seed=11), Request("b", [7, 7], 30), Request("c", [4], 30)])
    for _ in range(6):
        engine.step()
    head = engine.abort("a")
    assert head.finish_reason == "abort" and head.token_ids == full.token_ids[: len(head.token_ids)]
    engine.abort_all()
    greedy = ContinuousEngine(model, num_slots=2, eos_token_id=None, temperature=0.0)
    (g_full,) = greedy.generate([Request("g", prompt, 12)])
    (g_head,) = greedy.generate([Request("h", prompt, 5)])
    (g_tail,) = greedy.generate([Request("t", prompt, 7, resume_ids=g_head.token_ids)])
    assert g_head.token_ids + g_tail.token_ids == g_full.token_ids
