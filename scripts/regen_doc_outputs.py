"""Regenerates the outputs README.md and docs/*.md show as real output, and says which blocks are runnable.

Markers (an HTML comment on the line right before a block; GitHub does not render it):
- `<!-- run -->` before a ```bash or ```python fence: the block runs as it is, from the repository root, on
  glm-tiny or on the tiny checkpoints under tests/data (tests/test_docs.py runs every one).
- `<!-- output -->` before a fence whose first line is `$ COMMAND`: the rest of the fence is COMMAND's stdout.
- `<!-- output: COMMAND -->` before a fence or a markdown table: all of it is COMMAND's stdout.
  `scripts/demo.sh` as COMMAND means the demo's commands after its setup (it installs nothing here).

Commands run under bash with `glmkit` meaning this Python's `python -m glmkit` and this checkout on PYTHONPATH.

Usage: python scripts/regen_doc_outputs.py [--check]   (--check: exit 1 and list the blocks that are stale)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- (run|output)(?::\s*(.*?))?\s*-->$")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass
class Block:
    path: Path
    kind: str  # "run" or "output"
    command: str | None  # the marker's COMMAND (output blocks)
    lang: str  # the fence's info string; "table" for a markdown table
    start: int  # index of the block's first line (the opening fence or the table's first row)
    end: int  # index one past its last line (past the closing fence)
    body: str  # the text between the fences, or the table

    @property
    def where(self) -> str:
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{path}:{self.start + 1}"


def blocks(path: Path) -> list[Block]:
    """Every marked block of a markdown file; a marker not followed by a block is an error."""
    lines = path.read_text(encoding="utf-8").split("\n")
    found = []
    for i, line in enumerate(lines):
        m = MARKER.match(line.strip())
        if not m:
            continue
        start = i + 1
        if start >= len(lines):
            raise ValueError(f"{path}:{i + 1}: marker at the end of the file")
        opening = lines[start]
        if opening.startswith("```"):
            end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"{path}:{start + 1}: unclosed fence")
            found.append(Block(path, m.group(1), m.group(2), opening[3:].strip(), start, end + 1,
                               "\n".join(lines[start + 1:end])))
        elif opening.startswith("|") and m.group(1) == "output":
            end = start
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            found.append(Block(path, "output", m.group(2), "table", start, end, "\n".join(lines[start:end])))
        else:
            raise ValueError(f"{path}:{i + 1}: a {m.group(1)} marker must sit right above a fence or a table")
    return found


def environment(bin_dir: Path) -> dict[str, str]:
    """PATH with a `glmkit` that runs this checkout through this Python."""
    shim = bin_dir / "glmkit"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m glmkit "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def demo_commands() -> str:
    """scripts/demo.sh after its setup lines (everything past `. .venv/bin/activate`)."""
    lines = (REPO / "scripts" / "demo.sh").read_text(encoding="utf-8").split("\n")
    start = next(i for i, line in enumerate(lines) if line.strip() == ". .venv/bin/activate") + 1
    return "\n".join(lines[start:])


def run_block(block: Block, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs a `run` block: bash under `set -euo pipefail`, python as a script."""
    with tempfile.TemporaryDirectory() as tmp:
        env = environment(Path(tmp))
        if block.lang == "python":
            argv = [sys.executable, "-c", block.body]
        elif block.lang in ("bash", "sh"):
            argv = ["bash", "-euo", "pipefail", "-c", block.body]
        else:
            raise ValueError(f"{block.where}: a runnable block must be bash or python, not {block.lang!r}")
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def command_of(block: Block) -> str:
    if block.command:
        return demo_commands() if block.command == "scripts/demo.sh" else block.command
    first = block.body.split("\n", 1)[0]
    if not first.startswith("$ "):
        raise ValueError(f"{block.where}: an output block without a command must start with '$ COMMAND'")
    return first[2:]


def fresh_body(block: Block, timeout: float = 300) -> str:
    """What an output block should hold now."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", command_of(block)], cwd=REPO,
                             env=environment(Path(tmp)), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{block.where}: the command failed ({out.returncode}):\n{out.stderr[-2000:]}")
    text = out.stdout.rstrip("\n")
    return text if block.command else f"$ {block.body.split(chr(10), 1)[0][2:]}\n{text}"


def regenerate(path: Path, check: bool = False) -> list[str]:
    """Rewrites the output blocks of `path` (or, with check, only lists the stale ones)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    stale = []
    for block in reversed([b for b in blocks(path) if b.kind == "output"]):
        body = fresh_body(block)
        if body == block.body:
            continue
        stale.append(block.where)
        new = body.split("\n") if block.lang == "table" else [lines[block.start], *body.split("\n"), "```"]
        lines[block.start:block.end] = new
    if stale and not check:
        path.write_text("\n".join(lines), encoding="utf-8")
    return stale


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = [where for path in doc_files() for where in regenerate(path, check)]
    for where in stale:
        print(("stale: " if check else "updated: ") + where)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
