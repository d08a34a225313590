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
    "demos": {"quality"},  # `ModelKind` says what a demo's inputs are
    "render": {"graph", "coupling", "prune", "api", "quality"},
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


# -- import cycles ---------------------------------------------------------------------------
# Every import counts: module level, inside functions and under ``TYPE_CHECKING`` alike. An
# import inside a function defers the cycle to run time, it does not remove it (the two
# modules still need each other to work), and one under ``TYPE_CHECKING`` still ties their
# types together; so a cycle is a cycle wherever its imports sit. ``from . import x`` and
# ``from .pkg import x`` count as importing module ``x`` when ``x`` is a module. Importing a
# package's ``__init__`` is an edge to it; the parent packages a submodule import runs
# implicitly are not (every module would then reach ``explorer/__init__.py``).

# Module cycles that another branch removes; the lead deletes an entry when it lands.
KNOWN_CYCLES: list[set[str]] = [
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SOURCES}


def _module_edges() -> dict[str, set[str]]:
    """Module -> the explorer modules it imports (any import, anywhere in the file)."""
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        out = set()
        for imported in _imports(path):
            if imported in MODULES:
                out.add(imported)
            elif imported.rpartition(".")[0] in MODULES:  # `from pkg import name` of a name
                out.add(imported.rpartition(".")[0])
        edges[name] = out - {name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules() -> None:
    cycles = [c for c in _cycles(_module_edges()) if c not in KNOWN_CYCLES]
    assert not cycles, f"modules importing each other: {[sorted(c) for c in cycles]}"


def test_known_cycles_still_exist() -> None:
    """An entry of `KNOWN_CYCLES` whose cycle is gone is removed, so none comes back."""
    found = _cycles(_module_edges())
    stale = [sorted(c) for c in KNOWN_CYCLES if not any(c <= f for f in found)]
    assert not stale, f"no longer cycles: remove {stale} from KNOWN_CYCLES"


def test_no_import_cycle_between_packages() -> None:
    """Top-level packages (``explorer/<pkg>/`` and ``api.py``); the root ``__init__`` and
    ``__main__`` re-export and run everything, so they are left out."""
    edges: dict[str, set[str]] = {}
    for name, targets in _module_edges().items():
        pkg = name.split(".")[1] if name.count(".") else ""
        if pkg in ("", "__init__", "__main__"):
            continue
        edges.setdefault(pkg, set()).update(
            t.split(".")[1] for t in targets if t.count(".") and t.split(".")[1] != pkg)
    assert not _cycles(edges), f"packages importing each other: {_cycles(edges)}"


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# -- class sizes -----------------------------------------------------------------------------
MAX_CLASS_LINES = 400
# Classes another branch splits; the lead removes a name when it lands.
LARGE_CLASSES_PENDING: set[str] = set()


def _classes(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [(n.name, (n.end_lineno or n.lineno) - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, ast.ClassDef)]


def test_pending_large_classes_are_still_large() -> None:
    """A name of `LARGE_CLASSES_PENDING` whose class got small is removed from it."""
    sizes = {name: n for p in SOURCES for name, n in _classes(p)}
    done = sorted(c for c in LARGE_CLASSES_PENDING if sizes.get(c, 0) <= MAX_CLASS_LINES)
    assert not done, f"now at most {MAX_CLASS_LINES} lines: remove {done} from " \
                     f"LARGE_CLASSES_PENDING"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_class_over_400_lines(path: Path) -> None:
    big = [(name, n) for name, n in _classes(path)
           if n > MAX_CLASS_LINES and name not in LARGE_CLASSES_PENDING]
    assert not big, f"{path.relative_to(ROOT)}: classes over {MAX_CLASS_LINES} lines: {big}"


# -- layers inside prune/ --------------------------------------------------------------------
# mechanism (changes a model exactly) <- scores <- history (the timeline of edits and the
# decisions on it) <- policy (chooses what to cut); a module imports only its own layer or
# those before it. Every module of `prune/` has a layer (ARCHITECTURE.md, "Layers").
PRUNE_LAYERS: list[set[str]] = [
    {"removal", "transaction", "preflight", "validate", "fixups", "depth", "records"},
    {"importance", "calibration", "sequential", "trajectory"},
    {"history", "decisions"},
    {"joint", "proposal", "pruner", "statement", "sensitivity", "compensate", "reconstruct",
     "rebase", "offloaded", "settings", "counts", "outer", "choose", "uniform", "measured"},
]


def test_every_prune_module_has_a_layer() -> None:
    prune = ROOT / "prune"
    found = {p.relative_to(prune).parts[0].removesuffix(".py") for p in prune.rglob("*.py")}
    listed = set().union(*PRUNE_LAYERS)
    assert found - {"__init__"} == listed, sorted(found ^ listed)


def _prune_layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["explorer", "prune"] or len(parts) < 3:
        return None
    return next((k for k, layer in enumerate(PRUNE_LAYERS) if parts[2] in layer), None)


def test_prune_layers_import_downwards() -> None:
    bad = [f"{m} -> {t}" for m, targets in _module_edges().items() for t in targets
           if (a := _prune_layer(m)) is not None and (b := _prune_layer(t)) is not None
           and b > a]
    assert not bad, f"prune/ modules importing a layer above their own: {bad}"


# -- one home each ---------------------------------------------------------------------------
def _calls(path: Path, name: str) -> int:
    """How many calls in ``path`` go to an attribute or function called ``name``."""
    return sum(1 for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
               and (getattr(n.func, "attr", None) == name or getattr(n.func, "id", None) == name))


def test_the_n_lowest_scores_have_one_home() -> None:
    """Only `importance.lowest` ranks scores by ``argsort`` for a cut; the figures sort for
    drawing, the coupling analysis numbers families (neither picks what to remove)."""
    drawing = {"render/figures.py", "coupling/analyze.py", "coupling/resolve.py"}
    found = {str(p.relative_to(ROOT)) for p in SOURCES if _calls(p, "argsort")}
    assert found - drawing == {"prune/importance.py"}


def _mean_magnitudes(path: Path) -> int:
    """How many ``mean(abs(x))`` (or ``x.abs().mean()``) expressions ``path`` has."""
    def named(node: ast.AST, name: str) -> bool:
        return isinstance(node, ast.Call) and name in (getattr(node.func, "attr", None),
                                                       getattr(node.func, "id", None))
    return sum(1 for n in ast.walk(ast.parse(path.read_text())) if named(n, "mean") and (
        (n.args and named(n.args[0], "abs")) or
        isinstance(n.func, ast.Attribute) and named(n.func.value, "abs")))


def test_the_score_normalisation_has_one_home() -> None:
    """The global ranking compares axes by scores over their mean magnitude: that is
    `counts.normalised`, which the statement reads to quote the scores (it had a copy)."""
    found = {str(p.relative_to(ROOT)) for p in SOURCES if _mean_magnitudes(p)}
    assert found == {"prune/counts.py"}


def test_train_eval_modes_are_put_back_in_one_place() -> None:
    """Running a caller's model in eval mode and putting every submodule's own mode back is
    `graph.rng.evaluating` (calibration, evaluation, generation, latency and folds each
    had their own copy of the save-and-restore loop)."""
    found = {str(p.relative_to(ROOT)) for p in SOURCES for n in ast.walk(ast.parse(
        p.read_text())) if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Attribute) and t.attr == "training" for t in n.targets)}
    assert found == {"graph/rng.py"}


