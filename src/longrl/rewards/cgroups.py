"""Per-sandbox cgroups: a cap on how many processes (a fork bomb) and how much memory (all of
its processes and its tmpfs together) one sandboxed program may use, where this process may
create cgroups (root, or a delegated subtree; cgroup v1 `pids`/`memory` or v2).

Best effort: where no cgroup can be made the sandbox runs without them and `usable()` says
so. The program is put in them by a `sh` that writes its own pid into each `cgroup.procs` and
then execs the sandbox, so everything it starts is inside from the first instruction. Only
the bwrap tier hides /sys from the program; in the weaker tiers a program running with the
trainer's rights could move itself out, so only bwrap claims these limits.
"""

from __future__ import annotations

import functools
import os
import time
import uuid

_PREFIX = "longrl-sandbox-"
_STALE_S = 3600.0  # an empty group this old was left by a killed trainer


def _candidates() -> list[str]:
    """This process's cgroup directories, one per hierarchy that might hold pids or memory."""
    dirs = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            dirs.append("/sys/fs/cgroup" + path)
        for name in ("pids", "memory"):
            if name in controllers.split(","):
                dirs.append(f"/sys/fs/cgroup/{name}{path}")
    return [d.rstrip("/") for d in dirs if not any(c.isspace() for c in d)]


def _limit_files(group: str) -> dict[str, str]:
    """The limit files a fresh child group offers: 'pids' and/or 'memory' -> file name."""
    found = {}
    if os.path.exists(f"{group}/pids.max"):
        found["pids"] = "pids.max"
    for name in ("memory.max", "memory.limit_in_bytes"):  # v2, v1
        if os.path.exists(f"{group}/{name}"):
            found["memory"] = name
            break
    return found


@functools.cache
def usable() -> dict[str, tuple[str, str]]:
    """'pids' / 'memory' -> (parent directory, limit file) where a child group can be made."""
    found: dict[str, tuple[str, str]] = {}
    for parent in _candidates():
        _remove_stale(parent)
        probe = f"{parent}/{_PREFIX}probe-{uuid.uuid4().hex[:8]}"
        try:
            os.mkdir(probe)
        except OSError:
            continue
        try:
            for kind, name in _limit_files(probe).items():
                found.setdefault(kind, (parent, name))
        finally:
            _rmdir(probe)
    return found


def _remove_stale(parent: str) -> None:
    try:
        names = [n for n in os.listdir(parent) if n.startswith(_PREFIX)]
    except OSError:
        return
    for name in names:
        path = f"{parent}/{name}"
        try:
            if time.time() - os.stat(path).st_mtime > _STALE_S:
                os.rmdir(path)  # fails, harmlessly, while any process is inside
        except OSError:
            pass


def _rmdir(path: str) -> None:
    for _ in range(50):  # a killed process leaves its group a moment after it is reaped
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


def create(max_procs: int, memory_bytes: int) -> list[str]:
    """New groups with these limits, one per usable hierarchy; [] where none can be made."""
    groups, limits = [], {"pids": str(max_procs), "memory": str(memory_bytes)}
    for kind, (parent, limit_file) in usable().items():
        if any(g.startswith(parent + "/") for g in groups):  # v2: one group carries both limits
            group = next(g for g in groups if g.startswith(parent + "/"))
        else:
            group = f"{parent}/{_PREFIX}{uuid.uuid4().hex}"
            try:
                os.mkdir(group)
            except OSError:
                continue
            groups.append(group)
        try:
            with open(f"{group}/{limit_file}", "w") as f:
                f.write(limits[kind])
        except OSError:
            pass
    return groups


def enter_argv(groups: list[str], argv: list[str]) -> list[str]:
    """`argv` run by a shell that first moves itself into `groups`."""
    if not groups:
        return argv
    script = 'for g in $0; do echo $$ > "$g/cgroup.procs" || exit 125; done; exec "$@"'
    return ["/bin/sh", "-c", script, " ".join(groups), *argv]


def remove(groups: list[str]) -> None:
    for group in groups:
        _rmdir(group)
