"""The attacks of issue 13 on the code reward, each asserting that it scores 0 (or, for the
escapes, that it fails to reach anything outside) and that the caller keeps running.

Gaming attacks run under every sandbox tier that works here: the protocol (values out,
comparison in the trainer) has to stop them whatever the isolation. Escape attacks run under
every tier that claims the matching guard in `sandbox.GUARDS`, so a claim that stops being
true fails here. Where an escape is expressed as a test whose expected value is the secret
(the contents of /etc/passwd, the trainer's environment variable), reward 0 means the
program could not get it; a positive control with the secret inside the sandbox scores 1.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from longrl.errors import UserError
from longrl.rewards import cgroups, sandbox
from longrl.rewards import code as code_reward
from longrl.rewards.code import SandboxLimits, run_tests

pytestmark = pytest.mark.reliability  # counted with issue 13's other cases
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add('a', 'b') == 'ab'"]
FAST = SandboxLimits(timeout_s=3.0)
ROOT = Path(__file__).parents[2]


def _works(tier: str) -> bool:
    try:
        sandbox.isolation(tier)
        return True
    except UserError:
        return False


HERE = [t for t in sandbox.TIERS if _works(t)]


def tiers_guarding(guard: str) -> list:
    """The tiers that claim `guard`; those that do not run here are skipped, named."""
    return [t if t in HERE else pytest.param(t, marks=pytest.mark.skip(reason=f"{t} does not run here"))
            for t in sandbox.TIERS if guard in sandbox.GUARDS[t]]


def _sandbox_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("longrl-sandbox-")}


# ---- gaming: reward without computing the outputs --------------------------------------------

FRAME_AND_MEMORY_SEARCH = r"""
import gc, re, sys
def _strings():
    # every string the process holds: frames up the stack, their locals and globals, the heap
    found, frame = [], sys._getframe()
    while frame is not None:
        for scope in (frame.f_locals, frame.f_globals):
            found += [v for v in scope.values() if isinstance(v, str)]
        frame = frame.f_back
    for obj in gc.get_objects():
        if isinstance(obj, dict):
            found += [v for v in obj.values() if isinstance(v, str)]
        elif isinstance(obj, (list, tuple)):
            found += [v for v in obj if isinstance(v, str)]
    for path in ('/proc/self/cmdline', '/proc/self/environ'):
        found.append(open(path, 'rb').read().decode(errors='replace'))
    return found
def add(a, b):
    for s in _strings():
        m = re.search('SECRET-[0-9a-f]{32}', s)
        if m:
            return m.group(0)
