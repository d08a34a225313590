"""The graph view model: plain data that every graph renderer reads (component, DOT, CLI, tests).

Built from a traced `ModelGraph` (its ATen `Graph` and `Coupling`):

* **Nesting, not siblings.** A module is a MODULE node, the parent of its child modules and of
  its own ops. It is never joined by an edge to what it contains. Edges are dataflow between
  ops; `ViewModel.visible` moves each endpoint to its outermost collapsed ancestor, so a drawn
  edge joins ops or collapsed boxes and never a node to its own ancestor or descendant.
* **Folding only what is identical.** Consecutive numbered siblings (``layers.1`` ..
  ``layers.31``) fold into their first instance when class, submodules, parameter shapes and
  op sequence are identical; the label states the exact range and count. Ops of the other
  instances map onto the representative's ops; edges from one instance to the next are the
  repetition itself and are dropped.
* **Groups.** An edge carries the groups whose channels flow along its tensor (one of the
  group's atom families is in one of its dims): the edges of a group are its op-level coupling
  chain, for DINO's qkv group ``qkv`` -> reshape to (3, heads, dims) -> select 0/1/2 ->
  attention -> reshape -> ``proj``. An op carries the groups of its edges and of the member
  parameters it uses; a box those of everything inside it (a fold: the parameter groups of
  every instance).
* Ops that only prepare parameters (a weight's ``t``, factory ops) are not drawn; their
  parameters count for the op that consumes them.

Depth sets what is expanded at first, not what exists: every module and op is in the model.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..api import ModelGraph
from ..coupling.groups import Group, common_prefix
from ..coupling.vocab import AxisRole
from ..graph.ir import Graph, OpNode, ValueKind
from .folds import Folds, ancestors_and_self, fold_blocks, within

_OP_WORDS = {
    "view": "reshape", "_unsafe_view": "reshape", "reshape": "reshape", "addmm": "linear",
    "mm": "matmul", "bmm": "matmul", "convolution": "conv", "native_layer_norm": "layer_norm",
    "_native_batch_norm_legit_no_training": "batch_norm", "native_batch_norm": "batch_norm",
    "_native_batch_norm_legit": "batch_norm", "_softmax": "softmax",
}
_MAX_PARAM_LINES = 3
_MAX_CHAIN_OPENED = 80  # a longer chain (a residual stream) is shown on closed boxes


class NodeKind(enum.Enum):
    """What a view node stands for."""

    INPUT = "input"  # a tensor input of the model
    OUTPUT = "output"  # a tensor output of the model
    MODULE = "module"  # a module: a box around its children and its own ops
    OP = "op"  # one ATen op call


@dataclass(frozen=True)
class ViewNode:
    """One node of the view model (the API fields first, then what renderers use)."""

    id: str
    label: str
    parent: str | None  # id of the enclosing MODULE node, None at the top level
    kind: NodeKind
    group_ids: tuple[int, ...]
    module: str = ""  # its module (MODULE) or the module that ran it (OP)
    detail: tuple[str, ...] = ()  # in/out tensors and parameter summary (boxes), file:line
    expanded: bool = False  # MODULE: open at first
    copies: int = 1  # MODULE: identical instances this node stands for
    primary_group: int | None = None  # the group that clicking this node selects
    chain: bool = False  # on the selected group's coupling chain
    pins: str = ""  # OP: why it fixes an axis of the selected group (e.g. a select)
    found: bool = False  # MODULE: matches the search
    unsafe: str = ""  # the selected group is unsafe: where pruning it breaks the forward
    # (on the ops holding its parameters and on the module the failure names)


@dataclass(frozen=True)
class ViewEdge:
    """Dataflow of one tensor between two nodes."""

    source: str
    target: str
    shape: tuple[int, ...]
    group_ids: tuple[int, ...]
    coupled: tuple[int, ...] = ()  # dims of ``shape`` that carry the selected group

    @property
    def label(self) -> str:
        """The shape, with the selected group's dims starred: ``[1, 17, 3*, 6*, 16*]``."""
        return "[" + ", ".join(f"{s}*" if i in self.coupled else str(s)
                               for i, s in enumerate(self.shape)) + "]"


