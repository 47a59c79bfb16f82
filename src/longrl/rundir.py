"""Run directories: one run per directory, one process at a time, nothing stale left over.

- A new run gets an empty directory: an existing non-empty one is refused unless
  `run.overwrite=true` (then what longrl wrote there is deleted; anything else is still
  refused, so a mistyped run.name never deletes a user's files). An unnamed run picks a
  fresh timestamped name.
- The run holds an exclusive `flock` on `<run>/.lock` for the life of the process, so a
  second `longrl train` on the same directory stops with one line instead of interleaving
  metrics.jsonl with the first. The lock file stays; the lock goes with the process.
- At start, temp files and `.step_<N>.tmp*` directories left by a kill mid-write are removed
  (under the lock, so never another live run's), and a checkpoint caught between the two
  renames of a replace is put back.
- `resume=` continues the run's own config. Overrides of the keys in `SAFE_ON_RESUME` are
  applied (and written to config.yaml); any other key that differs is refused by name. The
  run's config.yaml is checked against the copy the checkpoint's manifest keeps: unsafe
  edits are refused by name, and an empty or unreadable config.yaml falls back to that copy.

Departure: "which keys did the user give" is read as "which keys differ from the default";
a key set explicitly to its default value on a run saved with another value is not seen,
unless the caller passes `given` (the keys named on the command line or in --config).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import time
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from longrl.checkpoint import checkpoint_config, latest_checkpoint
from longrl.config import Config, config_from_dict, config_to_yaml
from longrl.errors import UserError
from longrl.utils import atomic_write_text

LOCK_FILE = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "checkpoints",
             "tensorboard", "wandb", "mlruns")
"""What a run writes into its directory (the trackers' folders included): the only entries
run.overwrite=true deletes."""
SAFE_ON_RESUME = ("rl.steps", "rl.stop_when_flat", "rl.eval_every", "run.save_every", "run.keep_checkpoints",
                  "run.progress", "run.log_every", "run.report_to")
"""Keys a resumed run may change: how long it runs and how often it evaluates, saves and
reports. Everything else would make the resumed run a different run from the one saved."""
_IGNORED_ON_RESUME = ("resume", "run.overwrite")
_TEMP = re.compile(r"^\.(config\.yaml|metrics\.jsonl|summary\.json|curves\.png|step_\d+)\..*(tmp|old)")
"""Leftovers of atomic_write_text, atomic_dir and plot_curves (and nothing a user named)."""
_HELD: dict[str, int] = {}  # resolved run dir -> fd of its lock file, held by this process


# ----------------------------------------------------------------------------------------
# A new run
# ----------------------------------------------------------------------------------------


def prepare_run_dir(cfg: Config) -> Path:
    """Create and lock the run directory of a new run; refuse one that holds another run."""
    run_dir = Path(cfg.run.out_dir) / (cfg.run.name or _fresh_name(Path(cfg.run.out_dir)))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir)
        remove_stale_temps(run_dir)
        _refuse_non_empty(run_dir, cfg.run.overwrite)
        for name in RUN_FILES if cfg.run.overwrite else ():
            _remove(run_dir / name)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"cannot write to run directory '{run_dir}' ({e.strerror}); "
                        f"set run.out_dir to a writable directory") from None
    return run_dir


def _fresh_name(out_dir: Path) -> str:
    """A timestamp, with -2, -3, ... when a run of that second exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = stamp, 1
    while (out_dir / name).exists() and any((out_dir / name).iterdir()):
        n += 1
        name = f"{stamp}-{n}"
    return name


def _refuse_non_empty(run_dir: Path, overwrite: bool) -> None:
    """Checked before anything is deleted: with overwrite, only a directory holding nothing
    but a run's own files may be cleared."""
    left = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE and not (overwrite and p.name in RUN_FILES))
    if not left:
        return
    shown = ", ".join(left[:4]) + (", ..." if len(left) > 4 else "")
    if overwrite:
        raise UserError(f"run directory '{run_dir}' holds files longrl did not write ({shown}); run.overwrite=true "
                        f"only replaces a run: pick another run.name or run.out_dir")
    raise UserError(f"run directory '{run_dir}' already holds a run ({shown}); continue it with resume={run_dir}, "
                    f"pick another run.name, or replace it with run.overwrite=true")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------------------
# The lock, and what a killed run leaves behind
# ----------------------------------------------------------------------------------------


def lock_run_dir(run_dir: Path) -> None:
    """Take the run's exclusive lock for the life of this process (or `release_run_dir`).
    Already held by this process: nothing to do. Held by another: UserError."""
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return
    fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"run directory '{run_dir}' is in use by another longrl process (pid {holder}); wait for "
                        f"it to finish, or pick another run.name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def release_run_dir(run_dir: Path) -> None:
    """Let another process use the directory (the lock also goes when this process exits)."""
    fd = _HELD.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def remove_stale_temps(run_dir: Path) -> None:
    """Remove temp files and directories a killed run left; call with the lock held.
    A `.step_<N>.old` whose `step_<N>` is missing is the checkpoint itself, caught between
    the two renames that replace it: it is put back instead."""
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = re.fullmatch(r"\.(step_\d+)\.old", p.name)
            if m and not (folder / m.group(1)).exists():
                os.replace(p, folder / m.group(1))
            elif _TEMP.match(p.name) or p.name == ".write-test":
                _remove(p)


