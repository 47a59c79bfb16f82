"""Run untrusted Python in an isolated process and hand back what it wrote on stdout.

The code reward (`rewards/code.py`) runs model-written programs. This module decides how far
they are fenced off from the trainer, and kills everything they started when the call ends.

Isolation tiers, strongest first; `isolation("auto")` takes the first that runs here:

- `bwrap` (bubblewrap, Debian/Ubuntu package `bubblewrap`): new user, pid, network, ipc, uts
  and mount namespaces; the program runs as uid 65534 with no capabilities; its filesystem is
  a read-only root holding only /usr (and the interpreter's prefix when it lives elsewhere),
  /dev/null, /dev/zero, /dev/urandom, a fresh /proc that shows only the sandbox's processes,
  and one writable tmpfs (/tmp, the working directory) capped at `disk_mb`; it may not make
  user namespaces of its own (`--disable-userns`, bubblewrap >= 0.8: one could mount a tmpfs
  of any size). No /etc, no project files, no home directory; the environment is cleared. The harness is the
  namespace's init (`--as-pid-1`): when it exits or is killed the kernel kills every other
  process in the namespace, setsid() or not, before the call returns.
- `unshare` (util-linux): new user, pid, network, ipc, uts and mount namespaces with a fresh
  /proc, the program as uid 65534 there (no capabilities, so it cannot unmount that /proc).
  Processes, network, signals and the trainer's environment are fenced off; files are NOT
  (the program sees the host filesystem with the trainer's rights) and there is no total
  write cap.
- `process`: a plain subprocess in its own session under resource limits. Nothing above is
  fenced off and a child that calls setsid() escapes the final kill. Last resort.

Where this process may create cgroups (`rewards/cgroups.py`), every tier also runs in one
with a process cap and a cap on the memory of all its processes together (a fork bomb, or
memory spread over many processes); only bwrap, which hides /sys, claims them as guards.

A tier weaker than bwrap is announced once per process on stderr, with what it leaves open
(`GUARDS` lists what each tier enforces; the tests check each claim). Resource limits (CPU
seconds, address space, size of one file, no core dumps) are set by the harness that runs
inside, in every tier, before any untrusted code runs.

Only stdout comes back, capped at `output_mb`; stdin carries the input; stderr is discarded.
Departure from remote sandboxes (verl, slime): this runs on the training machine itself, so
bubblewrap's kernel-namespace isolation is the wall; a VM or container is still stronger.
"""

from __future__ import annotations

import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from longrl.errors import UserError
from longrl.rewards import cgroups

TIERS = ("bwrap", "unshare", "process")
GUARDS: dict[str, frozenset[str]] = {
    "bwrap": frozenset({"processes", "network", "signals", "environ", "files", "disk"}),
    "unshare": frozenset({"processes", "network", "signals", "environ"}),
    "process": frozenset(),
}
"""What each tier enforces: processes (every child dies with the call, setsid or not),
network (no connection to anything, loopback included), signals (cannot signal the trainer),
environ (cannot read the trainer's environment), files (sees no host file beyond the
interpreter and system libraries), disk (a total write cap). bwrap adds pids and memory
(cgroup caps) where cgroups can be made here."""

_OPEN = {
    "processes": "children that call setsid() outlive the call",
    "network": "it can open network connections",
    "signals": "it can signal (kill) the trainer",
    "environ": "it can read the trainer's environment via /proc",
    "files": "it can read and write the trainer's files",
    "disk": "there is no total write cap",
    "pids": "it can start any number of processes",
    "memory": "there is no cap on the memory of all its processes together",
}
_SANDBOX_UID = 65534  # nobody
_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


@dataclass(frozen=True)
class Isolation:
    name: str
    """One of TIERS."""
    guards: frozenset[str]
    """What this tier enforces (see GUARDS)."""
    why_not_stronger: str = ""
    """Why each stronger tier was not used ('' for bwrap)."""


@dataclass
class Run:
    stdout: bytes
    """What the sandbox wrote on stdout, at most the cap."""
    timed_out: bool
    truncated: bool
    """More than the cap was written; reading stopped there."""