@dataclass
class ViewModel:
    """Nodes (every module and drawn op) and op-level edges, plus the expansion to start from."""

    nodes: list[ViewNode]
    edges: list[ViewEdge]
    group: int | None = None  # the selected group
    depth: int = 2
    _by_id: dict[str, ViewNode] = field(default_factory=dict, repr=False)

    def node(self, node_id: str) -> ViewNode:
        """The node with id ``node_id``."""
        if not self._by_id:
            self._by_id = {n.id: n for n in self.nodes}
        return self._by_id[node_id]

    def ancestors(self, node_id: str) -> list[str]:
        """Ids of the boxes around ``node_id``, innermost first."""
        out: list[str] = []
        parent = self.node(node_id).parent
        while parent is not None:
            out.append(parent)
            parent = self.node(parent).parent
        return out

    def visible(self, expanded: Iterable[str] | None = None) -> ViewModel:
        """What is drawn when exactly the boxes ``expanded`` are open (default: as built).

        Nodes inside a collapsed box disappear; their edges move to that box, duplicates
        merge (group ids joined) and edges inside one box vanish.
        """
        opened = ({n.id for n in self.nodes if n.expanded} if expanded is None
                  else set(expanded))
        rep: dict[str, str] = {}
        for n in self.nodes:  # parents come before children
            outer = rep.get(n.parent) if n.parent is not None else None
            if outer is not None and outer != n.parent:
                rep[n.id] = outer  # inside a collapsed box further out
            elif n.parent is not None and n.parent not in opened:
                rep[n.id] = rep.get(n.parent, n.parent)
            else:
                rep[n.id] = n.id
        nodes = [replace(n, expanded=n.id in opened and n.kind is NodeKind.MODULE)
                 for n in self.nodes if rep[n.id] == n.id]
        merged: dict[tuple[str, str], ViewEdge] = {}
        for e in self.edges:
            a, b = rep[e.source], rep[e.target]
            if a == b:
                continue
            old = merged.get((a, b))
            if old is None:
                merged[(a, b)] = replace(e, source=a, target=b)
            else:
                merged[(a, b)] = replace(old, group_ids=tuple(sorted(
                    set(old.group_ids) | set(e.group_ids))), coupled=old.coupled or e.coupled)
        return ViewModel(nodes, list(merged.values()), self.group, self.depth)

    def subgraph(self, hops: int = 1) -> ViewModel:
        """The selected group's ops (members and chain), ``hops`` ops of context, their boxes.

        Every box is open: this is the picture of one proposal, not of the model.

        Raises:
            ValueError: when no group is selected.
        """
        if self.group is None:
            raise ValueError("a subgraph needs a selected group (build_view(..., group=ID))")
        keep = {n.id for n in self.nodes if n.kind is NodeKind.OP and self.group in n.group_ids}
        for _ in range(hops):
            keep |= {e.target for e in self.edges if e.source in keep} | \
                    {e.source for e in self.edges if e.target in keep}
        boxes = {a for n in keep for a in self.ancestors(n)}
        nodes = [replace(n, expanded=n.kind is NodeKind.MODULE) for n in self.nodes
                 if n.id in keep or n.id in boxes]
        edges = [e for e in self.edges if e.source in keep and e.target in keep]
        return ViewModel(nodes, edges, self.group, self.depth)

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """``{"nodes": [...], "edges": [...]}`` with exactly the API fields."""
        return {
            "nodes": [{"id": n.id, "label": n.label, "parent": n.parent, "kind": n.kind.value,
                       "group_ids": list(n.group_ids)} for n in self.nodes],
            "edges": [{"source": e.source, "target": e.target, "shape": list(e.shape),
                       "group_ids": list(e.group_ids)} for e in self.edges],
        }

    def to_component(self) -> dict[str, Any]:
        """Everything the interactive component draws (op-level edges, expansion, marks)."""
        return {
            "group": self.group,
            "nodes": [{"id": n.id, "label": n.label, "parent": n.parent, "kind": n.kind.value,
                       "group_ids": list(n.group_ids), "module": n.module,
                       "detail": list(n.detail), "expanded": n.expanded, "copies": n.copies,
                       "primary_group": n.primary_group, "chain": n.chain, "pins": n.pins,
                       "found": n.found, "unsafe": n.unsafe} for n in self.nodes],
            "edges": [{"source": e.source, "target": e.target, "label": e.label,
                       "group_ids": list(e.group_ids), "coupled": bool(e.coupled)}
                      for e in self.edges],
        }


