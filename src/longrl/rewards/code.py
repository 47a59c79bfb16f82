"""Code verifier: run the response's program in a sandbox, have it return the values of the
tests' expressions as data, and compare them with the expected values here, in the trainer.
The reward is the fraction of tests that pass.

`reward.correctness=code`. The program is the response's `<answer>` block (a fenced
```python block inside it is unwrapped). `Example.meta["tests"]` holds the tests: a list of
one-line `assert`s, or one string (one test). In a JSONL task they come from a "tests" field;
the "answer" field can hold a reference solution, which then serves as the SFT demonstration.

A test is split here, when the task loads, into an expression and an expected value:

- `assert EXPR == VALUE` (or `VALUE == EXPR`; also `!=`, `<`, `<=`, `>`, `>=`, `in`,
  `not in`), where VALUE is a Python literal (`ast.literal_eval`);
- `assert EXPR is None` / `is True` / `is False` (and `is not`);
- `assert math.isclose(EXPR, VALUE, rel_tol=.., abs_tol=..)` and `assert abs(EXPR - VALUE) < TOL`
  (or `<=`), for floats;
- `assert EXPR` / `assert not EXPR`: the value's truthiness (meant for predicates such as
  `is_palindrome('Level')`; the program's own value decides these).

Only EXPR goes into the sandbox, and it may contain no comparison, no and/or and no
arithmetic between a value and a literal (literals there are inputs: call arguments,
indices), so expected values never enter the untrusted process: it can return whatever it
likes, but it scores only by returning the right values. The harness there runs the
program, evaluates each EXPR in its namespace in order and writes one JSON line per test on
stdout. Values travel as tagged JSON (None, bool, int, float, complex, str, bytes, list,
tuple, set, frozenset, dict; see `decode`), never as objects, so the comparison here runs on
plain built-in values and an object with a rigged `__eq__` or `__bool__` cannot even be
sent. A program that fails to run scores 0; a test whose expression raises, or whose value
is not data, fails. The first answer for each test counts; anything that is not an answer
on that channel is ignored, and a flood past `output_mb` scores 0.

Departures from the earlier design (free-form snippets run inside the sandbox, a nonce
guarding the result line): tests must take one of the forms above (checked when the task
loads, with a message naming them); a value that is not data (a regex Match, an instance of
the program's own class, an int past Python's 4300-digit str limit) fails its test even
where Python would call it truthy or equal; truthiness tests still trust the program's own
value, as they always did; and a program that exits or hangs partway keeps the tests it
answered before (those values were computed).

Where the program runs, and what it can reach, is `rewards/sandbox.py`'s business.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import operator
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from longrl.data.example import Example
from longrl.errors import UserError
from longrl.rewards.answer import extract_answer
from longrl.rewards.sandbox import Isolation, isolation, run_sandboxed

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)

# The program's harness: runs inside the sandbox. Limits first (soft = hard: the program cannot raise them), then
# stdout is moved to a private descriptor so the program's prints go nowhere.
HARNESS = r"""
import json, os, resource, sys
def _enc(v, depth=0):
    if depth > 64:
        raise ValueError("too deep")
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, complex):
        return {"complex": [v.real, v.imag]}
    if isinstance(v, (bytes, bytearray)):
        return {"bytes": bytes(v).hex()}
    if isinstance(v, list):
        return [_enc(x, depth + 1) for x in v]
    for kind in (tuple, frozenset, set):
        if isinstance(v, kind):
            return {kind.__name__: [_enc(x, depth + 1) for x in v]}
    if isinstance(v, dict):
        return {"dict": [[_enc(k, depth + 1), _enc(x, depth + 1)] for k, x in v.items()]}
    raise TypeError("not data: " + type(v).__name__)
