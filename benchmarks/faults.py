"""The fault suite (tests/faults) over many seeds: every writer killed at N random moments, fine-tuning (every
method) and calibrated quantization killed at N random moments and restarted, N times as many corrupted files.

    python benchmarks/faults.py --seeds 20          # about 20x the CI run's time
    python benchmarks/faults.py --seeds 5 -k writers

Prints pytest's summary; the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="seeds per kill test (and x6 corrupted files each)")
    parser.add_argument("-k", default=None, help="pytest -k expression to pick tests")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    env = {**os.environ, "GLMKIT_FAULT_SEEDS": str(args.seeds),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "faults"), "-p", "no:cacheprovider"]
    if args.k:
        cmd += ["-k", args.k]
    return subprocess.call(cmd, env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
