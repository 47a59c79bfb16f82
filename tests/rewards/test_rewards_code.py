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
from longrl.errors import UserError
from longrl.recipes.tasks import load_task
from longrl.rewards.code import (
    Check,
    SandboxLimits,
    decode,
    parse_test,
    program_of,
    run_tests,
)
from longrl.rewards.code import (
    tests_of as checked_tests,  # (not named test*: pytest would collect it)
)
from longrl.rewards.sandbox import isolation
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


def test_hangs_forks_and_memory_blowups_are_cut_off(running):
    t0 = time.time()
    assert run_tests("while True:\n    pass", TESTS, SandboxLimits(timeout_s=1.0)) == 0.0
    marker = f"longrl-fork-{uuid.uuid4().hex}"  # the fork runs under this name, so we can look for it
    fork = (f"import os, sys\nif os.fork() == 0:\n    os.execv(sys.executable, [sys.executable, '-c', "
            f"'while True: pass', {marker!r}])\n")
    assert run_tests(fork + "def add(a, b): return a + b", TESTS, SandboxLimits(timeout_s=2.0)) == 1.0  # room for a loaded machine
    assert running(marker) == []  # the fork died with the call
    assert time.time() - t0 < 10
    assert run_tests("x = bytearray(4 << 30)\ndef add(a, b): return a + b", TESTS,
                     SandboxLimits(memory_mb=512)) == 0.0  # MemoryError under the address-space limit


def test_programs_run_in_a_fresh_empty_directory_that_is_removed():
    # The program reports what it sees as a test value (it cannot write outside its sandbox).
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("longrl-sandbox-")}
    program = "import os\ndef listing():\n    return os.listdir('.')\nstart = listing()\n"
    # bwrap: /tmp on a private tmpfs that vanishes with the sandbox; the others: a host temp dir
    where = "assert os.getcwd() == '/tmp'" if isolation().name == "bwrap" else "assert 'longrl-sandbox-' in os.getcwd()"
    assert run_tests(program, ["assert start == []", "assert listing() == []", where], FAST) == 1.0
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


@pytest.mark.parametrize("test, check", [
    ("assert add(1, 2) == 3", Check("add(1, 2)", "==", 3)),
    ("assert 3 == add(1, 2)", Check("add(1, 2)", "==", 3, value_first=False)),
    ("assert f(-1, 2 ** 3) != (1, 'a')", Check("f(-1, 2 ** 3)", "!=", (1, "a"))),
    ("assert 2 < f(x)", Check("f(x)", "<", 2, value_first=False)),
    ("assert f(x)[0] in {1, 2}", Check("f(x)[0]", "in", {1, 2})),
    ("assert f() is None", Check("f()", "is", None)),
    ("assert is_palindrome('Level')", Check("is_palindrome('Level')", "truthy")),
    ("assert not is_palindrome('abc'), 'message'", Check("is_palindrome('abc')", "falsy")),
    ("assert math.isclose(celsius(0), -17.8, abs_tol=0.05)", Check("celsius(0)", "isclose", (-17.8, 1e-9, 0.05))),
    ("assert abs(-17.8 - celsius(0)) <= 0.1", Check("celsius(0)", "abs<=", (-17.8, 0.1))),
])
def test_a_test_splits_into_the_sandboxed_expression_and_the_expected_value(test, check):
    assert parse_test(test) == check


@pytest.mark.parametrize("test, why", [
    ("assert add(1, 2) == 3 and add(2, 2) == 4", "and/or"),  # the comparisons would run in the sandbox
    ("assert (add(1, 2) == 3) == True", "comparison"),
    ("assert abs(f(x) - 2.5) < tol", "tolerance must be a literal"),
    ("assert f(x) - 2.5 == 0", "arithmetic with a literal"),  # f's value would receive 2.5
    ("assert f() == g()", "one side must be a Python literal"),
    ("assert f() is 3", "other than None, True or False"),
    ("x = f()\nassert x == 3", "not one assert statement"),
    ("assert f(", "does not parse"),
])
def test_tests_whose_expected_value_would_enter_the_sandbox_are_refused(test, why):
    with pytest.raises(ValueError, match=why):
        parse_test(test)
    with pytest.raises(UserError, match=f"example 'e'.*{why}.*write each test as"):
        checked_tests(Example("e", "p", "", meta={"tests": ["assert add(1, 2) == 3", test]}))