"""


@pytest.mark.parametrize("tier", HERE)
def test_the_expected_values_are_nowhere_in_the_sandbox(tier):
    secret = f"SECRET-{uuid.uuid4().hex}"
    assert run_tests(FRAME_AND_MEMORY_SEARCH, [f"assert add(1, 2) == {secret!r}"], FAST, tier) == 0.0
    # control: the same search finds the value once it IS in the sandbox (in another test's expression)
    leaky = [f"assert len({secret!r}) == 39", f"assert add(1, 2) == {secret!r}"]
    assert run_tests(FRAME_AND_MEMORY_SEARCH, leaky, FAST, tier) == 1.0


FORGE = ('{"i": 0, "passed": true}\n{"i": 1, "v": {"obj": 1}}\n{"i": 2, "v": "ok"}\n{"i": 3, "v": "ok"}\n'
         '4 passed\n')
GAMING = {
    # replace the machinery that runs or reports the tests
    "replace_builtins": ("import builtins, json\nbuiltins.exec = lambda *a, **k: None\n"
                         "builtins.eval = lambda *a, **k: True\nbuiltins.compile = lambda *a, **k: None\n"
                         "json.dumps = lambda *a, **k: '{\"i\": 0, \"passed\": true}'\n"
                         "def add(a, b): return None"),
    # an object equal to everything; built-in subclasses that lie about equality
    "always_equal": ("class Any:\n    __eq__ = lambda self, other: True\n    __hash__ = lambda self: 0\n"
                     "    __bool__ = lambda self: True\ndef add(a, b): return Any()"),
    "int_subclass": "class I(int):\n    __eq__ = lambda self, other: True\ndef add(a, b): return I(7)",
    "str_subclass": "class S(str):\n    __eq__ = lambda self, other: True\ndef add(a, b): return S('nope')",
    # forged result lines on every descriptor, before the tests run
    "forged_lines": (f"import os\nfor fd in range(64):\n    try:\n        os.write(fd, {FORGE.encode()!r})\n"
                     "    except OSError:\n        pass\ndef add(a, b): return None"),
    # a flood of tiny lines ahead of the answers (the trainer reads only the first few)
    "line_flood": ("import os\nfor fd in range(3, 16):\n    try:\n        os.write(fd, b'{\"i\": 9}\\n' * 200000)\n"
                   "    except OSError:\n        pass\ndef add(a, b): return a + b"),
    # a value that is not data, a nesting bomb, NaN, the old nonce-style fake result line
    "not_data": "def add(a, b): return lambda: 3",
    "nesting_bomb": "def add(a, b):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x",
    "nan": "def add(a, b): return float('nan')",
    "fake_nonce_line": "print('\\n' + 'x' * 32 + ' 4')\ndef add(a, b): return None",
}


@pytest.mark.parametrize("tier", HERE)
@pytest.mark.parametrize("name", GAMING)
def test_gaming_scores_zero(tier, name):
    compile(GAMING[name], name, "exec")  # the attack itself is a valid program
    assert run_tests(GAMING[name], TESTS, FAST, tier) == 0.0


@pytest.mark.parametrize("tier", HERE)
def test_forged_lines_do_reach_the_result_channel_and_count_for_nothing(tier):
    payload = json.dumps({"program": GAMING["forged_lines"], "exprs": ["add(1, 2)"], "limits": {}}).encode()
    run = sandbox.run_sandboxed(code_reward.HARNESS, payload, sandbox.isolation(tier), timeout_s=3.0, disk_mb=8,
                                output_mb=1.0)
    assert FORGE.encode() in run.stdout and b'{"i": 0, "v": null}' in run.stdout  # the forgery, then the answer
    assert run_tests(GAMING["forged_lines"], TESTS, FAST, tier) == 0.0


@pytest.mark.parametrize("tier", HERE)
def test_a_flood_of_output_scores_zero_and_is_cut_at_the_cap(tier):
    program = "def add(a, b):\n    return 'x' * 200000 if a == 1 else a + b"
    assert run_tests(program, TESTS, SandboxLimits(timeout_s=3.0, output_mb=0.1), tier) == 0.0
    assert run_tests(program, TESTS, SandboxLimits(timeout_s=3.0, output_mb=1.0), tier) == 0.75  # under the cap


# ---- escapes: processes, files, disk, environment, network, signals ----------------------------


@pytest.mark.parametrize("tier", tiers_guarding("processes"))
def test_setsid_and_setpgid_children_die_with_the_call(tier, tmp_path, running):
    marker = f"longrl-escape-{uuid.uuid4().hex}"
    log = tmp_path / "still-writing.log"
    # each child leaves the session or group (or double-forks) and keeps writing, under a name we can find
    child = f"import time\nwhile True:\n    try: open({str(log)!r}, 'a').write('x')\n    except OSError: pass\n    time.sleep(0.01)"
    program = f"""
import os, sys, time
for how in ('setsid', 'setpgid', 'double'):
    if os.fork() == 0:
        if how == 'setsid': os.setsid()
        elif how == 'setpgid': os.setpgid(0, 0)
        elif os.fork() != 0: os._exit(0)
        os.execv(sys.executable, [sys.executable, '-c', {child!r}, {marker!r}])
def alive():  # how many of them are running, seen from inside
    return sum({marker!r} in open(f'/proc/{{p}}/cmdline').read() for p in os.listdir('/proc') if p.isdigit())
deadline = time.time() + 2
while alive() < 3 and time.time() < deadline:
    time.sleep(0.01)
"""
    assert run_tests(program, ["assert alive() == 3"], SandboxLimits(timeout_s=3.0), tier) == 1.0  # they ran
    assert running(marker) == []  # and died with the call
    size = log.stat().st_size if log.exists() else 0
    time.sleep(0.2)
    assert (log.stat().st_size if log.exists() else 0) == size  # nobody is writing any more


@pytest.mark.parametrize("tier", tiers_guarding("processes"))
def test_filling_the_disk_neither_raises_nor_leaves_temp_dirs(tier):
    before = _sandbox_dirs()
    program = """
import os
def fill(prefix):
    for i in range(1000):
        try:
            with open(f'{prefix}{i}', 'wb') as f:
                while True: f.write(b'x' * (1 << 20))
        except OSError as e:
            if e.errno == 28 or i > 40: return  # ENOSPC, or enough files
if os.fork() == 0:
    os.setsid()
    fill('child-')
fill('fill-')
"""
    limits = SandboxLimits(timeout_s=3.0, file_mb=4, disk_mb=8)
    assert run_tests(program, TESTS, limits, tier) == 0.0  # returns, no OSError
    assert _sandbox_dirs() <= before


@pytest.mark.parametrize("tier", [t for t in HERE if t != "bwrap"])  # bwrap makes no host directory
def test_a_full_disk_for_the_work_directory_scores_zero_instead_of_raising(tier, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", full)
    assert run_tests("def add(a, b): return a + b", TESTS, FAST, tier) == 0.0
    assert "cannot make a working directory" in capsys.readouterr().err


@pytest.mark.parametrize("tier", tiers_guarding("disk"))
def test_the_total_write_cap_holds_everywhere_it_can_write(tier, tmp_path):
    outside = tmp_path / "outside.bin"
    program = f"""