def _run(payload, exec=exec, eval=eval, compile=compile, dumps=json.dumps):  # bound first: replacing builtins cannot mute tests
    for name, value in payload["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    out = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    module = type(sys)("__solution__")  # a real module, so multiprocessing can pickle its functions
    sys.modules["__solution__"] = module
    ns = module.__dict__
    ns["__builtins__"] = __builtins__
    try:
        exec(compile(payload["program"], "<program>", "exec"), ns)
    except BaseException:
        return
    for i, expr in enumerate(payload["exprs"]):
        try:
            line = dumps({"i": i, "v": _enc(eval(compile(expr, "<test>", "eval"), ns))})
        except BaseException as e:
            line = dumps({"i": i, "error": type(e).__name__})
        out.write(line + "\n")
        out.flush()
_run(json.loads(sys.stdin.buffer.read()))
"""


@dataclass
class SandboxLimits:
    timeout_s: float = 5.0
    """Wall-clock limit per response (the CPU limit is this plus one second)."""
    memory_mb: int = 1024
    """Address-space limit of each process; with `disk_mb`, also the cap on the memory of all
    its processes together (a memory cgroup, where one can be made)."""
    file_mb: int = 16
    """Largest file the program may write."""
    disk_mb: int = 32
    """Total it may write (a tmpfs of this size; enforced by the bwrap tier only)."""
    output_mb: float = 4.0
    """Most it may send back (the tests' values); past this the response scores 0."""
    max_procs: int = 64
    """Most processes and threads at once (a pids cgroup, where one can be made)."""


@dataclass(frozen=True)
class Check:
    """One test, split: `expr` runs in the sandbox; `expected` and `op` stay here."""

    expr: str
    op: str
    """A comparison operator ('==', 'in', 'is', ...), 'truthy' / 'falsy', or a tolerance:
    'isclose' (expected = (value, rel_tol, abs_tol)), 'abs<' / 'abs<=' (expected = (value, tol))."""
    expected: Any = None
    value_first: bool = True
    """`value op expected` (True) or `expected op value` (False, when the literal is on the left)."""

    def passes(self, value: Any) -> bool:
        if self.op in ("truthy", "falsy"):
            return bool(value) == (self.op == "truthy")
        if self.op in ("isclose", "abs<", "abs<="):
            if type(value) not in (int, float):
                return False
            if self.op == "isclose":
                target, rel_tol, abs_tol = self.expected
                return math.isclose(value, target, rel_tol=rel_tol, abs_tol=abs_tol)
            target, tol = self.expected
            return abs(value - target) < tol if self.op == "abs<" else abs(value - target) <= tol
        fn = _OPS[self.op]
        return bool(fn(value, self.expected) if self.value_first else fn(self.expected, value))


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
    ">=": operator.ge, "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
    "is": operator.is_, "is not": operator.is_not,
}
_AST_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
            ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}
_FORMS = ('write each test as "assert EXPR == VALUE" (VALUE a Python literal; also !=, <, <=, >, >=, in, '
          'not in, "is None/True/False"), "assert math.isclose(EXPR, VALUE)", "assert abs(EXPR - VALUE) < TOL", '
          '"assert EXPR" or "assert not EXPR", with no comparison, and/or or arithmetic on a literal inside EXPR: '
          'expected values are compared outside the sandbox')


def _literal(node: ast.expr) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _split(pair: Sequence[ast.expr], src: str) -> tuple[ast.expr, Any, bool]:
    """(expression side, literal value, literal-on-the-right) of a two-operand form."""
    left, right = pair
    (right_lit, right_val), (left_lit, left_val) = _literal(right), _literal(left)
    if right_lit:
        return left, right_val, True
    if left_lit:
        return right, left_val, False
    raise ValueError(f"test {src!r} compares two expressions; one side must be a Python literal")


def _number(value: Any, src: str) -> float:
    if type(value) not in (int, float):
        raise ValueError(f"test {src!r} needs a number there, not {value!r}")
    return value


