"""Checkpoints: a trainer state that loads with weights_only=True and comes back exactly,
a manifest that catches damaged checkpoints, a full disk, non-finite weights, file modes."""

import errno
import os
import random
import stat

import numpy as np
import pytest
import torch

from longrl import checkpoint as ck
from longrl.errors import UserError
from longrl.models.tiny import build_tiny_tokenizer
from longrl.rollout.april import Sample, _Group
from longrl.utils import atomic_write_text, rng_state, set_rng_state


@pytest.fixture
def policy(tiny_qwen):
    return tiny_qwen(vocab=len(build_tiny_tokenizer())), build_tiny_tokenizer()


def _state(step=2):
    """Every kind of value the training loop puts in a checkpoint."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    group = _Group("p7", 11, [Sample("p7", 11, 0, [1, 2], [3, 4], [-0.5, -1.25], [1, 2], None, 2),
                              Sample(("t", 3), 11, 1, [1, 2], [], [], [], "stop", 1)])
    return {
        "step": step,
        "optimizer": opt.state_dict(),
        "scheduler": {"last_epoch": 3, "_last_lr": [1e-3], "lr_lambdas": [None]},
        "results": {"accuracy_after_sft": 0.25, "sft_seconds": 1.5, "note": "x", "np": np.float64(0.125)},
        "ranks": [{"sampler": torch.Generator().manual_seed(5).get_state(),
                   "cursor": {"epoch": 1, "index": 7},
                   "april": {"buffer": [group], "next_group_id": 12},
                   "rng": rng_state()}],
        "shapes": (1, (2, 3), [np.arange(6, dtype=np.int16).reshape(2, 3)]),
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_trainer_state_round_trips_exactly_through_a_weights_only_load(tmp_path, policy):
    state = _state()
    ckpt = ck.save_checkpoint(tmp_path, 2, *policy, state, keep=2)
    loaded = ck.load_trainer_state(ckpt)
    rng = loaded.pop("rng")
    assert _same(loaded, state)
    assert type(loaded["ranks"][0]["april"]["buffer"][0].samples[1]) is Sample
    # The RNG states come back usable: the same draws as right after the capture.
    set_rng_state(rng)
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(rng)
    assert draws == (random.random(), float(np.random.rand()), float(torch.rand(1)))
    # And the file itself is plain data: torch's restricted loader reads it with only the
    # two APRIL classes allowed.
    with torch.serialization.safe_globals([Sample, _Group]):
        torch.load(ckpt / ck.STATE_FILE, weights_only=True)


def test_values_the_safe_loader_cannot_read_are_refused_when_saving():
    with pytest.raises(TypeError, match=r"state\['x'\]\[1\]: a builtins.object"):
        ck.encode_state({"x": [1, object()]})
    with pytest.raises(TypeError, match="Python objects"):
        ck.encode_state({"x": np.array([None])})


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_crafted_trainer_state_does_not_run_on_load(tmp_path):
    ckpt, marker = tmp_path / "step_1", tmp_path / "pwned"
    ckpt.mkdir()
    torch.save({"format": ck.STATE_FORMAT, "step": 1, "x": _Payload(marker)}, ckpt / ck.STATE_FILE)
    with pytest.raises(UserError, match=r"trainer_state.pt is not a trainer state .* start a new run") as e:
        ck.load_trainer_state(ckpt)
    assert str(ckpt / ck.STATE_FILE) in str(e.value)
    assert not marker.exists()
    torch.load(ckpt / ck.STATE_FILE, weights_only=False)  # the payload is real: the unsafe loader runs it
    assert marker.read_text() == "ran"


def test_old_format_and_foreign_files_are_refused_by_name(tmp_path):
    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    torch.save({"step": 1, "rng": {"numpy": np.random.get_state()}}, ckpt / ck.STATE_FILE)  # older longrl
    with pytest.raises(UserError, match="older longrl"):
        ck.load_trainer_state(ckpt)
    torch.save({"step": 1}, ckpt / ck.STATE_FILE)  # loads safely, but is not ours
    with pytest.raises(UserError, match="is not a longrl.trainer_state/1 file"):
        ck.load_trainer_state(ckpt)
    (ckpt / ck.STATE_FILE).write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(UserError, match="damaged"):
        ck.load_trainer_state(ckpt)


def test_latest_checkpoint_falls_back_to_the_newest_one_that_verifies(tmp_path, policy, capsys):
    for step in (0, 2, 4):
        ck.save_checkpoint(tmp_path, step, *policy, _state(step), keep=5)
    ckpts = tmp_path / "checkpoints"
    assert ck.latest_checkpoint(tmp_path) == ckpts / "step_4"
    weights = ckpts / "step_4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    assert ck.latest_checkpoint(tmp_path) == ckpts / "step_2"
    err = capsys.readouterr().err
    assert "skipping checkpoint step_4: model.safetensors holds" in err and "using step_2" in err
    state = ckpts / "step_2" / ck.STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit, same size
    state.write_bytes(bytes(data))
    assert ck.latest_checkpoint(tmp_path) == ckpts / "step_0"
    assert "trainer_state.pt does not match its sha256" in capsys.readouterr().err
    (ckpts / "step_0" / ck.MANIFEST_FILE).unlink()  # cut short before the manifest was written
    assert ck.latest_checkpoint(tmp_path) is None
    assert "step_0 is not usable: no manifest.json" in capsys.readouterr().err
    assert sorted(ck.list_steps(ckpts)) == [2, 4]  # complete (a manifest), whether or not they verify


def test_the_manifest_records_every_file_and_the_run_config(tmp_path, policy):
    atomic_write_text(tmp_path / "config.yaml", "rl:\n  steps: 4\n")
    ckpt = ck.save_checkpoint(tmp_path, 0, *policy, _state(0), keep=2)
    manifest = ck.read_manifest(ckpt)
    on_disk = {p.name for p in ckpt.iterdir()} - {ck.MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk and {"model.safetensors", ck.STATE_FILE, "config.json"} <= on_disk
    assert all(manifest["files"][n]["bytes"] == (ckpt / n).stat().st_size for n in on_disk)
    assert ck.checkpoint_config(ckpt) == "rl:\n  steps: 4\n"


def test_a_hand_edited_manifest_is_reported_not_followed(tmp_path, policy):
    import json

    ckpt = ck.save_checkpoint(tmp_path, 0, *policy, _state(0), keep=2)
    manifest = json.loads((ckpt / ck.MANIFEST_FILE).read_text())
    for files, problem in [({**manifest["files"], "../../outside": {"bytes": 1, "sha256": "0"}}, "outside the checkpoint"),
                           ({"model.safetensors": manifest["files"]["model.safetensors"]}, "does not list trainer_state"),
                           ({ck.STATE_FILE: "x"}, "unreadable manifest.json (TypeError")]:
        (ckpt / ck.MANIFEST_FILE).write_text(json.dumps({**manifest, "files": files}))
        assert problem in ck.verify_checkpoint(ckpt)


def _full_disk_after(nbytes):
    def save_policy(model, tokenizer, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save_policy


def test_a_full_disk_gives_one_message_and_keeps_the_previous_checkpoint(tmp_path, policy, monkeypatch):
    ck.save_checkpoint(tmp_path, 2, *policy, _state(2), keep=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_2").iterdir()}
    monkeypatch.setattr(ck, "save_policy", _full_disk_after(1000))
    with pytest.raises(UserError) as e:
        ck.save_checkpoint(tmp_path, 4, *policy, _state(4), keep=2)
    msg = str(e.value)
    assert "\n" not in msg and "step_4" in msg and "the disk is full" in msg and "step_2 is intact" in msg
    assert f"resume={tmp_path}" in msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]  # no temp dir left
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_2").iterdir()} == before
    # Re-saving an existing step that fails leaves the old one as it was, too.
    with pytest.raises(UserError, match="the disk is full"):
        ck.save_checkpoint(tmp_path, 2, *policy, _state(2), keep=2)
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_2"


def test_weights_cut_short_without_an_error_are_caught_before_the_rename(tmp_path, policy, monkeypatch):
    # safetensors drops write errors on close: a full disk can leave a short file and no error.
    from longrl.models.load import save_policy as real_save

    def short_save(model, tokenizer, out_dir):
        real_save(model, tokenizer, out_dir)
        path = out_dir / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    monkeypatch.setattr(ck, "save_policy", short_save)
    with pytest.raises(UserError, match="model.safetensors did not read back"):
        ck.save_checkpoint(tmp_path, 1, *policy, _state(1), keep=2)
    assert not (tmp_path / "checkpoints" / "step_1").exists()


def test_non_finite_weights_are_never_written(tmp_path, policy):
    model, tok = policy
    ck.save_checkpoint(tmp_path, 1, model, tok, _state(1), keep=2)
    with torch.no_grad():
        next(model.parameters())[0, :3] = torch.tensor([float("nan"), float("inf"), 1.0])
    with pytest.raises(UserError, match=r"step 3: 2 weights are NaN or inf .* step_1 is kept\. Likely cause: "
                                        r"a learning rate too high"):
        ck.save_checkpoint(tmp_path, 3, model, tok, _state(3), keep=2)
    assert ck.list_steps(tmp_path / "checkpoints") == [1]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_honour_the_umask(tmp_path, policy, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        ckpt = ck.save_checkpoint(tmp_path, 0, *policy, _state(0), keep=2)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "config.yaml") == 0o666 & ~mask
    assert mode(ckpt) == 0o777 & ~mask
    assert {mode(p) for p in ckpt.iterdir()} == {0o666 & ~mask}  # model.safetensors was written 0600


def test_a_crafted_dcp_metadata_does_not_run_on_resume(tmp_path):
    """DCP unpickles `.metadata` and torch.load(weights_only=False)s 'bytes' entries; longrl's
    reader allows only the classes of a tensor checkpoint and refuses 'bytes' entries."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from longrl.checkpoint import safe_dcp_reader
    from longrl.errors import UserError

    good = tmp_path / "good"
    m = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save({"model": m.state_dict()}, checkpoint_id=str(good))
        back = {"model": {k: torch.zeros_like(v) for k, v in m.state_dict().items()}}
        dcp.load(back, checkpoint_id=str(good), storage_reader=safe_dcp_reader(good))  # a real one loads
    assert all(torch.equal(back["model"][k], v) for k, v in m.state_dict().items())

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="not a sharded checkpoint longrl wrote"):
        safe_dcp_reader(evil).read_metadata()
    assert not marker.exists()

    meta = safe_dcp_reader(good).read_metadata()  # valid classes, but an entry routed to torch.load(weights_only=False)
    meta.state_dict_metadata["model.weight"] = BytesStorageMetadata()
    meta.storage_meta = None
    (evil / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UserError, match="not a sharded checkpoint longrl wrote|entries other than tensors"):
        safe_dcp_reader(evil).read_metadata()
