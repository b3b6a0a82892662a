"""`glmkit generate`: stop strings cut the streamed text (across token boundaries), the family's stop tokens end it,
and the penalty options reach the sampler."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.chat_models import build_tiny_glm4_model
from tests.helpers.common import REPO

pytestmark = pytest.mark.slow  # runs `glmkit generate` in a subprocess


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmkit", "generate", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_generate_stop_strings_and_penalties(tmp_path):
    model = str(build_tiny_glm4_model(tmp_path / "g4"))
    base = ["the river", "--model", model, "--temperature", "0", "--max-new-tokens", "24"]
    full = run(*base)
    assert full.returncode == 0, full.stderr
    text = full.stdout[:-1]  # the final newline
    visible = [i for i in range(2, len(text) - 3) if text[i:i + 3].strip() == text[i:i + 3] and "\ufffd" not in
               text[i:i + 3]]
    assert visible, f"no stop candidate in {text!r}"
    stop = text[visible[len(visible) // 2]: visible[len(visible) // 2] + 3]
    cut = run(*base, "--stop", stop, "--stop", "never-there")
    assert cut.returncode == 0 and cut.stdout == text[: text.find(stop)] + "\n"
    penalised = run(*base, "--frequency-penalty", "2", "--presence-penalty", "1")
    assert penalised.returncode == 0 and penalised.stdout != full.stdout
    bad = run(*base, "--presence-penalty", "9")
    assert bad.returncode == 2 and "--presence-penalty" in bad.stderr
