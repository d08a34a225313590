"""Graphviz DOT of the graph view model (the download next to the interactive graph).

Reads `explorer.render.view` only: modules are clusters (open) or boxes (collapsed), edges
are dataflow between ops and collapsed boxes. Output is deterministic.
"""
from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable

from ..api import ModelGraph
from .view import NodeKind, ViewModel, ViewNode, build_view

_MEMBER_PEN = 2.5


def name_colour(name: str, saturation: float = 0.25) -> str:
    """A stable pastel colour for a name (same name, same colour, every run)."""
    h = int(hashlib.md5(name.encode()).hexdigest()[:6], 16) / 0xFFFFFF
    return f"{h:.3f} {saturation:.3f} 1.000"


def graph_to_dot(model_graph: ModelGraph, depth: int = 2, highlight_group: int | None = None,
                 fold_repeats: bool = True, highlight_modules: Iterable[str] = ()) -> str:
    """DOT text of the view model of ``model_graph`` as drawn at ``depth``.

    Expanded modules are clusters around their children and ops; collapsed ones are boxes
    with their in/out shapes and parameters. Reads `build_view` only.

    Args:
        model_graph: the traced model.
        depth: modules nested less deeply than this are open (1 = top-level boxes closed).
        highlight_group: id of a group: members filled with its colour, its chain in red.
        fold_repeats: fold identical repeated blocks (``blocks.0-11 x12``).
        highlight_modules: module names (a search result) whose boxes get a red border.
    """
    view = build_view(model_graph, depth, highlight_group, fold_repeats,
                      highlight_modules).visible()
    return view_to_dot(view, group_colour=None if highlight_group is None else name_colour(
        model_graph.groups()[highlight_group].title, 0.55))


def view_to_dot(view: ViewModel, group_colour: str | None = None) -> str:
    """DOT text of a (visible) view model."""
    children: dict[str | None, list[ViewNode]] = {}
    for n in view.nodes:
        children.setdefault(n.parent, []).append(n)
    lines = ["digraph model {", "  rankdir=TB; compound=true;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=8, color="#666666"];']
    _emit_nodes(children, None, lines, "  ", view.group, group_colour or "")
    for e in view.edges:
        hot = view.group is not None and view.group in e.group_ids
        style = ', color="#D62728", penwidth=2' if hot else ""
        lines.append(f"  {_quote(e.source)} -> {_quote(e.target)} "
                     f"[label={_quote(e.label)}{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _emit_nodes(children: dict[str | None, list[ViewNode]], parent: str | None,
                lines: list[str], indent: str, group: int | None, colour: str) -> None:
    for n in children.get(parent, []):
        member = group is not None and group in n.group_ids
        if n.kind is NodeKind.MODULE and n.expanded:
            lines.append(f"{indent}subgraph {_quote('cluster_' + n.id)} {{")
            lines.append(f"{indent}  label={_quote(n.label)}; style=\"rounded,filled\"; "
                         f"fillcolor={_quote(colour if member else '0.000 0.000 0.970')};")
            _emit_nodes(children, n.id, lines, indent + "  ", group, colour)
            lines.append(f"{indent}}}")
            continue
        label = "\n".join([n.label, *(n.detail if n.kind is NodeKind.MODULE else ())])
        cls = n.label.rpartition("(")[2].rstrip(")") if n.kind is NodeKind.MODULE else ""
        fill = colour if member else (name_colour(cls or n.label) if n.kind is not NodeKind.OP
                                      else "white")
        extra = f", penwidth={_MEMBER_PEN}" if member else ""
        if n.pins:
            extra += ", shape=octagon"
        if n.found:
            extra = ', color="#D62728", penwidth=3.5'
        lines.append(f"{indent}{_quote(n.id)} [label={_quote(label)}, "
                     f"fillcolor={_quote(fill)}{extra}];")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def has_dot() -> bool:
    """Whether the graphviz ``dot`` binary is installed (needed for SVG)."""
    return shutil.which("dot") is not None


def dot_to_svg(dot: str) -> bytes:
    """Render DOT to SVG with graphviz ``dot``.

    Raises:
        RuntimeError: if the ``dot`` binary is not installed.
    """
    if not has_dot():
        raise RuntimeError("graphviz 'dot' is not installed; install it with "
                           "'apt-get install graphviz' to export SVG")
    import graphviz
    return bytes(graphviz.Source(dot).pipe(format="svg"))