# -- building ---------------------------------------------------------------------------------

def build_view(model_graph: ModelGraph, depth: int = 2, group: int | None = None,
               fold: bool = True, search: Iterable[str] = (),
               unsafe: Mapping[int, str] | None = None) -> ViewModel:
    """The view model of ``model_graph``.

    Args:
        model_graph: the traced model (only read).
        depth: modules nested less deeply than this start expanded (1 = top-level boxes
            closed); boxes on the selected group's chain are expanded too.
        group: id of the selected group: its chain is marked, its boxes expanded, and folds
            that hold it in some but not all instances are split.
        fold: fold identical repeated blocks.
        search: module names to mark as found (they are kept out of folds, like ``group``).
        unsafe: group id -> where pruning it breaks the forward (``"module file:line"``).

    Raises:
        ValueError: for a depth below 1 or a group id the model does not have.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    groups = model_graph.groups()
    if group is not None and not 0 <= group < len(groups):
        raise ValueError(f"group {group} does not exist (the model has {len(groups)})")
    return _Builder(model_graph, depth, group, fold, set(search), dict(unsafe or {})).build()


class _Builder:
    def __init__(self, mg: ModelGraph, depth: int, group: int | None, fold: bool,
                 search: set[str], unsafe: dict[int, str]) -> None:
        self.mg, self.g, self.depth, self.group = mg, mg.graph, depth, group
        self.fold, self.search, self.unsafe = fold, {s for s in search if s}, unsafe
        self.shapes = {v.name: v.shape for v in self.g.values.values()
                       if v.name and v.kind in (ValueKind.PARAM, ValueKind.BUFFER)}
        self.params = {v.name for v in self.g.values.values()
                       if v.name and v.kind is ValueKind.PARAM}
        groups = mg.groups()
        self.param_groups, self.dim0_group, self.home, self.fam_groups = _group_index(groups)
        self.group_modules: set[str] = set()
        self.param_primary: set[str] = set()  # ops whose click group is a parameter's
        self.pinned_fams: dict[int, str] = {}
        if group is not None:
            gr = groups[group]
            self.group_modules = {m.module for m in gr.members} | set(gr.modules)
            self.pinned_fams = {a.family: a.reason for a in gr.axes if a.role is AxisRole.FIXED}

    def build(self) -> ViewModel:
        g = self.g
        self.op_inputs = [list(dict.fromkeys(g.tensor_ids((op.args, op.kwargs))))
                          for op in g.ops]
        hidden, op_params = _parameter_prep(g, self.op_inputs)
        shown = [op for op in g.ops if op.index not in hidden]
        modules = _modules_with_ops(shown)
        folds = fold_blocks(g, shown, modules, self._marked, self.shapes) if self.fold \
            else Folds()
        opmap, instance_of, copies, ranges = folds.opmap, folds.instance_of, folds.copies, \
            folds.ranges
        kept_ops = [op for op in shown if op.index not in opmap]
        op_groups: dict[int, set[int]] = {}
        for op in shown:
            target = opmap.get(op.index, op.index)
            gids = op_groups.setdefault(target, set())
            for p in op_params.get(op.index, ()):
                gids |= self.param_groups.get(p, set())
        pairs, edge_vid = self._op_edges(shown, opmap, instance_of)
        edges = self._edge_groups(pairs, edge_vid)
        for e in edges:  # the group's channels flow through both ends
            for end in (e.source, e.target):
                if end.startswith("op:"):
                    op_groups.setdefault(int(end[3:]), set()).update(e.group_ids)
        chain = {n for e in edges if self.group in e.group_ids for n in (e.source, e.target)}
        nodes = self._nodes(kept_ops, modules, opmap, op_params, op_groups, edges, chain,
                            copies, ranges)
        return ViewModel(nodes, edges, self.group, self.depth)

    def _marked(self, module: str) -> bool:
        return any(within(x, module) for x in self.group_modules | self.search)

    def _shape(self, name: str) -> tuple[int, ...]:
        return self.shapes.get(name, ())

    # -- edges ----------------------------------------------------------------------------
    def _op_edges(self, shown: list[OpNode], opmap: dict[int, int],
                  instance_of: dict[int, list[tuple[int, int]]]
                  ) -> tuple[list[tuple[str, str]], list[int]]:
        g = self.g
        shown_ids = {op.index for op in shown}
        input_pos = {vid: k for k, vid in enumerate(g.inputs)}
        pairs: dict[tuple[str, str], int] = {}

        def add(src: int | None, dst: int | None, vid: int, src_id: str, dst_id: str) -> None:
            if src is not None and dst is not None:
                runs_a = dict(instance_of.get(src, []))
                if any(runs_a.get(r, k) != k for r, k in instance_of.get(dst, [])):
                    return  # from one folded instance into the next: the repeat itself
            if src_id != dst_id:
                pairs.setdefault((src_id, dst_id), vid)

        for op in shown:
            dst = opmap.get(op.index, op.index)
            for vid in self.op_inputs[op.index]:
                value = g.values[vid]
                if value.producer is not None and value.producer in shown_ids:
                    src = opmap.get(value.producer, value.producer)
                    add(value.producer, op.index, vid, f"op:{src}", f"op:{dst}")
                elif vid in input_pos:
                    add(None, None, vid, f"in:{input_pos[vid]}", f"op:{dst}")
        for k, vid in enumerate(g.outputs):
            p = g.values[vid].producer
            if p is not None and p in shown_ids:
                add(None, None, vid, f"op:{opmap.get(p, p)}", f"out:{k}")
            elif vid in input_pos:
                add(None, None, vid, f"in:{input_pos[vid]}", f"out:{k}")
        return list(pairs), list(pairs.values())

    def _edge_groups(self, pairs: list[tuple[str, str]], vids: list[int]) -> list[ViewEdge]:
        cache: dict[int, list[frozenset[int]]] = {}
        out = []
        for (a, b), vid in zip(pairs, vids, strict=True):
            fams = cache.get(vid)
            if fams is None:
                fams = cache[vid] = self.mg.coupling.value_families(vid)
            gids: set[int] = set()
            coupled = []
            for d, fs in enumerate(fams):
                dim_groups: set[int] = set()
                for f in fs:
                    dim_groups |= self.fam_groups.get(f, set())
                gids |= dim_groups
                if self.group in dim_groups:
                    coupled.append(d)
            out.append(ViewEdge(a, b, self.g.values[vid].shape, tuple(sorted(gids)),
                                tuple(coupled)))
        self._value_fams = cache
        return out

    # -- nodes ----------------------------------------------------------------------------
    def _nodes(self, kept_ops: list[OpNode], modules: list[str], opmap: dict[int, int],
               op_params: dict[int, list[str]], op_groups: dict[int, set[int]],
               edges: list[ViewEdge], chain: set[str], copies: dict[str, int],
               ranges: dict[str, str]) -> list[ViewNode]:
        g = self.g
        alive = {op.module for op in kept_ops}
        kept_modules = [m for m in modules if any(within(a, m) for a in alive)]
        out_groups: dict[str, set[int]] = {}
        for e in edges:
            out_groups.setdefault(e.source, set()).update(e.group_ids)
        nodes: list[ViewNode] = []
        for k, vid in enumerate(g.inputs):
            v = g.values[vid]
            nodes.append(ViewNode(f"in:{k}", f"input {v.name or k} {list(v.shape)}", None,
                                  NodeKind.INPUT, ()))
        op_nodes = [self._op_node(op, op_params, op_groups, out_groups, chain)
                    for op in kept_ops]
        box_groups: dict[str, set[int]] = {m: set() for m in kept_modules}
        box_chain: set[str] = set()
        box_first: dict[str, int | None] = {}
        box_param: set[str] = set()  # boxes whose click group comes from a parameter
        for n in op_nodes:
            for m in ancestors_and_self(n.module):
                if m in box_groups:
                    box_groups[m] |= set(n.group_ids)
                    if n.chain:
                        box_chain.add(m)
                    if n.primary_group is not None and (
                            box_first.get(m) is None or (n.id in self.param_primary and
                                                         m not in box_param)):
                        box_first[m] = n.primary_group  # a parameter's output channels win
                        if n.id in self.param_primary:
                            box_param.add(m)
        first_op: dict[str, int] = {}
        for op in kept_ops:
            for m in ancestors_and_self(op.module):
                first_op.setdefault(m, op.index)
        order = sorted(kept_modules, key=lambda m: (first_op.get(m, 0), m.count(".")))
        local: dict[str, int] = {}  # box -> first group whose members all lie inside it
        for gid in sorted(self.home):
            for m in ancestors_and_self(self.home[gid]):
                local.setdefault(m, gid)
        self.open_chain = len([n for n in op_nodes if n.chain]) <= _MAX_CHAIN_OPENED
        boxes = {m: self._box(m, box_groups[m], m in box_chain,
                              local.get(m, box_first.get(m)),
                              copies.get(m, 1), ranges.get(m))
                 for m in order}
        # interleave: a box right before its first op
        by_first: dict[int, list[ViewNode]] = {}
        for m in order:
            by_first.setdefault(first_op[m], []).append(boxes[m])
        for op, n in zip(kept_ops, op_nodes, strict=True):
            nodes.extend(by_first.get(op.index, []))
            nodes.append(n)
        for k, vid in enumerate(g.outputs):
            v = g.values[vid]
            nodes.append(ViewNode(f"out:{k}", f"output {k} {list(v.shape)}", None,
                                  NodeKind.OUTPUT, ()))
        return nodes

    def _op_node(self, op: OpNode, op_params: dict[int, list[str]],
                 op_groups: dict[int, set[int]], out_groups: dict[str, set[int]],
                 chain: set[str]) -> ViewNode:
        g, nid = self.g, f"op:{op.index}"
        params = op_params.get(op.index, [])
        out = [g.values[v].shape for v in op.outputs if v is not None]
        label = _OP_WORDS.get(op.short, op.short) + _op_args(op)
        detail = [f"aten.{op.short} -> {', '.join(str(list(s)) for s in out)}"]
        detail += [f"{p} {list(self._shape(p))}" for p in params]
        if op.location:
            detail.append(op.location)
        primary = next((self.dim0_group[p] for p in params if p in self.dim0_group
                        and len(self._shape(p)) >= 2), None)
        if primary is None:
            primary = next((self.dim0_group[p] for p in params if p in self.dim0_group), None)
        if primary is not None:  # the group of the channels its parameter writes
            self.param_primary.add(nid)
        else:
            cands = out_groups.get(nid, set())
            primary = min(cands, key=lambda i: (len(self.mg.groups()[i].members), i),
                          default=None)
        on_chain = nid in chain
        gids = tuple(sorted(op_groups.get(op.index, set())))
        return ViewNode(nid, label, f"m:{op.module}" if op.module else None, NodeKind.OP, gids,
                        op.module, tuple(detail), primary_group=primary, chain=on_chain,
                        pins=self._pins(op) if on_chain else "",
                        unsafe=self._unsafe(tuple(g for p in params
                                                  for g in self.param_groups.get(p, ()))))

    def _pins(self, op: OpNode) -> str:
        """The reason when ``op`` consumes a pinned axis of the selected group (a select)."""
        if not self.pinned_fams:
            return ""
        fams = self.mg.coupling.value_families
        ins = {f for v in self.op_inputs[op.index] for d in fams(v) for f in d}
        outs = {f for v in op.outputs if v is not None for d in fams(v) for f in d}
        return next((r for f, r in self.pinned_fams.items() if f in ins and f not in outs), "")

    def _unsafe(self, gids: tuple[int, ...]) -> str:
        """The selected group's failure, on the ops holding its parameters."""
        return self.unsafe.get(self.group, "") if self.group in gids else ""

    def _unsafe_box(self, module: str) -> str:
        """The selected group's failure, on the module it names (``"module file:line"``)."""
        text = self.unsafe.get(self.group, "") if self.group is not None else ""
        return text if text and text.split(" ", 1)[0] == module else ""

    def _box(self, m: str, gids: set[int], chain: bool, primary: int | None, copies: int,
             fold_range: str | None) -> ViewNode:
        g = self.g
        parent = m.rpartition(".")[0]
        cls = g.modules.get(m, "")
        name = fold_range or m
        if parent:
            name = name[len(parent) + 1:]
        title = f"{name} x{copies}" if copies > 1 else name
        label = f"{title} ({cls})" if cls else title
        detail = []
        ins, outs = g.module_io.get(m, ([], []))
        if ins or outs:
            detail.append(" , ".join(str(list(g.values[v].shape)) for v in ins[:2]) + " -> "
                          + " , ".join(str(list(g.values[v].shape)) for v in outs[:2]))
        detail += _param_lines(g, self.params, self.shapes, m, copies)
        depth = m.count(".") + 1
        expanded = depth < self.depth or (chain and self.open_chain)
        tgroup = tuple(sorted(gids))
        return ViewNode(f"m:{m}", label, f"m:{parent}" if parent else None, NodeKind.MODULE,
                        tgroup, m, tuple(detail), expanded, copies, primary, chain,
                        found=any(within(s, m) or within(m, s) for s in self.search),
                        unsafe=self._unsafe_box(m))


