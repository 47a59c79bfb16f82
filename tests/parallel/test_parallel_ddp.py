"""Data parallelism: 2 ranks with half the step batch each give the single-process gradient.

One 2-process run (`_worker_ddp.py`, ranks joined through `init_from_env` with
torchrun's variables) covers every loss aggregation, PPO and GSPO, gradient
accumulation inside each rank, a rank whose rows train no token (an untied LM
head with no .grad there), and DistributedDataParallel with the summing hook.
The rest are single-process checks of the helpers.
"""
from pathlib import Path

import pytest
import torch

from longrl.parallel import dist as ddist
from longrl.rl.losses import LOSS_AGGS, loss_normalizer

WORKER = Path(__file__).with_name("_worker_ddp.py")
TOL = 1e-10


@pytest.fixture(scope="module")
def records(run_worker):
    return run_worker(WORKER, "ddp")


def _select(records, **want):
    chosen = [r for r in records if all(r.get(k) == v for k, v in want.items())]
    assert chosen, f"no records for {want}"
    return chosen


def _assert_close(chosen):
    for r in chosen:
        bad = {k: v for k, v in r["errs"].items() if not v <= TOL}
        assert not bad, f"{r['kind']} rank={r['rank']} {r.get('loss_agg')} {r.get('loss_kind')}: {bad}"


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_split_batch_with_global_normalizer_gives_full_batch_gradient(records, loss_agg):
    chosen = _select(records, kind="dp", loss_agg=loss_agg, loss_kind="ppo", tie=True)
    assert {r["rank"] for r in chosen} == {0, 1}
    # response lengths 2+4+1 | 9+7+11 tokens, 3 | 3 sequences: the normaliser is the whole step's
    want = 34.0 if loss_agg == "token-mean" else 6.0
    assert all(r["normalizer"] == want for r in chosen)
    assert all(len(r["errs"]) > 10 and "loss" in r["errs"] for r in chosen)
    _assert_close(chosen)


def test_uneven_token_counts_make_the_local_normalizer_wrong(records):
    """The case is discriminating: per-rank token counts (7 vs 27) differ from each other
    and from half the total, so a local normaliser or gradient averaging would fail."""
    local = {r["rank"]: r["local_normalizer"] for r in _select(records, kind="dp", loss_agg="token-mean", tie=True)}
    assert local == {0: 7.0, 1: 27.0}


def test_gspo_matches(records):
    _assert_close(_select(records, kind="dp", loss_kind="gspo"))


def test_rank_without_trained_tokens_still_reduces_lm_head(records):
    chosen = _select(records, kind="dp", dropped=True)
    assert all(r["normalizer"] == 7.0 for r in chosen)  # only rank 0's tokens count
    assert all("grad_lm_head.weight" in r["errs"] for r in chosen)
    _assert_close(chosen)


def test_distributed_data_parallel_with_sum_hook_matches(records):
    chosen = _select(records, kind="ddp")
    assert {r["rank"] for r in chosen} == {0, 1}
    _assert_close(chosen)


def test_helpers_in_two_processes(records):
    for r in _select(records, kind="helpers"):
        assert (r["world"], r["backend"], r["local_rank"]) == (2, "gloo", r["rank"])
        assert (r["rank_fn"], r["world_fn"], r["is_main"]) == (r["rank"], 2, r["rank"] == 0)
        assert r["sum_float"] == 2.0  # 0.5 + 1.5
        assert r["sum_tensor"] == [3.0, 6.0]  # [1, 2] * 1 + [1, 2] * 2
        assert r["input_kept"] == [1.0 * (r["rank"] + 1), 2.0 * (r["rank"] + 1)]
        assert r["broadcast"] == {"seed": 7}
        assert r["again"]  # a second init_from_env returns the same context


def test_shard_indices_hand_worked():
    assert [ddist.shard_indices(7, r, 3) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [ddist.shard_indices(7, r, 3, strided=True) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [ddist.shard_indices(2, r, 4) for r in range(4)] == [[0], [1], [], []]
    with pytest.raises(ValueError):
        ddist.shard_indices(4, 2, 2)


def test_single_process_fallbacks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = ddist.init_from_env()
    assert (ctx.rank, ctx.world, ctx.backend, ctx.is_main) == (0, 1, None, True)
    assert (ddist.rank(), ddist.world(), ddist.is_main()) == (0, 1, True)
    ddist.barrier()
    t = torch.tensor([1.5, 2.0])
    out = ddist.all_reduce_sum(t)
    assert out.tolist() == [1.5, 2.0] and out is not t
    assert ddist.all_reduce_sum(3) == 3.0
    assert ddist.broadcast_object({"a": 1}) == {"a": 1}
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.ones(2, 2)
    ddist.all_reduce_gradients(model)
    assert model.weight.grad.tolist() == [[1.0, 1.0], [1.0, 1.0]] and model.bias.grad is None


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_global_normalizer_in_one_process_is_loss_normalizer(loss_agg):
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert ddist.global_loss_normalizer(mask, loss_agg) == loss_normalizer(mask, loss_agg)
    assert ddist.global_loss_normalizer(torch.zeros(2, 3), loss_agg) == 1.0  # clamped like loss_normalizer