import ctypes, os
def nested_tmpfs(path):  # a user namespace of its own could mount a tmpfs of any size
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
        return
    for name, text in (('setgroups', 'deny'), ('uid_map', f'0 {{uid}} 1'), ('gid_map', f'0 {{gid}} 1')):
        with open(f'/proc/self/{{name}}', 'w') as f:
            f.write(text)
    os.makedirs(path, exist_ok=True)
    libc.mount(b'none', path.encode(), b'tmpfs', 0, b'size=200m')
def wrote():
    try:
        nested_tmpfs('/tmp/m')
    except OSError:
        pass
    total = 0
    for place in ('/tmp/m/x', {str(outside)!r}, '/tmp/a', '/tmp/b', '/dev/shm/c', '/var/tmp/d', './e', './f', '/h'):
        for part in range(12):
            try:
                with open(place + str(part), 'wb') as f:
                    for _ in range(8):
                        f.write(b'x' * (1 << 20))
                        total += 1 << 20
            except OSError:
                pass
    return total
"""
    assert run_tests(program, [f"assert wrote() >= {90 << 20}"], FAST, tier) == 0.0
    assert not any(tmp_path.iterdir())  # nothing written outside its directory


@pytest.mark.parametrize("tier", tiers_guarding("files"))
def test_host_files_are_out_of_sight(tier):
    program = "def read(path):\n    try:\n        return open(path).read()\n    except OSError:\n        return None"
    targets = ["/etc/passwd", str(ROOT / "pyproject.toml"), str(Path(__file__).resolve()), str(Path.home() / ".bashrc")]
    for path in filter(os.path.exists, targets):
        assert run_tests(program, [f"assert read({path!r}) == {Path(path).read_text()!r}"], FAST, tier) == 0.0, path
    assert run_tests(program, ["assert read('/etc/hostname') is None"], FAST, tier) == 1.0  # no /etc at all


def _trainer_variable() -> tuple[str, str]:
    """A variable in this process's environment as /proc shows it (set at exec) and the sandbox lacks."""
    for kv in Path("/proc/self/environ").read_bytes().split(b"\0"):
        name, _, value = kv.decode(errors="replace").partition("=")
        if name and value and name not in ("PATH", "HOME", "TMPDIR", "LANG", "PYTHONHASHSEED", "PWD", "SHLVL", "_"):
            return name, value
    pytest.skip("this process has no environment variable to look for")


@pytest.mark.parametrize("tier", tiers_guarding("environ"))
def test_the_trainers_environment_is_out_of_sight(tier, monkeypatch):
    name, value = _trainer_variable()
    monkeypatch.setenv("LONGRL_TEST_SECRET", uuid.uuid4().hex)  # and one set after start (not in /proc)
    program = f"""
import ctypes, os
ctypes.CDLL(None).umount2(b'/proc', 2)  # a fresh /proc over the host's would hide it, not remove it
def leak(name):
    found = os.environ.get(name)
    for pid in {{str(os.getppid()), str({os.getpid()}), 'self', *filter(str.isdigit, os.listdir('/proc'))}}:
        try:
            for kv in open(f'/proc/{{pid}}/environ', 'rb').read().split(b'\\0'):
                if kv.startswith(name.encode() + b'='):
                    found = kv.split(b'=', 1)[1].decode()
        except OSError:
            pass
    return found
"""
    secret = os.environ["LONGRL_TEST_SECRET"]
    tests = [f"assert leak({name!r}) == {value!r}", f"assert leak('LONGRL_TEST_SECRET') == {secret!r}"]
    assert run_tests(program, tests, FAST, tier) == 0.0


@pytest.mark.parametrize("tier", tiers_guarding("network"))
def test_no_network_not_even_loopback(tier):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        program = (f"import socket\ndef connect():\n    try:\n        s = socket.create_connection(('127.0.0.1', {port}), 1)\n"
                   f"        s.sendall(b'hello')\n        return True\n    except OSError:\n        return False")
        assert run_tests(program, ["assert connect()"], FAST, tier) == 0.0
        with pytest.raises(socket.timeout):
            server.accept()