def test_an_ops_module_is_named_in_one_place() -> None:
    """Messages name the module an op ran in as `OpNode.scope` (``<root>`` for the model
    itself); ten coupling rules and the explanations each spelled ``module or '<root>'``."""
    spelled = {str(p.relative_to(ROOT)) for p in SOURCES if "or '<root>'" in p.read_text()
               or 'or "<root>"' in p.read_text()}
    assert spelled == {"graph/ir.py", "graph/tracer.py"}  # the tracer names a module, no op


def test_prune_loads_no_checkpoint() -> None:
    """Checkpoints are loaded by `explorer.io` (`io/specs`: `load_model`, `load_offloaded`);
    `prune/` works on the model it is given."""
    loaders = [str(p.relative_to(ROOT)) for p in SOURCES if _package_of(p) == "prune"
               and _calls(p, "from_pretrained")]
    assert not loaders


GROUPS_PAGE = [ROOT.parent / "pages" / "3_groups.py",
               *sorted((ROOT.parent / "pages" / "_groups").glob("*.py"))]


def test_groups_page_takes_its_words_and_rows_from_one_module() -> None:
    """`explorer.render.proposal_view` builds the Groups page's words, rows and charts; the
    page (with its sections, `pages/_groups/`) imports no other wording module."""
    used = {m for page in GROUPS_PAGE for m in _imports(page) if m.startswith("explorer.")}
    wording = {"explorer.app.display", "explorer.app.sources", "explorer.render.figures"}
    assert "explorer.render.proposal_view" in used
    assert not used & wording, sorted(used & wording)
