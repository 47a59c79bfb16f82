"""Code verifier: run the response's program against the example's tests in a sandboxed
subprocess; the reward is the fraction of tests that pass.

`reward.correctness=code`. The program is the response's `<answer>` block (a fenced
```python block inside it is unwrapped). `Example.meta["tests"]` holds the tests: a list of
Python snippets (each usually one `assert`), or one string (one test). In a JSONL task they
come from a "tests" field; the "answer" field can hold a reference solution, which then
serves as the SFT demonstration.

The sandbox, per response: a fresh `python -I` process (isolated mode: no user site, no
PYTHON* variables, the script directory not on sys.path) in a new empty temporary directory
that is deleted afterwards, a minimal environment, its own session (the whole process group
is killed at the end, forks included), and POSIX resource limits set by the harness before
the program runs (soft = hard, so an unprivileged program cannot raise them): CPU seconds,
address space, size of files written (stdout included: it goes to a file), no core dumps. The program runs first, then each test in the same
namespace; a test passes when it raises nothing. A result counts only if the harness prints
it after a random nonce that the parent sends on stdin and that the harness reads before
the program runs, so a program that exits early (`sys.exit(0)`, `os._exit(0)`), crashes the
interpreter or prints a fake result scores 0.

Limits of this sandbox: it stops accidents and the reward hacks RL tends to find (early
exit, infinite loops, memory blow-ups, stray files), not a determined attacker: the program
runs as the training user, can read files and open sockets, and could inspect the harness's
frames. Run untrusted code inside a container or VM (as verl's and slime's remote sandboxes
do). POSIX only: on other systems the scorer refuses with a message.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from longrl.data.example import Example
from longrl.errors import UserError
from longrl.rewards.answer import extract_answer

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)

# Reads the nonce and the payload before any program code runs, then never exposes them as
# module globals the program can look up by name.
_HARNESS = r"""
import json, resource, sys
def _run(nonce, payload):
    for name, value in payload["limits"].items():  # soft = hard: the program cannot raise them
        resource.setrlimit(getattr(resource, name), (value, value))
    ns = {"__name__": "__solution__", "__builtins__": __builtins__}
    passed = 0
    try:
        exec(compile(payload["program"], "<program>", "exec"), ns)
    except BaseException:
        return nonce, 0
    for test in payload["tests"]:
        try:
            exec(compile(test, "<test>", "exec"), ns)
            passed += 1
        except BaseException:
            pass
    return nonce, passed
_nonce, _passed = _run(sys.stdin.readline().strip(), json.loads(sys.stdin.read()))
sys.stdout.flush()
sys.stdout.write("\n%s %d\n" % (_nonce, _passed))
"""

@dataclass
class SandboxLimits:
    timeout_s: float = 5.0
    """Wall-clock limit per response (the CPU limit is this plus one second)."""
    memory_mb: int = 1024
    """Address-space limit of the process."""
    file_mb: int = 16
    """Largest file the program may write."""


def program_of(response_text: str) -> str | None:
    """The program in a response: its `<answer>` block, unwrapped from a ```python fence."""
    answer = extract_answer(response_text)
    if answer is None:
        return None
    fenced = _FENCE.search(answer)
    return fenced.group(1) if fenced else answer


def tests_of(example: Example) -> list[str]:
    """The example's tests as a list of snippets; UserError when missing or malformed."""
    tests = example.meta.get("tests")
    if isinstance(tests, str):
        tests = [tests]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise UserError(f'example {example.id!r}: reward.correctness=code needs "tests": a non-empty list of Python '
                        'snippets (e.g. ["assert add(1, 2) == 3"]) or one string')
    return tests


def run_tests(program: str, tests: list[str], limits: SandboxLimits | None = None) -> float:
    """Fraction of `tests` that pass after `program` runs, in the sandbox described above."""
    if os.name != "posix":
        raise UserError("reward.correctness=code runs programs under POSIX resource limits; use Linux or macOS")
    limits = limits or SandboxLimits()
    nonce = secrets.token_hex(16)
    rlimits = {"RLIMIT_CPU": int(limits.timeout_s) + 1, "RLIMIT_AS": limits.memory_mb << 20,
               "RLIMIT_FSIZE": limits.file_mb << 20, "RLIMIT_CORE": 0}
    payload = json.dumps({"program": program, "tests": tests, "limits": rlimits})
    with tempfile.TemporaryDirectory(prefix="longrl-sandbox-") as cwd:
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        # stdout goes to a file under the size limit, so a flood of prints cannot fill our memory
        with open(os.path.join(cwd, ".stdout"), "w+b") as sink:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _HARNESS], stdin=subprocess.PIPE, stdout=sink,
                                    stderr=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True)
            try:
                proc.communicate(f"{nonce}\n{payload}".encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                pass
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole session: forks that outlive it too
                except ProcessLookupError:
                    pass
                proc.wait()
            sink.seek(max(0, os.fstat(sink.fileno()).st_size - 4096))
            out = sink.read()
    for line in reversed(out.decode(errors="replace").splitlines()):
        head, _, count = line.partition(" ")
        if head == nonce and count.isdigit():
            return min(int(count), len(tests)) / len(tests)
    return 0.0


def code_scorer(limits: SandboxLimits | None = None):
    """`correctness(response_text, example)` for `reward.correctness=code`."""

    def score(response_text: str, example: Example) -> float:
        program = program_of(response_text)
        if program is None or not program.strip():
            return 0.0
        return run_tests(program, tests_of(example), limits)

    return score
