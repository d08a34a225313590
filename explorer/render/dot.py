"""Graphviz DOT of a traced model, collapsed to a module depth, with repeated blocks folded.

Nodes are modules at the chosen depth (ops are aggregated, never drawn one by one), edges
are the dataflow between them. Only reads the `ModelGraph`; output is deterministic.
"""
from __future__ import annotations

import hashlib
import math
import re
import shutil
from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from ..api import ModelGraph
from ..graph.ir import Graph, ValueKind

INPUT, OUTPUT, ROOT = "input", "output", "(root)"
_INDEX = re.compile(r"^\d+$")
_MAX_PARAM_LINES = 4


def name_colour(name: str, saturation: float = 0.25) -> str:
    """A stable pastel colour for a name (same name, same colour, every run)."""
    h = int(hashlib.md5(name.encode()).hexdigest()[:6], 16) / 0xFFFFFF
    return f"{h:.3f} {saturation:.3f} 1.000"


def _at_depth(module: str, depth: int) -> str:
    if not module:
        return ROOT
    return ".".join(module.split(".")[:max(1, depth)])


def _fold_key(node: str, graph: Graph) -> tuple[str, int, str] | None:
    """(container, index, rest) for names like ``blocks.3`` or ``blocks.3.attn``."""
    parts = node.split(".")
    for i, part in enumerate(parts):
        if i and _INDEX.match(part):
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1:])
    return None


def _fold(nodes: list[str], graph: Graph, hot: set[str],
          found: AbstractSet[str] = frozenset()) -> dict[str, str]:
    """Map each node to its folded name; instances split by highlight, each part folded."""
    buckets: dict[tuple[str, str, bool, bool], list[tuple[int, str]]] = {}
    for n in nodes:
        key = _fold_key(n, graph)
        if key is not None:
            container, idx, rest = key
            buckets.setdefault((container, rest, n in hot, n in found), []).append((idx, n))
    out = {n: n for n in nodes}
    for (container, rest, _, _), members in buckets.items():
        if len(members) < 2:
            continue
        order = sorted(i for i, _ in members)
        label = f"{container}.{order[0]}-{order[-1]}" + (f".{rest}" if rest else "")
        for _, n in members:
            out[n] = f"{label} x{len(members)}"
    return out


def _hot_nodes(model_graph: ModelGraph, nodes: Iterable[str], group_id: int | None) -> set[str]:
    if group_id is None:
        return set()
    groups = model_graph.groups()
    if not 0 <= group_id < len(groups):
        raise ValueError(f"group {group_id} does not exist (the model has {len(groups)})")
    modules = {m.module for m in groups[group_id].members} | set(groups[group_id].modules)
    hot = set()
    for n in nodes:
        for m in modules:
            if (n == ROOT and m == "") or m == n or m.startswith(n + "."):
                hot.add(n)
                break
    return hot


def _found_nodes(nodes: Iterable[str], modules: Iterable[str]) -> set[str]:
    """Nodes that are, contain or lie inside one of ``modules`` (a search result)."""
    modules = [m for m in modules if m]
    return {n for n in nodes if n not in (INPUT, OUTPUT, ROOT) and any(
        m == n or m.startswith(n + ".") or n.startswith(m + ".") for m in modules)}


