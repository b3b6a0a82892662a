"""Paths and small measures every test area uses."""

from __future__ import annotations

import socket
from pathlib import Path

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of `a` against the reference `b`."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def free_port() -> int:
    """A TCP port free on loopback right now (servers and torchrun rendezvous in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
