"""README.md and docs/*.md stay true: every block marked runnable runs, every output shown as real is what its
command prints now, and every relative link, anchor and repository path they name exists.

The markers and the runner are scripts/regen_doc_outputs.py's (its docstring says how to mark a block).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from tests.helpers.common import REPO

_spec = importlib.util.spec_from_file_location("regen_doc_outputs", REPO / "scripts" / "regen_doc_outputs.py")
regen = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("regen_doc_outputs", regen)  # dataclasses look their module up there
_spec.loader.exec_module(regen)

DOCS = regen.doc_files()
BLOCKS = [b for path in DOCS for b in regen.blocks(path)]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# a backticked path into the repository's own folders, e.g. `glmkit/core/model.py` or `scripts/demo.sh`
REPO_PATH = re.compile(r"`((?:glmkit|scripts|benchmarks|tests|configs|docs)/[^`\s]*)`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_readme_is_a_front_page():
    size = len((REPO / "README.md").read_bytes())
    assert size < 16 * 1024, f"README.md is {size} bytes; detail belongs in docs/"


def test_there_are_runnable_blocks_and_outputs():
    kinds = {(b.kind, b.path.name) for b in BLOCKS}
    assert ("run", "README.md") in kinds and ("output", "README.md") in kinds
    assert sum(b.kind == "run" for b in BLOCKS) >= 5


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_links_and_anchors_resolve(path):
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{path.name}: broken links: {broken}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_repository_paths_named_exist(path):
    missing = []
    for name in REPO_PATH.findall(path.read_text(encoding="utf-8")):
        name = name.rstrip(".,:;)")
        if any(c in name for c in "*{<[") or "..." in name:
            continue  # a pattern, not a path
        name, _, test = name.partition("::")  # pytest's file::test names a test in the file
        if not (REPO / name).exists():
            missing.append(name)
        elif test and f"def {test.split('::')[-1]}(" not in (REPO / name).read_text(encoding="utf-8"):
            missing.append(f"{name}::{test}")
    assert not missing, f"{path.name} names files that do not exist: {missing}"


def test_a_misplaced_marker_is_an_error(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("<!-- run -->\nplain text\n")
    with pytest.raises(ValueError, match="right above a fence"):
        regen.blocks(doc)
    doc.write_text("<!-- output -->\n```\nno command line\n```\n")
    with pytest.raises(ValueError, match=r"\$ COMMAND"):
        regen.command_of(regen.blocks(doc)[0])


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "run"], ids=lambda b: b.where)
def test_runnable_block_runs(block):
    out = regen.run_block(block)
    assert out.returncode == 0, f"{block.where} failed ({out.returncode}):\n{block.body}\n--- stderr:\n{out.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "output"], ids=lambda b: b.where)
def test_shown_output_is_current(block):
    assert regen.fresh_body(block) == block.body, (
        f"{block.where} is stale: run `python scripts/regen_doc_outputs.py` and review the diff")
