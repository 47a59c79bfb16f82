"""Checkpoints: Hugging Face weights + tokenizer, and the trainer state for exact resume.

`checkpoints/step_<N>/` holds `model.safetensors`, `config.json`, the tokenizer files
(plain `transformers` loads the directory as it is), `trainer_state.pt` (optimizer,
scheduler, RNG states, data position, step, phase results) and, written last,
`manifest.json`: the size and sha256 of every other file, and the run's config.yaml as it
was at this step. Everything is written into a temp directory that is renamed into place,
so a crash never leaves a half checkpoint, and a checkpoint whose files no longer match
its manifest (cut short, truncated, edited) is skipped on resume for the newest one that
does, with a note on stderr.

Under FSDP2 (`parallel.fsdp`) a checkpoint also holds `dcp/`: the sharded weights and
AdamW moments written by every rank with torch.distributed.checkpoint (DCP), which
reshards on load, so a run resumes on another number of processes with the same weights
and optimizer state; the optimizer's param groups (plain numbers) go into the trainer state
instead, and the main rank still writes the Hugging Face weights from the full weights
every rank holds during a step (`parallel/fsdp.py`), so every checkpoint loads in plain
`transformers` and `export_checkpoint` only copies. DCP's own reader unpickles `.metadata`
and loads "bytes" entries with full pickle; `safe_dcp_reader` unpickles only the classes of
a tensor checkpoint and refuses "bytes" entries, so a crafted `dcp/` cannot run code.

The trainer state loads with `torch.load(weights_only=True)`: tensors and plain containers
only, so a crafted `trainer_state.pt` cannot run code on resume. What is not plain is
converted on save and back on load:
- numpy arrays (numpy's RNG state) and scalars become a tagged dict holding their bytes,
  dtype and shape;
- APRIL's parked groups and samples are dataclasses named in `ALLOWED_CLASSES`, which torch's
  own allowlist (`torch.serialization.safe_globals`) rebuilds field by field.
Anything else is refused when saving (a TypeError naming where it sits: a bug to fix, not
a file to write), and a file the safe loader refuses (an older longrl's pickle, or a crafted
one) is a UserError naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import torch

from longrl.errors import UserError
from longrl.models.load import save_policy
from longrl.utils import atomic_dir, replace_dir, rng_state

STATE_FILE = "trainer_state.pt"
DCP_DIR = "dcp"
"""The sharded weights and optimizer moments of an FSDP2 run (torch.distributed.checkpoint)."""
MANIFEST_FILE = "manifest.json"
STATE_FORMAT = "longrl.trainer_state/1"
"""Stored under the key `format` of every trainer state this version writes."""
ALLOWED_CLASSES = ("longrl.rollout.april.Sample", "longrl.rollout.april._Group")
"""The only classes a trainer state may hold (APRIL's parked groups, with their samples)."""
_NDARRAY = "__longrl_ndarray__"
_SCALARS = (type(None), bool, int, float, str, bytes)
_VERIFIED: set[tuple] = set()  # `_manifest_key`s of checkpoints this process wrote or verified


# ----------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict, keep: int) -> Path:
    """Write `checkpoints/step_<step>/` and prune old ones. Refuses (UserError) non-finite
    weights and a full disk; either way the checkpoints already there are left as they were."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    final = ckpt_dir / f"step_{step}"
    _refuse_nonfinite_weights(model, step, ckpt_dir)
    state = encode_state({"format": STATE_FORMAT, **trainer_state, "rng": rng_state()})
    config = Path(run_dir) / "config.yaml"
    try:
        with atomic_dir(final) as tmp:
            save_policy(model, tokenizer, tmp)
            _write_file(tmp / STATE_FILE, lambda f: torch.save(state, f))
            _check_safetensors(tmp)
            write_manifest(tmp, step, config.read_text() if config.is_file() else None)
    except OSError as e:
        raise _write_error(e, final, ckpt_dir) from None
    _VERIFIED.add(_manifest_key(final))
    _prune(ckpt_dir, keep)
    return final


def save_sharded_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict | None, optimizer,
                            keep: int) -> Path:
    """`save_checkpoint` for an FSDP2 model: collective (every rank calls it; `trainer_state`
    is only read on the main rank). Every rank writes its shards of the weights and of the
    optimizer's moments into `dcp/` of the same temp directory, the main rank adds the
    Hugging Face weights, the trainer state (with the optimizer's param groups) and the
    manifest, and renames it into place; the full weights are gathered again at the end."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from longrl.models import lora
    from longrl.parallel import dist, fsdp

    ckpt_dir = Path(run_dir) / "checkpoints"
    final = ckpt_dir / f"step_{step}"
    _refuse_nonfinite_weights(model, step, ckpt_dir)  # every rank holds the same full weights: all refuse
    main = dist.is_main()
    tmp = None
    try:
        if main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=ckpt_dir, prefix=f".{final.name}.tmp"))
            # before state_dict reshards; a LoRA model saves through models.lora (merged weights
            # and the adapter, read without state_dict()'s resharding hooks)
            save_policy(model if lora.has_lora(model) else fsdp.replica(model, clone=False), tokenizer, tmp)
        tmp = Path(dist.broadcast_object(str(tmp) if main else None))
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state["state"]}, checkpoint_id=str(tmp / DCP_DIR))
        dist.barrier()
        if main:
            state = encode_state({"format": STATE_FORMAT, **trainer_state, "optimizer": None,
                                  "optimizer_param_groups": optim_state["param_groups"], "rng": rng_state()})
            _write_file(tmp / STATE_FILE, lambda f: torch.save(state, f))
            _check_safetensors(tmp)
            config = Path(run_dir) / "config.yaml"
            write_manifest(tmp, step, config.read_text() if config.is_file() else None)
            _replace_dir(tmp, final)
    except OSError as e:
        if tmp is not None and main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, final, ckpt_dir) from None
    except BaseException:
        if tmp is not None and main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    fsdp.gather(model)
    if main:
        _VERIFIED.add(_manifest_key(final))
        _prune(ckpt_dir, keep)
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename a complete temp directory to `final`, replacing an older one (as `atomic_dir`)."""
    replace_dir(tmp, final)


# DCP's reader unpickles `.metadata` with plain pickle, and loads any entry the metadata
# calls "bytes" with torch.load(weights_only=False): a crafted `dcp/` in a run directory
# would run code on `resume=`. This reader unpickles only the classes DCP writes for tensor
# checkpoints, and refuses "bytes" entries (longrl never writes any).
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
}


def safe_dcp_reader(path: Path):
    """A `FileSystemReader` for `path` whose metadata can hold only tensor-checkpoint data."""
    import io
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if name in _DCP_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                       torch.dtype)):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name}")

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            file = Path(path) / ".metadata"
            try:
                metadata = _Unpickler(io.BytesIO(file.read_bytes())).load()
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
                raise UserError(f"{file}: not a sharded checkpoint longrl wrote ({type(e).__name__}: {e}); "
                                "resume from a checkpoint of your own run") from None
            entries = getattr(metadata, "state_dict_metadata", None)
            if not isinstance(entries, dict) or any(isinstance(v, BytesStorageMetadata) for v in entries.values()):
                raise UserError(f"{file}: holds entries other than tensors, which longrl never writes; "
                                "resume from a checkpoint of your own run")
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def load_sharded_state(ckpt: Path, model, optimizer, param_groups: list) -> None:
    """The weights and optimizer moments of `ckpt/dcp` into `model` (FSDP2 or plain) and its
    optimizer, resharded to this run's number of processes (collective under torchrun)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from longrl.parallel import fsdp

    model_state, optim_state = get_state_dict(model, optimizer)  # templates: this run's shards
    state = {"model": model_state, "optim": optim_state["state"]}
    path = Path(ckpt) / DCP_DIR
    dcp.load(state, checkpoint_id=str(path), storage_reader=safe_dcp_reader(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": param_groups})
    if fsdp.is_sharded(model):
        fsdp.gather(model)


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    """A plain Hugging Face directory at `out` (weights, config, tokenizer) from a verified
    checkpoint: the files transformers reads, without the trainer state, DCP shards or
    manifest. Written atomically."""
    problem = verify_checkpoint(ckpt)
    if problem is not None:
        raise UserError(f"checkpoint {ckpt} is not usable ({problem}); export another step")
    skip = {STATE_FILE, MANIFEST_FILE, DCP_DIR}
    with atomic_dir(out) as tmp:
        for path in sorted(Path(ckpt).iterdir()):
            if path.name not in skip and path.is_file():
                shutil.copy2(path, tmp / path.name)
    return Path(out)


def _write_file(path: Path, write) -> None:
    """`write(f)` into a file object, flushed to disk. A file object rather than a path, so
    that a full disk surfaces as OSError(ENOSPC) (torch.save on a path reports a C++ assert)."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_error(e: OSError, final: Path, ckpt_dir: Path) -> UserError:
    previous = list_steps(ckpt_dir)  # an existing step_<N> of this number is replaced only on success
    kept = f"checkpoint step_{max(previous)} is intact" if previous else "no earlier checkpoint exists"
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    what, fix = ("the disk is full", "free space") if full else (e.strerror or str(e), "fix that")
    return UserError(f"could not write checkpoint {final}: {what}; nothing of it was kept and {kept}: "
                     f"{fix} under {ckpt_dir.parent}, then continue with resume={ckpt_dir.parent}")


def _refuse_nonfinite_weights(model, step: int, ckpt_dir: Path) -> None:
    tensors = [*model.named_parameters(), *model.named_buffers()]  # tied weights counted once
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in tensors
           if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    if bad:
        previous = list_steps(ckpt_dir)
        kept = f"; checkpoint step_{max(previous)} is kept" if previous else ""
        raise UserError(f"step {step}: {sum(bad.values())} weights are NaN or inf (first in {next(iter(bad))}); "
                        f"the checkpoint was not written{kept}. Likely cause: a learning rate too high "
                        f"(sft.lr / rl.lr) or a NaN reward weight: lower it and start again")


def _check_safetensors(folder: Path) -> None:
    """safetensors writes through a buffer whose errors are dropped on close: read each
    header back, so a file cut short by a full disk fails here instead of on resume."""
    from safetensors import SafetensorError, safe_open

    for path in folder.glob("*.safetensors"):
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except SafetensorError as e:  # not an OSError: say what it means
            raise OSError(errno.EIO, f"{path.name} did not read back ({str(e).splitlines()[0]})") from None


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep step_0 (the post-SFT policy, also the KL reference) and the newest `keep`."""
    steps = sorted(list_steps(ckpt_dir))
    for s in steps[:-keep] if keep > 0 else []:
        if s != 0:
            shutil.rmtree(ckpt_dir / f"step_{s}", ignore_errors=True)


# ----------------------------------------------------------------------------------------
# Manifest: what a complete checkpoint holds
# ----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """Hashes of several files at once: hashlib releases the GIL on large blocks, and a big
    checkpoint is a few large files (weight shards, optimizer state), so threads help."""
    if len(paths) < 2:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(folder: Path, step: int, config_text: str | None) -> None:
    """Sizes and sha256 of every file under `folder`; written last, so its presence says the
    rest is complete."""
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": h}
             for p, h in zip(paths, _sha256_all(paths))}
    manifest = {"format": "longrl.checkpoint/1", "step": step, "files": files, "config_yaml": config_text}
    _write_file(folder / MANIFEST_FILE, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))


def read_manifest(ckpt: Path) -> dict:
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise TypeError("not a longrl manifest")
    return manifest


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong (one phrase)."""
    try:
        manifest = read_manifest(ckpt)
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (cut short while saving, or written by an older longrl)"
    except (OSError, ValueError, TypeError) as e:
        return f"unreadable {MANIFEST_FILE} ({e})"
    if _manifest_key(ckpt) in _VERIFIED:
        return None
    try:
        problem = _compare(ckpt, manifest["files"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a manifest edited by hand
        return f"unreadable {MANIFEST_FILE} ({type(e).__name__}: {e})"
    if problem is None:
        _VERIFIED.add(_manifest_key(ckpt))
    return problem


def _compare(ckpt: Path, files: dict) -> str | None:
    if STATE_FILE not in files:
        return f"{MANIFEST_FILE} does not list {STATE_FILE}"
    for name, want in files.items():  # the cheap checks first
        path = ckpt / name
        if name.startswith("/") or ".." in Path(name).parts:
            return f"{MANIFEST_FILE} names a file outside the checkpoint ({name!r})"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} holds {path.stat().st_size} bytes, the manifest says {want['bytes']}"
    names = list(files)
    for name, digest in zip(names, _sha256_all([ckpt / n for n in names])):
        if digest != files[name]["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def _manifest_key(ckpt: Path) -> tuple:
    """What must stay the same for an earlier verification to still hold: every file's
    identity, size and modification time (a truncation or an edit changes one of them)."""
    stats = [(p.relative_to(ckpt).as_posix(), st.st_ino, st.st_size, st.st_mtime_ns)
             for p in sorted(ckpt.rglob("*")) if p.is_file() and (st := p.stat())]
    return (str(ckpt.resolve()), tuple(stats))


def checkpoint_config(ckpt: Path) -> str | None:
    """The run's config.yaml as it was when `ckpt` was written (None if not recorded)."""
    return read_manifest(ckpt).get("config_yaml")


def list_steps(ckpt_dir: Path) -> list[int]:
    """Steps with a complete checkpoint (a manifest; not yet verified against it)."""
    if not ckpt_dir.is_dir():
        return []
    return [int(m.group(1)) for p in ckpt_dir.iterdir()
            if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / MANIFEST_FILE).is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest. Newer ones that do not are
    passed over, each named on stderr with what is wrong."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    dirs = sorted((int(m.group(1)), p) for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else [])
                  if (m := re.fullmatch(r"step_(\d+)", p.name)) and p.is_dir())
    skipped = []
    for _step, path in reversed(dirs):
        problem = verify_checkpoint(path)
        if problem is None:
            for name, why in skipped:
                print(f"longrl: warning: skipping checkpoint {name}: {why}; using {path.name}", file=sys.stderr)
            return path
        skipped.append((path.name, problem))
    for name, why in skipped:
        print(f"longrl: warning: checkpoint {name} is not usable: {why}", file=sys.stderr)
    return None


# ----------------------------------------------------------------------------------------
# Trainer state: plain data both ways
# ----------------------------------------------------------------------------------------


def encode_state(obj, where: str = "state", inside: bool = False):
    """`obj` with numpy arrays turned into tagged dicts; TypeError for anything that the
    safe loader could not read back. `inside`: within an allowed dataclass, which is
    stored as it is, so its fields must already be plain."""
    if isinstance(obj, torch.Tensor) or type(obj) in _SCALARS:
        return obj
    if isinstance(obj, np.generic) and not inside:  # a numpy scalar: a 0-d array, marked to come back as one
        return {**encode_state(np.asarray(obj), where), "scalar": True}
    if isinstance(obj, np.ndarray) and not inside:
        if obj.dtype.hasobject:
            raise TypeError(f"{where}: numpy arrays of Python objects cannot be stored safely")
        data = torch.from_numpy(np.frombuffer(obj.tobytes(), dtype=np.uint8).copy())  # [bytes]
        return {_NDARRAY: data, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if type(obj) in (list, tuple):
        return type(obj)(encode_state(v, f"{where}[{i}]", inside) for i, v in enumerate(obj))
    if type(obj) in (dict, OrderedDict):
        for k in obj:
            if type(k) not in _SCALARS or k == _NDARRAY:
                raise TypeError(f"{where}: key {k!r} cannot be stored safely")
        return type(obj)((k, encode_state(v, f"{where}[{k!r}]", inside)) for k, v in obj.items())
    if is_dataclass(obj) and not isinstance(obj, type) and _qualname(type(obj)) in ALLOWED_CLASSES:
        for f in fields(obj):
            encode_state(getattr(obj, f.name), f"{where}.{f.name}", inside=True)
        return obj
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in the trainer "
                    f"state (tensors, numbers, strings, lists, tuples, dicts, and {', '.join(ALLOWED_CLASSES)} only)")


def decode_state(obj):
    """Inverse of `encode_state`."""
    if type(obj) in (dict, OrderedDict):
        if _NDARRAY in obj:
            data = obj[_NDARRAY].numpy().tobytes()
            array = np.frombuffer(data, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
            return array[()] if obj.get("scalar") else array
        return type(obj)((k, decode_state(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(decode_state(v) for v in obj)
    return obj


def load_trainer_state(ckpt: Path) -> dict:
    """The trainer state saved in `ckpt`, loaded without running any code from the file."""
    path = Path(ckpt) / STATE_FILE
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            saved = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; resume from another checkpoint or start a new run") from None
    except Exception as e:  # noqa: BLE001  untrusted bytes: UnpicklingError, bad zip, cut short, ... all mean "refuse"
        raise UserError(f"{path} is not a trainer state this version of longrl loads safely "
                        f"({str(e).splitlines()[0][:120]}); it may be from an older longrl, damaged or crafted: "
                        f"start a new run, or resume from a checkpoint this version wrote") from None
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not a {STATE_FORMAT} file; start a new run, or resume from a checkpoint "
                        f"this version of longrl wrote")
    saved = decode_state(saved)
    del saved["format"]
    return saved


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _allowed_classes() -> list[type]:
    """Resolved here, not at import, so checkpoint.py does not pull in the rollout package."""
    out = []
    for name in ALLOWED_CLASSES:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out
