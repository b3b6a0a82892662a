"""Servers in their own processes (`glmkit serve`, scripted apps), and the marks of the tests that drive them in a
browser."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.common import REPO, free_port


class ServerProcess:
    """A server in its own process (argv run from the repository root) on a free loopback port, with its log
    (log_dir/NAME-PORT.log) kept for failure messages; ready once GET `ready_path` answers 200. The port is picked
    first: the command line is `argv(port)`."""

    def __init__(self, argv, log_dir: Path, *, name: str, ready_path: str = "/health", timeout: float = 90) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (Path(log_dir) / f"{name.replace(' ', '-')}-{self.port}.log").open("w+")
        self.proc = subprocess.Popen(argv(self.port), cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{name} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{name} did not come up:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Server(ServerProcess):
    """`python -m glmkit serve` in a subprocess, with its log kept for failure messages."""

    def __init__(self, model: Path, *extra: str) -> None:
        super().__init__(lambda port: [sys.executable, "-m", "glmkit", "serve", "--port", str(port), "--model",
                                       str(model), *extra], model.parent, name="glmkit serve")


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

BROWSER_MARKS = [  # a module's pytestmark: needs Chromium, skipped without it
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"{CHROMIUM} is missing: install Debian's chromium (scripts/install_browser.sh)"),
]
