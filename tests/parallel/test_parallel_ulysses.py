"""Ulysses sequence parallelism equals the single-process model on the full sequence.

One 4-process gloo run (`_worker_ulysses.py`) covers P = 4 and P = 2, float64
and float32, tiny Qwen2 (4 heads / 2 kv heads), Llama (1 kv head) and Qwen3
(q/k norms), T = 13 (divisible by neither P), the body forward and the chunked
log-prob path with PPO and GSPO losses, and activation checkpointing; the tests
below judge its records. The rest are single-process checks of the helpers.
"""
from pathlib import Path

import pytest
import torch

from longrl.parallel.mrsp_encode import frame_slice
from longrl.parallel.ulysses import kv_repeats, shard_batch, shard_for_sp, shard_positions, ulysses_attention
from longrl.streambp.logprobs import make_batch

WORKER = Path(__file__).with_name("_worker_ulysses.py")
TOL = {"torch.float64": 1e-10, "torch.float32": 1e-5}


@pytest.fixture(scope="module")
def records(run_worker):
    return run_worker(WORKER, "ulysses")


def _select(records, **want):
    chosen = [r for r in records if all(r.get(k) == v for k, v in want.items())]
    assert chosen, f"no records for {want}"
    return chosen


def _assert_close(chosen):
    for r in chosen:
        bad = {k: v for k, v in r["errs"].items() if not v <= TOL[r["dtype"]]}
        assert not bad, f"{r['kind']} {r['model']} P={r['P']} rank={r['rank']} {r['dtype']}: {bad}"


