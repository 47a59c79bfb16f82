"""Sequence-parallel GLA (ZeCO All-Scan and the LASP-2 all-gather) equals single-process GLA.

One 4-process gloo run (`_worker_allscan.py`) covers P = 4 and P = 2, float64
and float32, several chunk sizes and All-Scan block counts, a length not
divisible by P, the GLAttention layer, a two-layer GLA language model and the
hybrid with a sliding-window layer; the tests below judge its records.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from longrl.parallel.allscan import k_blocks

WORKER = Path(__file__).with_name("_worker_allscan.py")
TOL = {"torch.float64": 1e-10, "torch.float32": 1e-5}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("allscan") / "records.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _select(records, **want):
    chosen = [r for r in records if all(r[k] == v for k, v in want.items())]
    assert chosen, f"no records for {want}"
    return chosen


def _assert_close(chosen):
    for r in chosen:
        tol = TOL[r["dtype"]]
        bad = {k: v for k, v in r["errs"].items() if not v <= tol}
        assert not bad, f"{r['kind']} {r['method']} P={r['P']} rank={r['rank']} {r['dtype']} " \
                        f"T={r.get('T')} chunk={r.get('chunk')} blocks={r.get('blocks')}: {bad}"


@pytest.mark.parametrize("method", ["allscan", "lasp2"])
@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("dtype", ["torch.float64", "torch.float32"])
def test_outputs_and_input_grads_match_single_process(records, method, P, dtype):
    chosen = _select(records, kind="function", method=method, P=P, dtype=dtype)
    # every rank reported outputs and q/k/v/g grads; last rank the final state; rank 0 the initial-state grad
    assert {r["rank"] for r in chosen} == set(range(P))
    assert all({"out", "grad_q", "grad_k", "grad_v", "grad_g"} <= r["errs"].keys() for r in chosen)
    assert all("final" in r["errs"] for r in chosen if r["rank"] == P - 1)
    assert all("grad_s0" in r["errs"] for r in chosen if r["rank"] == 0)
    _assert_close(chosen)


def test_length_not_divisible_by_P_is_covered(records):
    uneven = _select(records, kind="function", T=13)
    assert {r["P"] for r in uneven} == {2, 4}
    _assert_close(uneven)


@pytest.mark.parametrize("method", ["allscan", "lasp2"])
@pytest.mark.parametrize("dtype", ["torch.float64", "torch.float32"])
def test_gla_layer_parameter_grads_match(records, method, dtype):
    chosen = _select(records, kind="layer", method=method, dtype=dtype)
    assert all(any(k.startswith("grad_gate_proj") for k in r["errs"]) for r in chosen)
    _assert_close(chosen)


@pytest.mark.parametrize("method", ["allscan", "lasp2"])
def test_gla_language_model_matches(records, method):
    chosen = _select(records, kind="model", method=method)
    assert {r["P"] for r in chosen} == {2, 4}
    assert all("grad_embed.weight" in r["errs"] for r in chosen)
    _assert_close(chosen)


@pytest.mark.parametrize("window", [3, 5])
def test_hybrid_gla_language_model_matches(records, window):
    """Sliding-window layers take their window-1 earlier keys from the preceding ranks
    (window 5 at P = 4: shards of 3 tokens, so the halo spans two ranks)."""
    chosen = _select(records, kind="hybrid", window=window)
    assert {r["P"] for r in chosen} == {2, 4}
    assert all(any(k.startswith("grad_layers.1.mixer.qkv") for k in r["errs"]) for r in chosen)
    _assert_close(chosen)


def test_bytes_sent_allscan_one_state_lasp2_grows_with_P(records):
    for r in _select(records, kind="function"):
        P, rank, state, decay = r["P"], r["rank"], r["state_bytes"], r["decay_bytes"]
        if r["method"] == "allscan":  # one state forward (not the last rank), one backward (not the first)
            assert r["bytes"] == {"forward": state if rank < P - 1 else 0, "backward": state if rank > 0 else 0}
        else:  # (state, decay) to P - 1 peers forward, state gradient to P - 1 peers backward
            assert r["bytes"] == {"forward": (P - 1) * (state + decay), "backward": (P - 1) * state}
    # B=2, H=2, K=6, V=3 float64: a state is 2*2*6*3*8 bytes
    assert _select(records, kind="function", dtype="torch.float64")[0]["state_bytes"] == 576


def test_k_blocks_cover_range_without_overlap():
    assert k_blocks(6, 4) == [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 6)]
    assert k_blocks(6, 8) == [slice(i, i + 1) for i in range(6)]  # at most one block per row
    assert k_blocks(5, 1) == [slice(0, 5)]
