"""Fault tests: GLMKIT_FAULT_SEEDS=N (default 1) runs each kill test with seeds 0..N-1 (benchmarks/faults.py sets
it for the longer run)."""

import os


def pytest_generate_tests(metafunc):
    if "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", range(int(os.environ.get("GLMKIT_FAULT_SEEDS", "1"))))