def _tolerance_check(test: ast.expr, src: str) -> Check | None:
    """`math.isclose(EXPR, V, rel_tol=.., abs_tol=..)` or `abs(EXPR - V) < TOL`: compared here."""
    if isinstance(test, ast.Call) and ast.unparse(test.func) in ("math.isclose", "isclose") and len(test.args) == 2:
        expr, value, _ = _split(test.args, src)
        tols = {"rel_tol": 1e-9, "abs_tol": 0.0}
        for kw in test.keywords:
            ok, tol = _literal(kw.value)
            if kw.arg not in tols or not ok:
                raise ValueError(f"test {src!r}: isclose takes literal rel_tol= and abs_tol= only")
            tols[kw.arg] = _number(tol, src)
        return Check(ast.unparse(expr), "isclose", (_number(value, src), tols["rel_tol"], tols["abs_tol"]))
    if (isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in (ast.Lt, ast.LtE)
            and isinstance(test.left, ast.Call) and ast.unparse(test.left.func) == "abs" and len(test.left.args) == 1
            and isinstance(test.left.args[0], ast.BinOp) and isinstance(test.left.args[0].op, ast.Sub)):
        diff = test.left.args[0]
        expr, value, _ = _split((diff.left, diff.right), src)
        ok, tol = _literal(test.comparators[0])
        if not ok:
            raise ValueError(f"test {src!r}: the tolerance must be a literal")
        op = "abs<" if isinstance(test.ops[0], ast.Lt) else "abs<="
        return Check(ast.unparse(expr), op, (_number(value, src), _number(tol, src)))
    return None


def _check_of(test: ast.expr, src: str) -> Check:
    tolerance = _tolerance_check(test, src)
    if tolerance is not None:
        return tolerance
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        op = _AST_OPS[type(test.ops[0])]
        expr, value, value_first = _split((test.left, test.comparators[0]), src)
        if op in ("is", "is not") and not any(value is c for c in (None, True, False)):
            raise ValueError(f"test {src!r} uses 'is' with a value other than None, True or False")
        return Check(ast.unparse(expr), op, value, value_first)
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return Check(ast.unparse(test.operand), "falsy")
    return Check(ast.unparse(test), "truthy")


def _leaks(expr: ast.expr) -> str | None:
    """Why `expr` could carry an expected value into the sandbox, or None. Literals are fine as
    call arguments and indices (inputs); a comparison, and/or, or arithmetic between the
    program's value and a literal would let the program see, or rig, the result."""
    for node in ast.walk(expr):
        if isinstance(node, (ast.Compare, ast.BoolOp)):
            return "a comparison or and/or"
        if isinstance(node, ast.BinOp) and _literal(node.left)[0] != _literal(node.right)[0]:
            return f"arithmetic with a literal ({ast.unparse(node)})"
    return None


@functools.lru_cache(maxsize=4096)
def parse_test(src: str) -> Check:
    """Split one test into the expression the sandbox evaluates and what it is compared with.
    ValueError names what is wrong when `src` is not one of the supported forms."""
    try:
        tree = ast.parse(src.strip())
    except SyntaxError as e:
        raise ValueError(f"test {src!r} does not parse ({e.msg})") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise ValueError(f"test {src!r} is not one assert statement")
    check = _check_of(tree.body[0].test, src)
    why = _leaks(ast.parse(check.expr, mode="eval"))
    if why:
        raise ValueError(f"test {src!r} has {why} inside the expression the program evaluates")
    return check


def program_of(response_text: str) -> str | None:
    """The program in a response: its `<answer>` block, unwrapped from a ```python fence."""
    answer = extract_answer(response_text)
    if answer is None:
        return None
    fenced = _FENCE.search(answer)
    return fenced.group(1) if fenced else answer


def tests_of(example: Example) -> list[str]:
    """The example's tests as a list of snippets; UserError when missing, malformed or not
    one of the forms the trainer can compare (see the module docstring)."""
    tests = example.meta.get("tests")
    if isinstance(tests, str):
        tests = [tests]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise UserError(f'example {example.id!r}: reward.correctness=code needs "tests": a non-empty list of Python '
                        'snippets (e.g. ["assert add(1, 2) == 3"]) or one string')
    for t in tests:
        try:
            parse_test(t)
        except ValueError as e:
            raise UserError(f"example {example.id!r}: {e}; {_FORMS}") from None
    return tests