@pytest.mark.parametrize("tier", tiers_guarding("signals"))
def test_it_cannot_kill_the_trainer_or_its_neighbours(tier):
    neighbour = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        program = f"""
import os, signal
# -1 (everything it may signal) only once inside a fresh pid namespace, so that a broken tier
# fails this test on the named pids instead of killing every process of this user
for pid in (os.getppid(), {os.getpid()}, {neighbour.pid}, {os.getppid()}, 0, *([-1] if os.getpid() < 5 else [])):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
def add(a, b): return None
"""
        assert run_tests(program, TESTS, FAST, tier) == 0.0
        assert neighbour.poll() is None  # still running; so is this test process
        assert run_tests("def add(a, b): return a + b", TESTS, FAST, tier) == 1.0  # and the reward still works
    finally:
        neighbour.kill()
        neighbour.wait()


# ---- the tier in use, and saying so --------------------------------------------------------------


def test_a_weak_tier_is_announced_once_naming_what_it_leaves_open(capsys):
    sandbox.isolation.cache_clear()
    try:
        assert sandbox.isolation("process").name == "process"
        sandbox.isolation("process")
        err = capsys.readouterr().err
        assert err.count("WARNING longrl code sandbox") == 1
        assert "setsid() outlive the call" in err and "network" in err and "apt-get install -y bubblewrap" in err
    finally:
        sandbox.isolation.cache_clear()


def test_auto_falls_back_when_bubblewrap_is_missing_and_says_why(monkeypatch, capsys):
    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    sandbox.isolation.cache_clear()
    try:
        chosen = sandbox.isolation("auto")
        assert chosen.name in ("unshare", "process") and "bwrap is not installed" in chosen.why_not_stronger
        assert "bwrap is not installed" in capsys.readouterr().err
        with pytest.raises(UserError, match="'bwrap' is not available"):
            sandbox.isolation("bwrap")
        with pytest.raises(UserError, match="is not one of"):
            sandbox.isolation("docker")
    finally:
        sandbox.isolation.cache_clear()


@pytest.mark.skipif("bwrap" not in HERE, reason="bubblewrap is not installed here (apt-get install -y bubblewrap)")
def test_auto_picks_bubblewrap_where_it_runs(capsys):
    sandbox.isolation.cache_clear()
    try:
        assert sandbox.isolation("auto").name == "bwrap"
        assert "WARNING" not in capsys.readouterr().err
    finally:
        sandbox.isolation.cache_clear()


# ---- cgroup caps: a fork bomb, and memory spread over many processes -----------------------------


def _bwrap_guards() -> frozenset:
    return sandbox.isolation("bwrap").guards if "bwrap" in HERE else frozenset()


def _leftover_groups() -> set[str]:
    return {f"{parent}/{name}" for parent, _ in cgroups.usable().values() for name in os.listdir(parent)
            if name.startswith("longrl-sandbox-")}


@pytest.mark.skipif("pids" not in _bwrap_guards(), reason="no bwrap, or no pids cgroup can be made here")
def test_a_fork_bomb_stops_at_the_process_cap():
    before = _leftover_groups()
    program = """
import os, time
def spawned():
    n = 0
    for _ in range(200):
        try:
            if os.fork() == 0:
                time.sleep(3)
                os._exit(0)
        except OSError:
            break
        n += 1
    return n
"""
    limits = SandboxLimits(timeout_s=5.0, max_procs=20)
    assert run_tests(program, ["assert spawned() == 200"], limits, "bwrap") == 0.0
    assert run_tests(program, ["assert spawned() == 18"], limits, "bwrap") == 1.0  # 20 less the tool and the harness
    assert _leftover_groups() <= before


@pytest.mark.skipif("memory" not in _bwrap_guards(), reason="no bwrap, or no memory cgroup can be made here")
def test_memory_spread_over_processes_stops_at_the_total_cap():
    program = """
import os, time
def filled():  # how many hold their memory at the end
    r, w = os.pipe()
    kids = {}
    for k in range(3):  # each under the per-process limit; together over the total
        pid = os.fork()
        if pid == 0:
            x = bytearray(150 << 20)
            for i in range(0, len(x), 4096):
                x[i] = 1
            os.write(w, bytes([k]))
            time.sleep(5)
            os._exit(0)
        kids[pid] = k
    os.close(w)
    os.set_blocking(r, False)
    wrote, died, deadline = set(), set(), time.time() + 4
    while wrote | died != {0, 1, 2} and time.time() < deadline:  # each one fills, or is killed
        try:
            wrote |= set(os.read(r, 3))
        except BlockingIOError:
            time.sleep(0.02)
        died |= {k for p, k in kids.items() if k not in died and os.waitpid(p, os.WNOHANG)[0]}
    return len(wrote - died)
"""
    limits = SandboxLimits(timeout_s=6.0, memory_mb=200, disk_mb=8)
    assert run_tests(program, ["assert filled() == 3"], limits, "bwrap") == 0.0
    assert run_tests(program, ["assert filled() >= 1"], limits, "bwrap") == 1.0  # one fits
