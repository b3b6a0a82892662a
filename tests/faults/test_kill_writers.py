"""Every writer killed with SIGKILL at a random (seeded) moment while it rewrites its output: what is left is byte
for byte one complete version, loads, and the killed process's leftovers go with the next write."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.faults import WRITERS, check

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_killed_writers_leave_a_complete_output(tmp_path, seed):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLMKIT_FAULT_MAX_DELAY": "0.5"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "faults.py"), str(tmp_path), str(seed)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = json.loads((tmp_path / "killed.json").read_text())
    assert set(killed) == set(WRITERS)
    seen = {w: check(w, tmp_path) for w in WRITERS}
    print(json.dumps({"seed": seed, "killed_after_s": killed, "left": seen}))