def test_values_come_back_as_the_python_values_they_were():
    # One sandbox run per program; each value compared here with the literal the test names.
    program = ("def f(k):\n    return [(1, 'a'), {2, 3}, frozenset({4}), {'k': [None, True]}, b'\\x00\\xff', 1 + 2j,"
               " 2.5, -7, {(1, 2): {3}}][k]")
    tests = ["assert f(0) == (1, 'a')", "assert f(1) == {2, 3}", "assert f(2) == {4}",
             "assert f(3) == {'k': [None, True]}", "assert f(4) == b'\\x00\\xff'", "assert f(5) == 1 + 2j",
             "assert f(6) == 2.5", "assert f(7) == -7", "assert f(8) == {(1, 2): {3}}"]
    assert run_tests(program, tests, FAST) == 1.0
    # and as strictly as Python compares them: a list is not a tuple, 'a' is not b'a', 2.5 is not 2
    wrong = ["assert f(0) == [1, 'a']", "assert f(4) == '\\x00\\xff'", "assert f(6) == 2", "assert f(7) == -7.5"]
    assert run_tests(program, wrong, FAST) == 0.0
    assert decode({"tuple": [1, {"set": ["a"]}]}) == (1, {"a"})
    for bad in ({"obj": 1}, {"tuple": 1}, {"dict": [[1]]}, {"tuple": [1], "set": [2]}, {"bytes": "zz"}):
        with pytest.raises(ValueError):
            decode(bad)


def test_float_tolerances_are_compared_here():
    program = "def celsius(f):\n    return (f - 32) * 5 / 9"
    assert run_tests(program, ["assert math.isclose(celsius(0), -17.78, abs_tol=0.01)",
                               "assert abs(celsius(0) - -17.8) < 0.05", "assert abs(celsius(212) - 100) <= 0"], FAST) == 1.0
    assert run_tests(program, ["assert math.isclose(celsius(0), -17.8)", "assert abs(celsius(0) - -17.8) < 0.01",
                               "assert math.isclose(celsius, 1.0)"], FAST) == 0.0  # too far; not a number


def test_a_program_that_dies_partway_keeps_the_tests_it_answered():
    program = "import os\ndef add(a, b):\n    if a == 2:\n        os._exit(0)\n    return a + b"
    assert run_tests(program, TESTS, FAST) == 0.5  # add(1, 2) and add(-1, 1) were answered, right


def test_jsonl_code_task_refuses_a_test_the_trainer_cannot_compare(tmp_path):
    lines = [{"prompt": f"Write add(a, b) #{i}.", "answer": "def add(a, b):\n    return a + b", "tests": TESTS}
             for i in range(10)]
    lines[3]["tests"] = ["assert add(1, 2) == 3 or True"]
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    with pytest.raises(UserError, match="and/or"):
        load_task(TaskConfig(name="jsonl", train_file=str(path)), correctness="code")


def test_a_program_may_use_processes_and_shared_memory():
    # multiprocessing pickles the program's functions by module name and keeps its locks in /dev/shm
    program = ("import multiprocessing as mp\ndef sq(x):\n    return x * x\ndef par():\n"
               "    with mp.get_context('fork').Pool(2) as pool:\n        return pool.map(sq, range(5))\n"
               "def locked():\n    with mp.Lock():\n        return 1\n")
    assert run_tests(program, ["assert par() == [0, 1, 4, 9, 16]", "assert locked() == 1"], FAST) == 1.0


def test_a_program_that_hangs_partway_keeps_the_tests_it_answered():
    program = "def add(a, b):\n    while a == 2:\n        pass\n    return a + b"
    assert run_tests(program, TESTS, SandboxLimits(timeout_s=2.0)) == 0.5
