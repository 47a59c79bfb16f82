"""Code verifier: programs run against tests in a sandboxed subprocess; the reward is the
fraction passed, and the reward hacks RL finds (early exit, fake output, hangs) score 0."""

import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from longrl.config import TaskConfig
from longrl.data.example import Example
from longrl.data.registry import load_task
from longrl.errors import UserError
from longrl.rewards.code import SandboxLimits, program_of, run_tests
from longrl.rewards.verifiers import answer_scorer

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add('a', 'b') == 'ab'"]
FAST = SandboxLimits(timeout_s=3.0)


def test_fraction_of_tests_passed():
    assert run_tests("def add(a, b):\n    return a + b\n", TESTS, FAST) == 1.0
    assert run_tests("def add(a, b):\n    return a * 2 if a == b else 0\n", TESTS, FAST) == 0.5  # -1 + 1, 2 + 2
    assert run_tests("def add(a, b): return 3", TESTS, FAST) == 0.25
    assert run_tests("def add(a, b) return a + b", TESTS, FAST) == 0.0  # syntax error
    assert run_tests("raise ValueError('boom')\ndef add(a, b): return a + b", TESTS, FAST) == 0.0


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)",  # exit before the tests: no result line
    "import os\nos._exit(0)",
    "print('\\n' + 'x' * 32 + ' 4')\nimport os\nos._exit(0)",  # a fake result without the nonce
    "import sys\nsys.stdout.close()\ndef add(a, b): return None",
])
def test_reward_hacks_score_zero(program):
    assert run_tests(program, TESTS, FAST) == 0.0


def test_the_result_channel_is_not_the_programs_stdout():
    # Its prints go nowhere and closing sys.stdout cannot stop the values coming back
    # (add returning 0 is right for add(-1, 1) only).
    assert run_tests("import sys\nprint('noise')\nsys.stdout.close()\ndef add(a, b): return 0", TESTS, FAST) == 0.25
    assert run_tests("import sys\nsys.stdout.close()\ndef add(a, b): return a + b", TESTS, FAST) == 1.0


def _running(marker: str) -> list[int]:
    """Pids of live processes (any pid namespace) whose command line holds `marker`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_hangs_forks_and_memory_blowups_are_cut_off():
    t0 = time.time()
    assert run_tests("while True:\n    pass", TESTS, SandboxLimits(timeout_s=1.0)) == 0.0
    marker = f"longrl-fork-{uuid.uuid4().hex}"  # the fork runs under this name, so we can look for it
    fork = (f"import os, sys\nif os.fork() == 0:\n    os.execv(sys.executable, [sys.executable, '-c', "
            f"'while True: pass', {marker!r}])\n")
    assert run_tests(fork + "def add(a, b): return a + b", TESTS, SandboxLimits(timeout_s=1.0)) == 1.0
    assert _running(marker) == []  # the fork died with the call
    assert time.time() - t0 < 10
    assert run_tests("x = bytearray(4 << 30)\ndef add(a, b): return a + b", TESTS,
                     SandboxLimits(memory_mb=512)) == 0.0  # MemoryError under the address-space limit


def test_programs_run_in_a_fresh_empty_directory_that_is_removed():
    # The program reports what it sees as a test value (it cannot write outside its sandbox).
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("longrl-sandbox-")}
    program = "import os\ndef listing():\n    return os.listdir('.')\nstart = listing()\n"
    assert run_tests(program, ["assert start == []", "assert listing() == []"], FAST) == 1.0
    after = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("longrl-sandbox-")}
    assert after <= before  # nothing left behind


def test_program_comes_from_the_answer_block_fenced_or_not():
    assert program_of("<think>easy</think><answer>def f(): pass</answer>") == "def f(): pass"
    assert program_of("<answer>```python\ndef f():\n    return 1\n```</answer>") == "def f():\n    return 1\n"
    assert program_of("no answer block") is None
    score = answer_scorer("code")
    ex = Example("e", "write add", "", meta={"tests": TESTS})
    assert score("<answer>```py\ndef add(a, b):\n    return a + b\n```</answer>", ex) == 1.0
    assert score("def add(a, b): return a + b", ex) == 0.0  # not in the response format
    assert score("<answer>def add(a, b): return a + b</answer>", Example("s", "p", "", meta={"tests": TESTS[0]})) == 1.0


def test_jsonl_code_task_checks_its_tests_when_loaded(tmp_path):
    good = {"prompt": "Write add(a, b).", "answer": "def add(a, b):\n    return a + b", "tests": TESTS}
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps({**good, "prompt": f"Write add(a, b) #{i}."}) for i in range(10)) + "\n")
    task = load_task(TaskConfig(name="jsonl", train_file=str(path)), correctness="code")
    ex = task.train[0]
    assert task.score(f"<answer>{ex.answer}</answer>", ex) == 1.0  # the reference solution passes
    lines = [{**good, "prompt": f"Write add(a, b) #{i}."} for i in range(10)]
    lines[7]["tests"] = []
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    with pytest.raises(UserError, match='needs "tests"'):
        load_task(TaskConfig(name="jsonl", train_file=str(path)), correctness="code")


def test_the_shipped_code_examples_pass_with_their_reference_solutions():
    path = Path(__file__).parents[2] / "examples" / "code_tasks.jsonl"
    task = load_task(TaskConfig(name="jsonl", train_file=str(path)), correctness="code")
    for ex in task.train + task.eval:
        assert task.score(f"<answer>{ex.answer}</answer>", ex) == 1.0, ex.id
        assert task.score("<answer>pass</answer>", ex) == 0.0, ex.id