@pytest.mark.parametrize("model", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("dtype", ["torch.float64", "torch.float32"])
def test_hidden_states_and_every_parameter_grad_match(records, model, P, dtype):
    chosen = _select(records, kind="body", model=model, P=P, dtype=dtype)
    assert {r["rank"] for r in chosen} == set(range(P))
    assert sum(r["n_real"] for r in chosen) / (2 if P == 2 else 1) == 13  # the P=2 run happens in two groups
    for r in chosen:
        assert "hidden" in r["errs"] and "grad_model.embed_tokens.weight" in r["errs"]
        assert any(k.endswith("self_attn.k_proj.weight") for k in r["errs"])
        assert r["restored"], "the attention implementation was not switched back"
    _assert_close(chosen)


@pytest.mark.parametrize("P", [2, 4])
def test_chunked_logprob_loss_and_grads_match(records, P):
    chosen = _select(records, kind="head", P=P)
    assert {(r["model"], r["loss_kind"], r["loss_agg"]) for r in chosen} >= {
        ("qwen2", "gspo", "seq-mean-token-mean"), ("llama", "gspo", "seq-mean-token-mean"),
        ("qwen3", "gspo", "seq-mean-token-mean"), ("qwen2", "ppo", "token-mean")}
    for r in chosen:
        assert r["clipped"], "the reference loss never clipped: the case tests too little"
        assert {"loss", "logp", "logp_nograd", "grad_model.norm.weight"} <= r["errs"].keys()
        assert r["model"] == "qwen2" or "grad_lm_head.weight" in r["errs"]  # untied heads: llama, qwen3
    _assert_close(chosen)


def test_activation_checkpointing_recomputes_attention_sequence_parallel(records):
    chosen = _select(records, kind="head", checkpoint=True)
    assert {r["P"] for r in chosen} == {2, 4}
    _assert_close(chosen)


def test_unsplittable_configs_are_refused(records):
    for r in _select(records, kind="refusals"):
        assert r["sliding"] == "refused"
        assert r["heads"] == ("refused" if r["P"] == 4 else "accepted")  # 2 heads over 4 ranks


# MR-SP stage 1 (parallel/mrsp_encode.py) runs in the same process group.


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("n_frames,unit", [(7, 1), (6, 2), (2, 1)])
def test_parallel_video_encoding_matches_one_process(records, P, n_frames, unit):
    chosen = _select(records, kind="mrsp", model="tiny-vision", P=P, n_frames=n_frames, unit=unit)
    assert sum(r["n_encoded"] for r in chosen) == n_frames * (2 if P == 2 else 1)  # every frame once per group
    assert all({"embeddings", "grad_conv.weight", "grad_proj.bias"} <= r["errs"].keys() for r in chosen)
    _assert_close(chosen)


@pytest.mark.parametrize("P", [2, 4])
def test_parallel_encoding_with_the_qwen25_vl_tower_matches_one_process(records, P):
    chosen = _select(records, kind="mrsp", model="qwen2.5-vl", P=P)
    assert sum(r["n_encoded"] for r in chosen) == 10 * (2 if P == 2 else 1)  # 5 temporal patches of 2 frames
    assert sorted(r["n_encoded"] for r in chosen if r["rank"] == 0) == ([6, 6] if P == 2 else [4])
    for r in chosen:
        assert {"embeddings", "grad_patch_embed.proj.weight", "grad_merger.mlp.2.weight"} <= r["errs"].keys()
    _assert_close(chosen)


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("P", [2, 4])
def test_qwen25_vl_language_model_on_cached_video_embeddings_matches_one_process(records, P, multi):
    chosen = _select(records, kind="video_head", P=P, multi=multi)
    for r in chosen:
        assert r["T"] % P, "the case should need end padding"
        assert {"loss", "logp", "logp_nograd", "grad_video0_embeds",
                "grad_model.language_model.layers.0.self_attn.q_proj.weight"} <= r["errs"].keys()
        assert ("grad_video1_embeds" in r["errs"]) == multi
        assert r["video_grad"] > 1e-5  # the loss reaches the video: its gradient is compared, not zeros
    _assert_close(chosen)


def test_frame_slices_hand_worked():
    assert [frame_slice(7, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert [frame_slice(6, r, 4, unit=2) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(0, 0)]
    with pytest.raises(ValueError, match="units of 2"):
        frame_slice(5, 0, 2, unit=2)


def test_kv_repeats_hand_worked():
    assert kv_repeats(4, 2, 2) == 1  # kv heads split as they are
    assert kv_repeats(4, 2, 4) == 2  # 2 kv heads over 4 ranks: each twice
    assert kv_repeats(4, 1, 4) == 4  # MQA: one copy per rank
    assert kv_repeats(12, 4, 6) == 3  # gcd(4, 6) = 2 -> 12 kv heads, 2 per rank, 2 query heads each
    with pytest.raises(ValueError, match="divisible"):
        kv_repeats(6, 2, 4)


def test_shard_for_sp_pads_the_end_and_positions_are_global():
    x = torch.arange(10).view(2, 5)  # [[0..4], [5..9]]
    assert shard_for_sp(x, 0, 2, pad_value=-1).tolist() == [[0, 1, 2], [5, 6, 7]]
    assert shard_for_sp(x, 1, 2, pad_value=-1).tolist() == [[3, 4, -1], [8, 9, -1]]
    assert shard_for_sp(x, 3, 4, pad_value=-1).tolist() == [[-1, -1], [-1, -1]]  # all padding
    assert shard_positions(2, 5, 1, 2).tolist() == [[3, 4, 5], [3, 4, 5]]
    # shards concatenated in rank order give the padded tensor back
    parts = [shard_for_sp(x, r, 3, pad_value=-1) for r in range(3)]
    assert torch.equal(torch.cat(parts, 1)[:, :5], x)


def test_shard_batch_masks_padding():
    batch = make_batch([[1, 2]], [[3, 4, 5]], pad_id=0)  # T = 5, mask on positions 1..3
    shard, pos = shard_batch(batch, 1, 2)  # positions 3, 4, 5(pad)
    assert shard.input_ids.tolist() == [[4, 5, 0]] and shard.mask.tolist() == [[1.0, 0.0, 0.0]]
    assert pos.tolist() == [[3, 4, 5]]


def test_attention_outside_the_context_is_an_error():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="outside"):
        ulysses_attention(torch.nn.Module(), q, q, q, None)
