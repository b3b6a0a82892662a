"""The package's layer rule (docs/architecture.md): every import, module-level or inside a function, points to the
same layer or a lower one, and no set of modules imports itself in a circle.

The walk reads the source with `ast` (nothing is imported), so a lazy import inside a function counts like any other:
it would hide a circle, not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "glmkit"

# Lowest first. A module may import its own layer or any layer below it. The same rank may hold several folders
# that do not depend on each other's internals (training, evaluation, serving); circles are checked separately.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("glmkit.core",)),
    ("quantization", ("glmkit.quant",)),
    ("adapters", ("glmkit.adapters",)),
    ("distributed", ("glmkit.distributed",)),
    ("loading", ("glmkit.loading",)),
    ("applications", ("glmkit.training", "glmkit.evaluation", "glmkit.serving")),
    ("commands", ("glmkit.commands",)),
    ("public", ("glmkit", "glmkit.__main__", "glmkit.fill", "glmkit.chat")),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that owns `module`."""
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    if best is None:
        raise ValueError(f"module {module} belongs to no layer; add its folder to LAYERS and docs/architecture.md")
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The glmkit modules `source` imports (absolute and relative, at any depth), resolved to known modules."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import name`: name is a submodule or an attribute of pkg
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import glmkit.core.model` names the module itself
                target = target.rpartition(".")[0]
            if target.startswith("glmkit") and target != module:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE, extra: dict[str, str] | None = None) -> dict[str, set[str]]:
    """module -> the glmkit modules it imports. `extra` adds (module -> source) entries, for the self-test."""
    sources = {module_name(p, root): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
               for p in sorted(root.rglob("*.py"))}
    for name, text in (extra or {}).items():
        sources[name] = (text, False)
    known = set(sources)
    return {m: imports_of(text, m, is_pkg, known) for m, (text, is_pkg) in sources.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                bad.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                           f"({LAYERS[layer_of(target)][0]}), a higher layer")
    return bad


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def circle_edges(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    members = set(component)
    return [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_imports_only_point_down():
    bad = upward_imports(import_graph())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circles():
    graph = import_graph()
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(" | ".join(circle_edges(graph, c)) for c in found)


APPLICATIONS = dict(LAYERS)["applications"]


def package_edges(graph: dict[str, set[str]], packages: tuple[str, ...] = APPLICATIONS) -> set[tuple[str, str]]:
    """(a, b) for each application package a with a module that imports a module of application package b."""
    def owner(module: str) -> str | None:
        return next((p for p in packages if module == p or module.startswith(p + ".")), None)

    return {(owner(m), owner(t)) for m, targets in graph.items() for t in targets
            if owner(m) and owner(t) and owner(m) != owner(t)}


def mutual_packages(graph: dict[str, set[str]]) -> list[str]:
    edges = package_edges(graph)
    return sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)


def test_applications_do_not_import_each_other_both_ways():
    """training, evaluation and serving sit side by side: one may use another (training uses evaluation's
    metrics), never both ways, even through different modules (what they share lives in a lower layer)."""
    found = mutual_packages(import_graph())
    assert not found, "application packages importing each other:\n" + "\n".join(found)


def test_the_rule_catches_an_upward_import_and_a_circle():
    """A core module that imports a command, even lazily inside a function, is reported with its edge; so is a
    circle through it."""
    sneaky = "def helper():\n    from glmkit.commands.cli import main\n    return main\n"
    graph = import_graph(extra={"glmkit.core.sneaky": sneaky})
    assert "glmkit.core.sneaky (core) imports glmkit.commands.cli (commands), a higher layer" in upward_imports(graph)
    looped = import_graph(extra={"glmkit.core.loop_a": "from glmkit.core import loop_b\n",
                                 "glmkit.core.loop_b": "import glmkit.core.loop_a\n"})
    assert ["glmkit.core.loop_a", "glmkit.core.loop_b"] in circles(looped)
    both = import_graph(extra={"glmkit.evaluation.sneaky": "from glmkit.training import trainer\n"})
    assert "glmkit.evaluation <-> glmkit.training" in mutual_packages(both)
    with pytest.raises(AssertionError, match="glmkit.core.sneaky"):
        bad = upward_imports(graph)
        assert not bad, "upward imports:\n" + "\n".join(bad)