def decode(node: Any, depth: int = 0) -> Any:
    """A value the sandbox sent (tagged JSON) as a plain built-in value; ValueError if malformed."""
    if depth > 64:
        raise ValueError("nested too deep")
    if node is None or type(node) in (bool, int, float, str):
        return node
    if type(node) is list:
        return [decode(x, depth + 1) for x in node]
    if type(node) is not dict or len(node) != 1:
        raise ValueError("not a tagged value")
    (tag, body), = node.items()
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError(f"bad {tag!r} value")
    if tag == "complex" and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(body[0], body[1])
    items = [decode(x, depth + 1) for x in body]
    if tag in ("tuple", "set", "frozenset"):
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    if tag == "dict" and all(type(kv) is list and len(kv) == 2 for kv in items):
        return {k: v for k, v in items}
    raise ValueError(f"bad tagged value {tag!r}")


def _answers(stdout: bytes, n: int) -> dict[int, Any]:
    """The first valid value sent for each test index; malformed lines are ignored. Only the
    first lines are read (the harness writes n): a flood of tiny lines costs the trainer nothing."""
    values: dict[int, Any] = {}
    for line in stdout.split(b"\n", 4 * n + 64)[: 4 * n + 64]:
        if len(values) == n:
            break
        try:
            record = json.loads(line)
            i = record["i"]
            if type(i) is int and 0 <= i < n and i not in values and "v" in record:
                values[i] = decode(record["v"])
        except (ValueError, TypeError, KeyError, RecursionError, MemoryError):  # a hostile line is just no answer
            continue
    return values


def _passes(check: Check, value: Any) -> bool:
    try:
        return check.passes(value)
    except Exception:  # e.g. '<' between a str and an int: the test fails, as it would in Python
        return False


def run_tests(program: str, tests: list[str], limits: SandboxLimits | None = None,
              isolation_tier: str = "auto") -> float:
    """Fraction of `tests` whose expression, evaluated after `program` in the sandbox, returns
    a value that compares as the test says. `isolation_tier`: 'auto' or one of sandbox.TIERS."""
    limits = limits or SandboxLimits()
    try:
        checks = [parse_test(t) for t in tests]
    except ValueError as e:
        raise UserError(f"{e}; {_FORMS}") from None
    rlimits = {"RLIMIT_CPU": int(limits.timeout_s) + 1, "RLIMIT_AS": limits.memory_mb << 20,
               "RLIMIT_FSIZE": limits.file_mb << 20, "RLIMIT_CORE": 0}
    payload = json.dumps({"program": program, "exprs": [c.expr for c in checks], "limits": rlimits})
    run = run_sandboxed(HARNESS, payload.encode(), _resolve(isolation_tier), timeout_s=limits.timeout_s,
                        disk_mb=limits.disk_mb, output_mb=limits.output_mb, max_procs=limits.max_procs,
                        memory_mb=limits.memory_mb)
    if run.truncated:
        return 0.0
    values = _answers(run.stdout, len(checks))
    passed = sum(_passes(c, values[i]) for i, c in enumerate(checks) if i in values)
    return passed / len(checks)


def _resolve(tier: str) -> Isolation:
    if os.name != "posix":
        raise UserError("reward.correctness=code runs programs in a POSIX sandbox; use Linux (or macOS)")
    return isolation(tier)


def code_scorer(limits: SandboxLimits | None = None, isolation_tier: str = "auto"):
    """`correctness(response_text, example)` for `reward.correctness=code`. Picks the sandbox
    tier now, so that a weak one is announced when the run starts, not at the first reward."""
    _resolve(isolation_tier)

    def score(response_text: str, example: Example) -> float:
        program = program_of(response_text)
        if program is None or not program.strip():
            return 0.0
        return run_tests(program, tests_of(example), limits, isolation_tier)

    return score
