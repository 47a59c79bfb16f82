"""`python`: run a snippet in the code reward's sandbox (`rewards/sandbox.py`) and show its
stdout (capped). The snippet is model-written, so it gets the same isolation tier as the
code verifier (bubblewrap where installed; weaker tiers are announced), a CPU/wall limit,
a memory cap and no network. Its stderr is dropped; a non-zero exit shows as an error line.
"""

from __future__ import annotations


class PythonTool:
    name = "python"
    description = "python(code): run the code, return what it prints"

    def __init__(self, timeout_s: float = 5.0, output_kb: int = 64, tier: str = "auto"):
        from longrl.rewards.sandbox import isolation

        self.timeout_s, self.output_kb = timeout_s, output_kb
        self.iso = isolation(tier)

    def __call__(self, code: str) -> str:
        from longrl.rewards.sandbox import run_sandboxed

        run = run_sandboxed(_HARNESS, code.encode("utf-8", "replace"), self.iso, timeout_s=self.timeout_s, disk_mb=16,
                            output_mb=self.output_kb / 1024)
        text = run.stdout.decode("utf-8", "replace")
        if run.timed_out:
            raise TimeoutError(f"the code ran past {self.timeout_s:g} s")
        return text + (" ...[truncated]" if run.truncated else "")


# Reads the snippet from stdin and runs it; an exception prints its last line (what a
# notebook shows) instead of a traceback of the harness.
_HARNESS = (
    "import sys\n"
    "src = sys.stdin.read()\n"
    "try:\n"
    "    exec(compile(src, '<tool>', 'exec'), {'__name__': '__main__'})\n"
    "except BaseException as e:\n"
    "    print(f'{type(e).__name__}: {e}')\n"
)
