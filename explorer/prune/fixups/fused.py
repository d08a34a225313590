"""Which rows of a fused projection produce a value: the part of its weight a fold scales.

GPT-NeoX computes q, k and v with one ``query_key_value`` projection, views its output as
(heads, 3 x head_dim) and splits it. Scaling q alone means scaling the rows that produce q.
They are found without a table of layouts: the projection's output features are labelled
by their index and the ops between the projection and the pick (views, transposes, splits,
slices, constant indices) are replayed on the labels; the labels that reach the picked
value are its rows. A labelled value that leaves by any other op must hold none of them
(else scaling them would change that use). The weight's dim that carries the features is
found the same way, with a broadcast label per dim (no copy of the weight).
"""
from __future__ import annotations

from typing import Any

import torch

from ...graph.ir import Graph, OpNode, ValueKind, ValueRef

__all__ = ["MATMUL", "REARRANGE", "SAME", "SELECT", "projection_parts"]

aten = torch.ops.aten
# ops whose output is the first tensor argument rearranged (linear, one input)
REARRANGE = {aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.permute,
             aten.t, aten.clone, aten.contiguous, aten.expand, aten.unsqueeze, aten.squeeze,
             aten.alias, aten.neg, aten.detach, aten._to_copy, aten.flatten, aten.lift_fresh}
# ops that keep each element's value (labels pass through them unchanged)
SAME = {aten.clone, aten.contiguous, aten.alias, aten.neg, aten.detach, aten._to_copy,
        aten.lift_fresh}
# ops that pick part of the first tensor argument: its other parts may go elsewhere
SELECT = {aten.slice, aten.select, aten.split, aten.split_with_sizes, aten.unbind,
          aten.narrow, aten.index}
# projections and products: linear in each operand
MATMUL = {aten.addmm, aten.linear, aten.mm, aten.matmul, aten.bmm, aten.embedding}


def projection_parts(graph: Graph, partial: set[int], cone: set[int],
                     producers: dict[int, OpNode], consumers: dict[int, list[OpNode]]
                     ) -> dict[str, tuple[int, set[int]]] | str:
    """The parts of parameters to scale, ``name -> (dim, indices)``: the rows of the
    projections whose outputs reach the values ``cone`` only in part (through the values
    ``partial``, inputs of picking ops); or why that cannot be done exactly."""
    out: dict[str, tuple[int, set[int]]] = {}
    sources: dict[int, OpNode] = {}  # projection output -> its op
    stack = list(partial)
    while stack:
        vid = stack.pop()
        node = producers.get(vid)
        if node is None:
            return (f"only part of the {graph.values[vid].kind.value} '{graph.values[vid].name}'"
                    f" feeds it")
        packet = node.op.overloadpacket
        if packet in MATMUL:
            sources[vid] = node
        elif (packet in REARRANGE or packet in SELECT) and isinstance(node.args[0], ValueRef):
            stack.append(node.args[0].vid)
        else:
            return (f"only part of the output of {node.short} at "
                    f"{node.location or node.module} feeds it, and it is not a projection")
    for vid, node in sources.items():
        rows = _picked_rows(graph, vid, node, cone, consumers)
        if isinstance(rows, str):
            return rows
        found = _projection_elements(graph, node, rows, producers, consumers)
        if isinstance(found, str):
            return found
        for name, (dim, idx) in found.items():
            if out.setdefault(name, (dim, set()))[0] != dim:
                return f"two parts of '{name}' along different dims feed it"
            out[name][1].update(idx)
    return out


def _picked_rows(graph: Graph, out: int, node: OpNode, cone: set[int],
                 consumers: dict[int, list[OpNode]]) -> torch.Tensor | str:
    """The output features of projection ``node`` that reach the cone: its output's last
    dim labelled by index and replayed through the rearranging and picking ops after it.
    A labelled value that leaves by another op must hold none of those features."""
    shape = graph.values[out].shape
    labels = {out: torch.arange(shape[-1]).expand(shape)}
    picked: list[torch.Tensor] = []
    others: list[tuple[OpNode | None, int]] = []
    stack = [out]
    while stack:
        vid = stack.pop()
        users = consumers.get(vid, [])
        if vid in graph.outputs or not users:
            others.append((None, vid))
        for user in users:
            got = _replay(graph, user, labels) if user.op.overloadpacket in REARRANGE | \
                SELECT and graph.tensor_ids(user.args[:1]) == [vid] else None
            if got is None:
                others.append((user, vid))
                continue
            for o, t in zip(user.outputs, got, strict=False):
                if o is None or o in labels:
                    continue
                labels[o] = t
                if o in cone:
                    picked.append(t)
                else:
                    stack.append(o)
    if not picked:
        return f"no feature of {node.short} at {node.location or node.module} reaches it"
    rows: torch.Tensor = torch.unique(torch.cat([t.reshape(-1) for t in picked]))
    for other, vid in others:
        if torch.isin(labels[vid], rows).any():
            where = "the model output" if other is None else \
                f"{other.short} at {other.location or other.module}"
            return f"a part of {node.short} it scales is also used by {where}"
    return rows


