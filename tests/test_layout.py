"""The package layout is the pipeline: imports only flow downstream (checked on the AST)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import explorer

ROOT = Path(explorer.__file__).parent

# package -> the explorer packages it may import (itself always allowed). See ARCHITECTURE.md.
ALLOWED: dict[str, set[str]] = {
    "graph": set(),
    "coupling": {"graph"},
    "prune": {"graph", "coupling"},
    "io": {"graph", "coupling", "prune", "demos", "api", "quality"},
    "demos": {"io"},  # the llama demo reuses the built-in transformers config
    "render": {"graph", "coupling", "prune", "api"},
    "quality": {"graph", "coupling", "prune"},
    "teach": {"graph", "coupling", "prune", "demos"},
    "app": {"graph", "coupling", "prune", "io", "render", "teach", "demos", "api", "quality"},
    "api": {"graph", "coupling", "prune"},
}


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0].removesuffix(".py") if len(rel) > 1 or rel[0] == "api.py" else ""


def _imports(path: Path) -> set[str]:
    """Absolute dotted names of every module ``path`` imports (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(ROOT.parent).with_suffix("").parts
    here = list(rel[:-1]) if rel[-1] != "__init__" else list(rel[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x: x may be a module
                    out |= {f"{mod}.{a.name}" for a in node.names}
                out.add(mod)
            else:
                out.add(node.module or "")
    return out


SOURCES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_never_imports_streamlit(path: Path) -> None:
    bad = {m for m in _imports(path) if m.split(".")[0] == "streamlit"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", [p for p in SOURCES if _package_of(p) in ALLOWED],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_downstream(path: Path) -> None:
    pkg = _package_of(path)
    used = {m.split(".")[1] for m in _imports(path)
            if m.startswith("explorer.") and len(m.split(".")) > 1}
    used = {u.removesuffix(".py") for u in used} - {pkg}
    bad = used - ALLOWED[pkg]
    assert not bad, f"{path.relative_to(ROOT)} ({pkg}) may not import {sorted(bad)}"


def test_every_package_has_a_rule() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(ALLOWED), sorted(packages - set(ALLOWED))


# Layers inside explorer/prune (ARCHITECTURE.md): mechanism -> history -> policy. A module
# imports modules of its own layer or of the layers before it, never of a later one.
PRUNE_LAYERS: dict[str, int] = {
    **dict.fromkeys(["removal", "transaction", "validate", "fixups", "preflight", "depth",
                     "calibration", "importance", "compensate", "reconstruct", "rebase",
                     "sequential", "joint", "records"], 0),  # mechanism: how a model changes
    **dict.fromkeys(["history", "decisions"], 1),  # the timeline of edits and decisions
    **dict.fromkeys(["settings", "counts", "outer", "proposal", "choose", "pruner",
                     "statement", "sensitivity"], 2),  # policy: what to cut
}
PRUNE = ROOT / "prune"


def _prune_module(name: str) -> str | None:
    """``explorer.prune.x[.y]`` -> ``x`` (the layer key), else None."""
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["explorer", "prune"] else None


def test_every_prune_module_has_a_layer() -> None:
    found = {p.relative_to(PRUNE).parts[0].removesuffix(".py") for p in PRUNE.rglob("*.py")}
    assert found - {"__init__"} == set(PRUNE_LAYERS), sorted(found ^ set(PRUNE_LAYERS))


@pytest.mark.parametrize("path", sorted(PRUNE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PRUNE)))
def test_prune_layers_flow_upward(path: Path) -> None:
    here = path.relative_to(PRUNE).parts[0].removesuffix(".py")
    if here == "__init__":
        return
    later = sorted(m for m in filter(None, map(_prune_module, _imports(path)))
                   if PRUNE_LAYERS[m] > PRUNE_LAYERS[here])
    assert not later, f"prune/{path.relative_to(PRUNE)} (layer {PRUNE_LAYERS[here]}) may not " \
                      f"import {later}"


def test_prune_modules_import_no_cycle() -> None:
    """No two modules of explorer/prune import each other, directly or around a loop (type-only
    imports count: a protocol stands in where a module needs another's type)."""
    graph = {p.relative_to(ROOT.parent).with_suffix("").as_posix().replace("/", "."):
             {m for m in _imports(p) if m.startswith("explorer.prune.")}
             for p in PRUNE.rglob("*.py") if p.name != "__init__.py"}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(node):], node]))
        if node in done or node not in graph:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*stack, node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
