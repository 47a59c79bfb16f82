"""The batched engine: behaviour log-probs equal a teacher-forced pass; batching changes nothing."""

import pytest
import torch

from longrl.rollout.engine import generate
from longrl.rollout.sampling import top_p_filter
from longrl.streambp.logprobs import make_batch, sequence_logprobs

PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12], [13]]


def test_behaviour_logprobs_equal_teacher_forced(tiny_qwen):
    model = tiny_qwen()
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.8):
        gens = generate(model, PROMPTS, max_new_tokens=12, eos_id=1, pad_id=0,
                        temperature=temperature, generator=g)
        batch = make_batch(PROMPTS, [x.response_ids for x in gens], pad_id=0)
        ref = sequence_logprobs(model, batch, chunk=5, temperature=temperature)
        for i, x in enumerate(gens):
            got = torch.tensor(x.logprobs)
            want = ref[i][batch.mask[i] != 0]
            assert len(x.response_ids) == len(x.logprobs) == want.numel()
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_greedy_batched_equals_one_by_one(tiny_qwen):
    model = tiny_qwen(seed=3)
    batched = generate(model, PROMPTS, max_new_tokens=10, eos_id=1, pad_id=0, temperature=0.0)
    for p, b in zip(PROMPTS, batched):
        (alone,) = generate(model, [p], max_new_tokens=10, eos_id=1, pad_id=0, temperature=0.0)
        assert alone.response_ids == b.response_ids


def test_stop_on_eos_and_finish_reasons(tiny_qwen):
    model = tiny_qwen(seed=1)
    free = generate(model, PROMPTS, max_new_tokens=6, eos_id=-1, pad_id=0, temperature=0.0)
    assert all(g.finish_reason == "length" and len(g.response_ids) == 6 for g in free)
    eos = free[0].response_ids[2]  # a token row 0 produces: make it the EOS
    gens = generate(model, PROMPTS, max_new_tokens=6, eos_id=eos, pad_id=0, temperature=0.0)
    for f, g in zip(free, gens):
        if eos in f.response_ids:
            n = f.response_ids.index(eos) + 1
            assert g.finish_reason == "stop" and g.response_ids == f.response_ids[:n]
        else:
            assert g.finish_reason == "length" and g.response_ids == f.response_ids
    assert gens[0].finish_reason == "stop" and len(gens[0].response_ids) <= 3


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = top_p_filter(probs, 0.7)  # 0.5 + 0.3 reaches 0.7: keep two tokens
    assert torch.allclose(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_model_samples_with_the_trainers_cpu_generator(tiny_qwen):
    """The GRPO sampler is a CPU generator; a CUDA model draws from it the same tokens."""
    model = tiny_qwen(dtype=torch.float64)
    on_cpu = generate(model, PROMPTS, max_new_tokens=8, eos_id=1, pad_id=0, temperature=1.0,
                      generator=torch.Generator().manual_seed(0))
    on_gpu = generate(model.cuda(), PROMPTS, max_new_tokens=8, eos_id=1, pad_id=0, temperature=1.0,
                      generator=torch.Generator().manual_seed(0))
    assert [g.response_ids for g in on_gpu] == [c.response_ids for c in on_cpu]
