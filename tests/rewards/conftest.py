import os
from pathlib import Path

import pytest


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


@pytest.fixture
def running():
    """`running(marker)`: pids of live processes whose command line holds `marker`."""
    return _running