def _group_index(groups: list[Group]) -> tuple[dict[str, set[int]], dict[str, int],
                                                dict[int, str], dict[int, set[int]]]:
    """Parameter -> its groups, parameter -> the first group cutting its dim 0, group -> the
    innermost module holding all its members, atom family -> its groups."""
    param_groups: dict[str, set[int]] = {}
    dim0_group: dict[str, int] = {}
    for gr in groups:
        for m in gr.members:
            param_groups.setdefault(m.param, set()).add(gr.id)
            if m.dim == 0:
                dim0_group.setdefault(m.param, gr.id)
    home = {gr.id: common_prefix([m.module for m in gr.members]) for gr in groups}
    fam_groups: dict[int, set[int]] = {}
    for gr in groups:
        for f in (a.family for a in gr.axes):
            fam_groups.setdefault(f, set()).add(gr.id)
    return param_groups, dim0_group, home, fam_groups


def _param_lines(g: Graph, params: set[str], shapes: Mapping[str, tuple[int, ...]], m: str,
                 copies: int) -> list[str]:
    """A box's parameters: each with its shape, or a count when there are many."""
    names = [p for p, owner in g.param_owner.items() if within(owner, m)
             and p in params]
    if not names:
        return []
    if len(names) <= _MAX_PARAM_LINES:
        lines = [f"{p[len(m) + 1:]} {list(shapes.get(p, ()))}" for p in names]
    else:
        total = sum(math.prod(shapes.get(p, ())) for p in names)
        lines = [f"{len(names)} parameters, {total:,} weights"]
    if copies > 1:
        lines[-1] += f" (each of {copies})"
    return lines