def _interpreter() -> tuple[str, str]:
    """The base interpreter (not the venv's launcher, so the venv stays invisible) and its prefix."""
    return os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)


def bwrap_argv(disk_mb: int) -> list[str]:
    """bubblewrap's command line up to the program (see the module docstring)."""
    python, prefix = _interpreter()
    argv = ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--uid", str(_SANDBOX_UID), "--gid", str(_SANDBOX_UID), "--hostname", "sandbox",
            "--disable-userns", "--as-pid-1", "--die-with-parent", "--new-session", "--clearenv"]
    for key, value in _ENV.items():
        argv += ["--setenv", key, value]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged-/usr symlinks or real dirs
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for path in {prefix, os.path.dirname(os.path.dirname(python))}:
        if not (path + "/").startswith("/usr/"):
            argv += ["--ro-bind", path, path]
    for dev in ("null", "zero", "urandom"):
        argv += ["--dev-bind", f"/dev/{dev}", f"/dev/{dev}"]
    # POSIX shared memory (multiprocessing's locks) lands in the capped tmpfs; /dev/std* as usual
    argv += ["--symlink", "/tmp", "/dev/shm", "--symlink", "/proc/self/fd", "/dev/fd"]
    for i, std in enumerate(("stdin", "stdout", "stderr")):
        argv += ["--symlink", f"/proc/self/fd/{i}", f"/dev/{std}"]
    argv += ["--proc", "/proc", "--size", str(disk_mb << 20), "--tmpfs", "/tmp", "--chdir", "/tmp",
             "--remount-ro", "/", "--", python, "-I"]
    return argv


def unshare_argv() -> list[str]:
    python, _ = _interpreter()
    # mapped to a non-root uid, the program runs with no capabilities in its namespaces: as root
    # there it could unmount the fresh /proc and see the host's processes beneath
    return ["unshare", "--user", f"--map-user={_SANDBOX_UID}", f"--map-group={_SANDBOX_UID}", "--pid", "--fork",
            "--kill-child", "--net", "--ipc", "--uts", "--mount", "--mount-proc", "--", python, "-I"]


def _argv(tier: str, disk_mb: int) -> list[str]:
    if tier == "bwrap":
        return bwrap_argv(disk_mb)
    if tier == "unshare":
        return unshare_argv()
    return [_interpreter()[0], "-I"]


