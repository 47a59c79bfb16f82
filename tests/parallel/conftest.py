import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the test modules import _records


@pytest.fixture(scope="session")
def run_worker(tmp_path_factory):
    """Run a multi-process worker script once; return the JSON records it wrote."""
    def run(worker, name, *args):
        out = tmp_path_factory.mktemp(name) / "records.json"
        proc = subprocess.run([sys.executable, str(worker), str(out), *map(str, args)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(out.read_text())
    return run