# ----------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------


def resume_config(resume: str, overrides: Config, given: set[str] | None = None) -> tuple[Config, Path, Path]:
    """(config, run dir, checkpoint) to continue `resume` from: the run's saved config with
    the safe overrides applied. Every rank calls it; only the main one locks and writes."""
    run_dir = Path(resume)
    if not run_dir.is_dir() or not ((run_dir / "config.yaml").exists() or (run_dir / "checkpoints").is_dir()):
        raise UserError(f"resume='{resume}' is not a run directory (no config.yaml, no checkpoints/); give runs/<name>")
    main = os.environ.get("RANK", "0") == "0"  # before the process group exists
    if main:
        lock_run_dir(run_dir)
        remove_stale_temps(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"resume='{resume}' has no complete checkpoint under checkpoints/; start a new run instead")
    cfg, rewrite = _saved_config(run_dir, ckpt)
    cfg, changed = apply_resume_overrides(cfg, overrides, int(ckpt.name.split("_")[1]), given)
    if main and (rewrite or changed):
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    return cfg, run_dir, ckpt


def _saved_config(run_dir: Path, ckpt: Path) -> tuple[Config, bool]:
    """The run's config.yaml, checked against the copy in `ckpt`'s manifest; that copy when
    config.yaml is empty or unreadable. Second value: config.yaml must be written again."""
    path = run_dir / "config.yaml"
    kept_text = checkpoint_config(ckpt)
    kept = _parse_config(kept_text, f"the copy of config.yaml in {ckpt}") if kept_text else None
    current, problem = _read_config(path)
    if current is None:
        if kept is None:
            raise UserError(f"{path} {problem} and checkpoint {ckpt.name} keeps no copy; restore config.yaml")
        print(f"longrl: warning: {path} {problem}; using the copy kept with checkpoint {ckpt.name}", file=sys.stderr)
        return kept, True
    if kept is not None:
        edited = {k: v for k, v in _differences(kept, current).items() if k not in SAFE_ON_RESUME}
        if edited:
            raise UserError(f"{path} was edited since checkpoint {ckpt.name}: {_describe(edited)}; a resumed run "
                            f"keeps these: restore them, or start a new run")
    return current, False


def _read_config(path: Path) -> tuple[Config | None, str]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None, "is missing"
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return None, f"is unreadable ({str(e).splitlines()[0]})"
    if not isinstance(data, dict) or not data:
        return None, "is empty" if not data else f"holds a {type(data).__name__}, not a mapping of keys"
    return config_from_dict(data), ""


def _parse_config(text: str, where: str) -> Config:
    import yaml

    try:
        return config_from_dict(yaml.safe_load(text))
    except (yaml.YAMLError, AttributeError, TypeError) as e:
        raise UserError(f"{where} is not a config ({e}); start a new run") from None


def apply_resume_overrides(saved: Config, overrides: Config, step: int,
                           given: set[str] | None = None) -> tuple[Config, bool]:
    """`saved` with the overrides of `SAFE_ON_RESUME` keys applied; UserError naming every
    other key the overrides would change. Second value: a saved key changed (run.progress,
    which only follows the invocation, does not count)."""
    asked = _leaves(overrides)
    defaults = _leaves(Config())
    have = _leaves(saved)
    explicit = {k for k, v in asked.items() if v != defaults[k]} | (given or set())
    changes = {k: (have[k], asked[k]) for k in sorted(explicit)
               if k in have and k not in _IGNORED_ON_RESUME and asked[k] != have[k]}
    refused = {k: v for k, v in changes.items() if k not in SAFE_ON_RESUME}
    if refused:
        raise UserError(f"resume= continues the saved run; these cannot change on resume: {_describe(refused)} "
                        f"(may change: {', '.join(SAFE_ON_RESUME)}): drop them, or start a new run")
    if "rl.steps" in changes and changes["rl.steps"][1] <= step:
        raise UserError(f"rl.steps={changes['rl.steps'][1]} does not go past the checkpoint's RL step {step}; "
                        f"give rl.steps above {step} to extend the run")
    for key, (_, new) in changes.items():
        _set(saved, key, new)
    _set(saved, "run.progress", overrides.run.progress)  # follows the invocation, as before
    return saved, any(k != "run.progress" for k in changes)


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out.update(_leaves(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def _differences(a: Config, b: Config) -> dict[str, tuple]:
    la, lb = _leaves(a), _leaves(b)
    return {k: (la[k], lb[k]) for k in la if k not in _IGNORED_ON_RESUME and la[k] != lb.get(k)}


def _describe(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changes.items())


def _set(cfg: Config, key: str, value: Any) -> None:
    *path, last = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, value)