def _param_lines(graph: Graph, members: list[str], copies: int,
                 shapes: dict[str, tuple[int, ...]]) -> list[str]:
    m = members[0]
    names = [p for p, owner in graph.param_owner.items() if p in shapes and
             (owner == m or owner.startswith(m + ".") or (m == ROOT and owner == ""))]
    if not names:
        return []
    prefix = "" if members[0] == ROOT else members[0] + "."
    if len(names) <= _MAX_PARAM_LINES:
        lines = [f"{n[len(prefix):] if n.startswith(prefix) else n} "
                 f"{list(shapes[n])}" for n in names]
    else:
        total = sum(math.prod(shapes[n]) for n in names)
        lines = [f"{len(names)} params, {total:,} weights"]
    if copies > 1:
        lines[-1] += f" (each of {copies})"
    return lines


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def graph_to_dot(model_graph: ModelGraph, depth: int = 2, highlight_group: int | None = None,
                 fold_repeats: bool = True, highlight_modules: Iterable[str] = ()) -> str:
    """DOT text of ``model_graph`` with one node per module at ``depth``.

    Args:
        model_graph: the traced model.
        depth: module nesting depth of a node (1 = top-level children of the model).
        highlight_group: id of a group whose modules are filled with its colour.
        fold_repeats: fold ``blocks.0`` .. ``blocks.11`` into one ``blocks.0-11 x12`` node.
        highlight_modules: module names (a search result) whose nodes get a red border.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    graph = model_graph.graph
    node_of_module: dict[str, str] = {}
    producer_node: dict[int, str] = dict.fromkeys(graph.inputs, INPUT)
    nodes: dict[str, list[str]] = {INPUT: [INPUT]}  # node -> raw members, insertion ordered
    ops_in: dict[str, int] = {}
    edges: dict[tuple[str, str], tuple[int, ...]] = {}
    for op in graph.ops:
        node = node_of_module.get(op.module)
        if node is None:
            node = node_of_module[op.module] = _at_depth(op.module, depth)
        nodes.setdefault(node, [node])
        ops_in[node] = ops_in.get(node, 0) + 1
        for vid in graph.tensor_ids((op.args, op.kwargs)):
            source = producer_node.get(vid)
            if source is not None and source != node and (source, node) not in edges:
                edges[(source, node)] = graph.values[vid].shape
        for out_vid in op.outputs:
            if out_vid is not None:
                producer_node[out_vid] = node
    for vid in graph.outputs:
        src = producer_node.get(vid)
        if src is not None and (src, OUTPUT) not in edges:
            edges[(src, OUTPUT)] = graph.values[vid].shape
    nodes[OUTPUT] = [OUTPUT]
    hot = _hot_nodes(model_graph, nodes, highlight_group)
    found = _found_nodes(nodes, highlight_modules)
    folded = _fold(list(nodes), graph, hot, found) if fold_repeats else {n: n for n in nodes}
    return _emit(model_graph, nodes, folded, edges, hot, ops_in, highlight_group, found)


def _emit(model_graph: ModelGraph, nodes: dict[str, list[str]], folded: dict[str, str],
          edges: dict[tuple[str, str], tuple[int, ...]], hot: set[str], ops_in: dict[str, int],
          highlight_group: int | None, found: AbstractSet[str] = frozenset()) -> str:
    graph = model_graph.graph
    members: dict[str, list[str]] = {}
    for n in nodes:
        members.setdefault(folded[n], []).append(n)
    shapes = {v.name: v.shape for v in graph.values.values()
              if v.kind == ValueKind.PARAM and v.name is not None}
    group_colour = ""
    if highlight_group is not None:
        group_colour = name_colour(model_graph.groups()[highlight_group].title, 0.55)
    lines = ["digraph model {", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=8, color="#666666"];']
    for name, raw in members.items():
        first = raw[0]
        cls = graph.modules.get(first, "") if first not in (INPUT, OUTPUT, ROOT) else ""
        label = [name + (f" ({cls})" if cls else "")]
        if first not in (INPUT, OUTPUT):
            label.append(f"{sum(ops_in.get(r, 0) for r in raw)} ops")
            label += _param_lines(graph, raw, len(raw), shapes)
        fill = group_colour if any(r in hot for r in raw) else name_colour(cls or name)
        extra = ", penwidth=2.5" if any(r in hot for r in raw) else ""
        if any(r in found for r in raw):
            extra = ', color="#D62728", penwidth=3.5'
        lines.append(f"  {_quote(name)} [label={_quote(chr(10).join(label))}, "
                     f"fillcolor={_quote(fill)}{extra}];")
    seen: set[tuple[str, str]] = set()
    for (src, dst), shape in edges.items():
        a, b = folded[src], folded[dst]
        if a == b or (a, b) in seen:
            continue
        seen.add((a, b))
        lines.append(f"  {_quote(a)} -> {_quote(b)} [label={_quote(str(list(shape)))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


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
    svg: bytes = graphviz.Source(dot).pipe(format="svg")
    return svg