def _replay(graph: Graph, node: OpNode, labels: dict[int, torch.Tensor]
            ) -> list[torch.Tensor] | None:
    """``node`` run on integer labels in place of its first argument (None when it cannot
    be: an index with no recorded values, a shape that differs from the trace)."""
    first = graph.tensor_ids(node.args[:1])[0]
    if node.op.overloadpacket in SAME:
        outs = [labels[first]]
    else:
        def sub(a: Any) -> Any:
            if isinstance(a, ValueRef):
                if a.vid in labels:
                    return labels[a.vid]
                data = graph.values[a.vid].data
                if data is None:
                    raise LookupError(a.vid)
                return torch.tensor(data, dtype=torch.long)
            if isinstance(a, (list, tuple)):
                return type(a)(sub(x) for x in a)
            return a
        try:
            try:
                got = node.op(*sub(node.args), **{k: sub(v) for k, v in node.kwargs.items()})
            except RuntimeError:  # a view of a broadcast label: the same on a copy
                labels = {**labels, first: labels[first].contiguous()}
                got = node.op(*sub(node.args), **{k: sub(v) for k, v in node.kwargs.items()})
        except (LookupError, RuntimeError, TypeError, IndexError):
            return None
        outs = list(got) if isinstance(got, (list, tuple)) else [got]
    for o, t in zip(node.outputs, outs, strict=False):
        if o is not None and tuple(t.shape) != tuple(graph.values[o].shape):
            return None
    return outs


# the argument positions of a projection's weight and bias, and whether the weight is
# stored (out, in) (``linear``) rather than (in, out) (the right operand of ``mm``)
_PROJECTION = {aten.addmm: (2, 0, False), aten.mm: (1, None, False),
               aten.matmul: (1, None, False), aten.bmm: (1, None, False),
               aten.linear: (1, 2, True), aten.embedding: (0, None, False)}


def _projection_elements(graph: Graph, node: OpNode, rows: torch.Tensor,
                         producers: dict[int, OpNode], consumers: dict[int, list[OpNode]]
                         ) -> dict[str, tuple[int, set[int]]] | str:
    """For the projection's weight and bias: the dim and the indices along it that
    produce the output features ``rows`` (a weight's output rows)."""
    where = f"{node.short} at {node.location or node.module}"
    layout = _PROJECTION.get(node.op.overloadpacket)
    if layout is None:
        return f"only part of {where} feeds it, and its weight layout is not known"
    w_pos, b_pos, out_in = layout
    out: dict[str, tuple[int, set[int]]] = {}
    for pos, is_bias in ((w_pos, False), (b_pos, True)):
        if pos is None or pos >= len(node.args) or not isinstance(node.args[pos], ValueRef):
            continue
        chain = _param_chain(graph, node.args[pos].vid, producers)
        if chain is None:
            return f"{where} is fed by an activation where a weight was expected"
        param, steps = chain
        for v in [param.vid, *(o for n in steps for o in n.outputs if o is not None)]:
            if any(u is not node and u not in steps for u in consumers.get(v, [])):
                return f"'{param.name}' is also used outside {where}"
        axis = 0 if out_in and not is_bias else -1  # the operand's output-feature axis
        found = next((f for d in range(len(param.shape))
                      if (f := _feature_dim(graph, param, steps, d, node.args[pos].vid, axis))
                      is not None), None)
        if found is None:
            return f"cannot tell which part of '{param.name}' produces which output of {where}"
        out[str(param.name)] = (found[0], {int(i) for i in found[1][rows]})
    return out


def _feature_dim(graph: Graph, param: Any, steps: list[OpNode], dim: int, operand: int,
                 axis: int) -> tuple[int, torch.Tensor] | None:
    """Whether ``dim`` of the parameter becomes the operand's ``axis`` alone: then the
    index along ``dim`` behind each feature. The parameter's index along ``dim`` is
    replayed through ``steps`` as a broadcast label (no memory of the parameter's size);
    the operand's labels must vary along ``axis`` only."""
    shape = tuple(param.shape)
    index = torch.arange(shape[dim]).reshape([-1 if i == dim else 1 for i in range(len(shape))])
    labels = {param.vid: index.expand(shape)}
    for step in steps:
        got = _replay(graph, step, labels)
        if got is None or step.outputs[0] is None:
            return None
        labels[step.outputs[0]] = got[0]
    t = labels[operand]
    axis %= t.dim()
    if any(t.stride(i) != 0 and t.shape[i] > 1 for i in range(t.dim()) if i != axis):
        return None
    return dim, t[tuple(slice(None) if i == axis else 0 for i in range(t.dim()))]


def _param_chain(graph: Graph, vid: int, producers: dict[int, OpNode]
                 ) -> tuple[Any, list[OpNode]] | None:
    """The parameter ``vid`` rearranges and the ops from it (``t(weight)``), in order."""
    steps: list[OpNode] = []
    while graph.values[vid].kind is not ValueKind.PARAM:
        node = producers.get(vid)
        if node is None or node.op.overloadpacket not in REARRANGE:
            return None
        steps.append(node)
        vid = graph.tensor_ids(node.args)[0]
    return graph.values[vid], steps[::-1]