def _probe(tier: str) -> str:
    """'' when the tier runs a trivial program here, else why not."""
    tool = {"bwrap": "bwrap", "unshare": "unshare"}.get(tier)
    if tool and shutil.which(tool) is None:
        hint = " (apt-get install bubblewrap)" if tool == "bwrap" else ""
        return f"{tool} is not installed{hint}"
    try:
        done = subprocess.run(_argv(tier, 1) + ["-c", "print('ok')"], env=dict(_ENV), cwd=tempfile.gettempdir(),
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{tool} failed to start ({e})"
    if done.stdout.strip() != b"ok":
        err = done.stderr.decode(errors="replace").strip().splitlines()
        return f"{tool} does not run here ({err[-1] if err else f'exit {done.returncode}'})"
    return ""


@functools.cache
def isolation(choice: str = "auto") -> Isolation:
    """The tier to use: `choice` itself, or with 'auto' the strongest that runs here.
    A tier weaker than bwrap is announced on stderr, once per process and tier."""
    if choice not in (*TIERS, "auto"):
        raise UserError(f"sandbox isolation {choice!r} is not one of {['auto', *TIERS]}")
    reasons = []
    for tier in TIERS if choice == "auto" else (choice,):
        why = _probe(tier) if tier != "process" else ""
        if why:
            if choice != "auto":
                raise UserError(f"sandbox isolation {choice!r} is not available: {why}; choose 'auto' to take the strongest that runs")
            reasons.append(f"{tier}: {why}")
            continue
        # only bwrap hides /sys, so only there can the program not leave its cgroups
        extra = frozenset(cgroups.usable()) if tier == "bwrap" else frozenset()
        chosen = Isolation(tier, GUARDS[tier] | extra, "; ".join(reasons))
        if tier != "bwrap":
            _announce(chosen)
        elif extra != {"pids", "memory"}:
            missing = "; ".join(_OPEN[g] for g in sorted({"pids", "memory"} - extra))
            print(f"WARNING longrl code sandbox: no cgroup can be made here ({missing}); per-process limits "
                  "still hold", file=sys.stderr, flush=True)
        return chosen
    raise AssertionError("the process tier always runs")


def _announce(iso: Isolation) -> None:
    left_open = "; ".join(_OPEN[g] for g in sorted(GUARDS["bwrap"] - iso.guards))
    why = f" ({iso.why_not_stronger})" if iso.why_not_stronger else ""
    bar = "!" * 78
    print(f"{bar}\nWARNING longrl code sandbox: untrusted programs run with '{iso.name}' isolation, not "
          f"bubblewrap{why}.\nWhat a program can do here: {left_open}.\nInstall bubblewrap (apt-get install -y "
          f"bubblewrap) or run training in a container or VM.\n{bar}", file=sys.stderr, flush=True)


def run_sandboxed(code: str, stdin: bytes, iso: Isolation, *, timeout_s: float, disk_mb: int,
                  output_mb: float, max_procs: int = 64, memory_mb: int = 1024) -> Run:
    """Run `python -I -c code` in the tier `iso`, feed it `stdin`, collect its stdout (capped),
    and kill it and everything it started when it exits or `timeout_s` passes. `max_procs`
    and `memory_mb` (all processes and the tmpfs together) are cgroup limits, where cgroups
    can be made. An OSError here (a full disk for the weaker tiers' directory) is no answer."""
    try:
        workdir = tempfile.mkdtemp(prefix="longrl-sandbox-") if iso.name != "bwrap" else None
    except OSError as e:
        _warn_once(f"WARNING longrl code sandbox ({iso.name}): cannot make a working directory ({e}); responses score 0")
        return Run(b"", False, False)
    groups = cgroups.create(max_procs, (memory_mb + disk_mb) << 20)
    try:
        argv = cgroups.enter_argv(groups, _argv(iso.name, disk_mb) + ["-c", code])
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=workdir or "/",
                                env={**_ENV, "HOME": workdir or "/tmp", "TMPDIR": workdir or "/tmp"},
                                start_new_session=True)
        try:
            out, timed_out, truncated = _exchange(proc, stdin, time.monotonic() + timeout_s, int(output_mb * (1 << 20)))
        finally:
            _kill_all(proc, iso.name)
        return Run(out, timed_out, truncated)
    finally:
        cgroups.remove(groups)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


@functools.cache
def _warn_once(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _exchange(proc: subprocess.Popen, data: bytes, deadline: float, cap: int) -> tuple[bytes, bool, bool]:
    """Write `data` to the child's stdin and read its stdout until EOF, the deadline or the cap."""
    os.set_blocking(proc.stdin.fileno(), False)
    out, view = bytearray(), memoryview(data)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if view:
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(out), True, False
            for key, _ in sel.select(left):
                if key.fileobj is proc.stdin:
                    try:
                        view = view[os.write(proc.stdin.fileno(), view[: 1 << 16]):]
                    except BrokenPipeError:  # the program closed its stdin or died: fine
                        view = view[:0]
                    if not view:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    sel.unregister(proc.stdout)
                    continue
                out += chunk
                if len(out) > cap:
                    return bytes(out[:cap]), False, True
    return bytes(out), False, False


def _kill_all(proc: subprocess.Popen, tier: str) -> None:
    """Kill the sandbox and everything it started. In the namespace tiers the tool's child is
    the namespace's init (the harness): killing it makes the kernel kill every process in the
    namespace, and the tool, which waits for its child, exits only after they are all gone, so
    when this returns nothing is left running."""
    if proc.poll() is None and tier != "process":
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None or tier == "process":  # the group outlives its leader there
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the tool itself; in the process tier, the session
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    if tier == "process":  # give the killed group a moment to go (zombies left to init may stay)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.01)
    for pipe in (proc.stdin, proc.stdout):
        if pipe and not pipe.closed:
            pipe.close()


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running (not a zombie)."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:  # not Linux, or the process is gone
        pass
    return kids