def _parameter_prep(g: Graph, op_inputs: list[list[int]]
                    ) -> tuple[set[int], dict[int, list[str]]]:
    """Ops fed only by parameters/buffers/constants (not drawn), and each op's parameters."""
    hidden: set[int] = set()
    params: dict[int, list[str]] = {}
    flowing = {ValueKind.INPUT, ValueKind.ACTIVATION}
    for op in g.ops:
        names: list[str] = []
        live = False
        for vid in op_inputs[op.index]:
            v = g.values[vid]
            if v.kind in (ValueKind.PARAM, ValueKind.BUFFER) and v.name:
                names.append(v.name)
            elif v.producer is not None and v.producer in hidden:
                names += params.get(v.producer, [])
            elif v.kind in flowing:
                live = True
        params[op.index] = list(dict.fromkeys(names))
        if not live:
            hidden.add(op.index)
    return hidden, params


def _modules_with_ops(ops: list[OpNode]) -> list[str]:
    seen: dict[str, None] = {}
    for op in ops:
        for m in ancestors_and_self(op.module):
            seen.setdefault(m, None)
    return list(seen)


def _op_args(op: OpNode) -> str:
    """Short argument text for ops whose meaning is in an int argument (``select [0]``)."""
    if op.short in ("select", "slice", "split", "chunk", "unbind") and len(op.args) > 1:
        ints = [a for a in op.args[1:] if isinstance(a, int)]
        if op.short == "select" and len(ints) >= 2:
            return f" dim {ints[0]} [{ints[1]}]"
        return " " + ", ".join(str(i) for i in ints[:3])
    return ""
