"""Exact folds of identical blocks for the graph view (`explorer.render.view`).

Consecutive numbered siblings (``layers.1`` .. ``layers.31``) fold into their first instance
when class, submodules, parameter shapes and op sequence are identical; a box marked (the
selected group's, a search hit) splits a fold unless every instance is marked. Ops of the
other instances map onto the representative's ops.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..graph.ir import Graph, OpNode


@dataclass
class Folds:
    """What folding decided."""

    opmap: dict[int, int] = field(default_factory=dict)  # op -> its representative op
    instance_of: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # op -> runs
    copies: dict[str, int] = field(default_factory=dict)  # representative box -> copies
    ranges: dict[str, str] = field(default_factory=dict)  # representative box -> its range


def fold_blocks(g: Graph, shown: list[OpNode], modules: list[str],
                marked: Callable[[str], bool], shapes: Mapping[str, tuple[int, ...]]
                ) -> Folds:
    """The folds of ``g``'s identical consecutive numbered siblings (``shown``: the ops
    drawn; ``modules``: the boxes holding them; ``marked``: boxes kept out of folds unless
    every instance is marked; ``shapes``: parameter and buffer shapes)."""
    folds = Folds()
    opmap, instance_of, copies, ranges = folds.opmap, folds.instance_of, folds.copies, \
        folds.ranges
    subtree_ops: dict[str, list[OpNode]] = {m: [] for m in modules}
    for op in g.ops:
        for m in ancestors_and_self(op.module):
            if m in subtree_ops:
                subtree_ops[m].append(op)
    siblings: dict[str, list[tuple[int, str]]] = {}
    for m in modules:
        container, _, last = m.rpartition(".")
        if last.isdigit():
            siblings.setdefault(container, []).append((int(last), m))
    removed: set[str] = set()
    run_id = 0
    for container in sorted(siblings, key=lambda c: (c.count("."), c)):
        if any(within(container, r) for r in removed):
            continue
        items = sorted(siblings[container])
        for run in _runs(g, items, subtree_ops, marked, shapes):
            rep = run[0]
            rep_ops = subtree_ops[rep]
            copies[rep] = len(run)
            first, last = run[0].rpartition(".")[2], run[-1].rpartition(".")[2]
            ranges[rep] = f"{container + '.' if container else ''}{first}-{last}"
            for k, inst in enumerate(run):
                for op, rop in zip(subtree_ops[inst], rep_ops, strict=True):
                    instance_of.setdefault(op.index, []).append((run_id, k))
                    if k:
                        opmap[op.index] = rop.index
                if k:
                    removed.add(inst)
            run_id += 1
    for i in list(opmap):  # nested folds: follow the map to its end
        j = opmap[i]
        while j in opmap:
            j = opmap[j]
        opmap[i] = j
    return folds

def _runs(g: Graph, items: list[tuple[int, str]], subtree_ops: dict[str, list[OpNode]],
          is_marked: Callable[[str], bool], shapes: Mapping[str, tuple[int, ...]]
          ) -> list[list[str]]:
    """Maximal runs of consecutive, identical, equally marked siblings (2 or more)."""
    sig = {m: _signature(g, m, subtree_ops[m], shapes) for _, m in items}
    marked = {m: is_marked(m) for _, m in items}
    if all(marked.values()):
        marked = dict.fromkeys(marked, False)  # the same in every instance: keep the fold
    runs: list[list[str]] = []
    current: list[str] = []
    prev_index = None
    for index, m in items:
        if current and prev_index == index - 1 and not marked[m] and \
                not marked[current[0]] and sig[m] == sig[current[0]]:
            current.append(m)
        else:
            if len(current) > 1:
                runs.append(current)
            current = [m]
        prev_index = index
    if len(current) > 1:
        runs.append(current)
    return runs

def _signature(g: Graph, module: str, ops: list[OpNode], shapes: Mapping[str, tuple[int, ...]]
               ) -> tuple[Any, ...]:
    n = len(module) + 1
    subs = tuple((k[n:], c) for k, c in g.modules.items() if k.startswith(module + "."))
    params = tuple((p[n:], shapes.get(p, ())) for p, owner in g.param_owner.items()
                   if within(owner, module))
    seq = tuple((op.name, op.module[n:], tuple(g.values[v].shape for v in op.outputs
                                                if v is not None)) for op in ops)
    return g.modules.get(module, ""), subs, params, seq


@functools.lru_cache(maxsize=4096)
def ancestors_and_self(module: str) -> tuple[str, ...]:
    """``"a.b.c"`` -> ``("a", "a.b", "a.b.c")`` (the root "" is not a box)."""
    if not module:
        return ()
    parts = module.split(".")
    return tuple(".".join(parts[:i]) for i in range(1, len(parts) + 1))


def within(name: str, module: str) -> bool:
    """Whether ``name`` is ``module`` or inside it."""
    return name == module or name.startswith(module + ".")
