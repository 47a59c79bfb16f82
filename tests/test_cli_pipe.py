"""`longrl eval ... | head`: a reader that goes away early ends the command quietly."""

import os
import subprocess
import sys

# The command's output: far more than a pipe buffer, as an eval's --out-less JSON can be.
_PRINTS_A_LOT = ("import sys, longrl.cli as cli\n"
                 "cli.cmd_eval = lambda args: print('{\"x\": 1}\\n' * 100000) or 0\n"
                 "sys.exit(cli.main(['eval']))\n")


def test_closed_stdout_exits_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first write: every write is EPIPE
    try:
        p = subprocess.run([sys.executable, "-c", _PRINTS_A_LOT], stdout=write_end, stderr=subprocess.PIPE,
                           text=True, timeout=60)
    finally:
        os.close(write_end)
    assert p.returncode == 141  # 128 + SIGPIPE, as a shell reports for `yes | head`
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr and "Exception ignored" not in p.stderr
