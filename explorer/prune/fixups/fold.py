"""Fold config-derived constants into weights, so a config can describe the pruned model.

A transformers constructor computes some real numbers from the config and stores them on
modules: the attention ``scaling = head_dim**-0.5``. After head dims are cut the pruned
model must keep the value of its original widths (it is part of the function it computes),
while ``from_pretrained`` on a config with the new widths recomputes another. The constant
multiplies a product that is linear in one projection: ``softmax(scale * q @ k.T)`` with
``q`` a linear map of the hidden states (through views, transposes and the rotary
embedding, all linear in ``q``). Setting the constant to the value the config derives,
``new``, and multiplying that projection's weight and bias by ``old / new`` computes the
same function, and then the config describes it.

No table of architectures: the ops that take the constant as an argument are found in the
trace of the module that stores it; from the scaled operand the trace is walked back
through ops that are linear in it to the parameters that produce it. Every value on the way
must be used only inside that cone (else scaling it would change another use), and a
forward on the example inputs must give the same outputs before and after, or nothing is
folded.

A fused projection (GPT-NeoX's ``query_key_value``, split into q, k and v after a view) is
scaled in part: where the walk meets an op that picks part of its input (split, slice,
select, a constant index) whose other parts go elsewhere, only the rows of the projection
that produce the picked part are scaled (`explorer.prune.fixups.fused`).
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...graph.ir import Graph, OpNode, ValueKind, ValueRef
from ...graph.ops import ATTENTION_OPS
from ...graph.rng import evaluating
from ...graph.tracer import TraceError, trace
from ...graph.walk import flat_floats
from .fused import MATMUL, REARRANGE, SELECT, projection_parts

__all__ = ["Fold", "fold_into", "folded", "plan_fold", "refold", "scale_tensor", "unfold"]

aten = torch.ops.aten
_SUM = {aten.add, aten.sub, aten.cat, aten.stack}  # linear when every input is in the cone
_PRODUCT = {aten.mul, aten.div}  # linear in the one operand that depends on parameters


@dataclass
class Fold:
    """Constants set to the config's values, with the weights that absorb the ratio."""

    constants: dict[str, list[float]] = field(default_factory=dict)  # "mod.attr" -> [old, new]
    scaled: dict[str, float] = field(default_factory=dict)  # parameter -> factor
    # parameter -> (dim, indices along it) the factor applies to, when only part of it
    # produces the scaled value (the q rows of a fused projection); absent: all of it
    elements: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    buffers: dict[str, float] = field(default_factory=dict)  # one-element buffer -> new value
    # constants read by no traced op: they follow the config, only a forward can confirm it
    unread: list[str] = field(default_factory=list)
    reason: str = ""  # why nothing was folded ("" when every constant was)


def _producers(graph: Graph) -> dict[int, OpNode]:
    return {vid: node for node in graph.ops for vid in node.outputs if vid is not None}


def _consumers(graph: Graph) -> dict[int, list[OpNode]]:
    out: dict[int, list[OpNode]] = {}
    for node in graph.ops:
        for vid in dict.fromkeys(graph.tensor_ids((node.args, node.kwargs))):
            out.setdefault(vid, []).append(node)
    return out


def _has_param(graph: Graph, vid: int, producers: dict[int, OpNode],
               memo: dict[int, bool]) -> bool:
    """Whether a parameter is among the ancestors of value ``vid``."""
    stack, seen = [vid], set()
    while stack:
        v = stack.pop()
        if v in memo:
            if memo[v]:
                memo[vid] = True
                return True
            continue
        if v in seen:
            continue
        seen.add(v)
        if graph.values[v].kind is ValueKind.PARAM:
            memo[vid] = True
            return True
        node = producers.get(v)
        if node is not None:
            stack.extend(graph.tensor_ids((node.args, node.kwargs)))
    memo[vid] = False
    return False


@dataclass
class _Cone:
    """What scaling one operand reaches: the values scaled whole, the parameters scaled
    whole and the parameters scaled in part (a dim and the indices along it)."""

    values: set[int] = field(default_factory=set)
    params: set[str] = field(default_factory=set)
    elements: dict[str, tuple[int, set[int]]] = field(default_factory=dict)  # (dim, indices)


def _cone(graph: Graph, start: int) -> _Cone | str:
    """Values between ``start`` and the parameters it is linear in, and those parameters
    (in part where a fused projection produces it); or why ``start`` is not such a linear
    function.

    The walk goes back from ``start``. The input of an op that picks part of it waits until
    every later value is placed: when all its users' outputs are in the cone it is scaled
    whole, else only the part the cone picks (`_partial`).
    """
    producers = _producers(graph)
    memo: dict[int, bool] = {}
    cone = _Cone()
    waiting: list[tuple[int, int]] = []  # (-producer index, value): latest first
    partial: set[int] = set()
    stack = [start]
    consumers = _consumers(graph)
    while stack or waiting:
        if not stack:
            _, vid = heapq.heappop(waiting)
            if vid in cone.values or vid in partial:
                continue
            users = consumers.get(vid, [])
            if all(o in cone.values for u in users for o in u.outputs if o is not None):
                stack.append(vid)
            else:
                partial.add(vid)
            continue
        vid = stack.pop()
        if vid in cone.values:
            continue
        cone.values.add(vid)
        value = graph.values[vid]
        if value.kind is ValueKind.PARAM:
            cone.params.add(str(value.name))
            continue
        node = producers.get(vid)
        if node is None:
            return f"it reaches the {value.kind.value} '{value.name}' that is not a weight"
        packet = node.op.overloadpacket
        ins = graph.tensor_ids((node.args, node.kwargs))
        if packet in SELECT and isinstance(node.args[0], ValueRef):
            source = node.args[0].vid
            heapq.heappush(waiting, (-_order(source, producers), source))
        elif packet in REARRANGE or packet in _SUM:
            stack.extend(ins)
        elif packet in _PRODUCT:
            live = [v for v in ins if _has_param(graph, v, producers, memo)]
            if len(live) != 1 or (packet is aten.div and ins and live[0] != ins[0]):
                return f"{node.short} at {node.location or node.module} is not linear in it"
            stack.append(live[0])
        elif packet in MATMUL:
            weights = [v for v in ins if _has_param(graph, v, producers, memo)
                       and _only_params(graph, v, producers)]
            live = [v for v in ins if _has_param(graph, v, producers, memo)]
            if weights:
                stack.extend(weights)  # weight and bias: scaling both scales the output
            elif live:  # a product of activations (q @ k.T): linear in the first one
                stack.append(live[0])
            else:
                return f"{node.short} at {node.location or node.module} has no weight"
        else:
            return f"{node.short} at {node.location or node.module} is not linear in it"
    if partial:
        parts = projection_parts(graph, partial, cone.values, producers, consumers)
        if isinstance(parts, str):
            return parts
        cone.elements = parts
    return cone


def _order(vid: int, producers: dict[int, OpNode]) -> int:
    node = producers.get(vid)
    return -1 if node is None else node.index


def _only_params(graph: Graph, vid: int, producers: dict[int, OpNode]) -> bool:
    """Whether ``vid`` is a parameter, or a rearrangement of one (``t(weight)``)."""
    while graph.values[vid].kind is not ValueKind.PARAM:
        node = producers.get(vid)
        if node is None or node.op.overloadpacket not in REARRANGE:
            return False
        vid = graph.tensor_ids(node.args)[0]
    return True


def _uses(node: OpNode, value: float) -> list[int]:
    """Positions of the scaled operand of ``node`` when it takes ``value`` as a constant:
    the query of an attention kernel (``scale=``), the tensor of ``x * value``."""
    args = list(node.args) + list(node.kwargs.values())
    if not any(isinstance(a, float) and math.isclose(a, value, rel_tol=1e-9) for a in args):
        return []
    packet = node.op.overloadpacket
    if packet in ATTENTION_OPS and isinstance(node.args[0], ValueRef):
        return [node.args[0].vid]
    if packet is aten.mul and isinstance(node.args[0], ValueRef):
        return [node.args[0].vid]
    return []


def _halved_uses(graph: Graph, mod: str, value: float, consumers: dict[int, list[OpNode]]
                 ) -> list[tuple[OpNode, int]]:
    """SDPA as its math decomposition runs it (on ``meta``, where no fused kernel is
    picked): ``q * sqrt(scale)`` and ``k.T * sqrt(scale)`` into one ``bmm``. The pair is one
    use of ``scale``; q, the left operand's tensor, absorbs the whole ratio (the same
    operand the fused kernel's ``scale=`` names, so both traces fold the same weights)."""
    root = math.sqrt(value)
    sides: dict[int, dict[int, OpNode]] = {}  # bmm index -> operand position -> its mul
    for node in graph.ops:
        if node.module != mod or node.op.overloadpacket is not aten.mul or \
                len(node.args) != 2 or not isinstance(node.args[0], ValueRef) or \
                not isinstance(node.args[1], float) or \
                not math.isclose(node.args[1], root, rel_tol=1e-9):
            continue
        reached = _reaches_matmul(graph, node, consumers)
        if reached is not None:
            sides.setdefault(reached[0].index, {})[reached[1]] = node
    return [(pair[0], pair[0].args[0].vid) for pair in sides.values()
            if set(pair) == {0, 1} and isinstance(pair[0].args[0], ValueRef)]


def _reaches_matmul(graph: Graph, node: OpNode, consumers: dict[int, list[OpNode]]
                    ) -> tuple[OpNode, int] | None:
    """The ``bmm``/``matmul`` the output of ``node`` feeds through rearranging ops only,
    and the operand position it feeds (None when it goes anywhere else)."""
    vid = node.outputs[0]
    while vid is not None:
        users = consumers.get(vid, [])
        if len(users) != 1:
            return None
        (user,) = users
        if user.op.overloadpacket in (aten.bmm, aten.matmul):
            refs = [i for i, a in enumerate(user.args[:2])
                    if isinstance(a, ValueRef) and a.vid == vid]
            return (user, refs[0]) if len(refs) == 1 else None
        if user.op.overloadpacket not in REARRANGE:
            return None
        vid = user.outputs[0]
    return None


def _buffer_uses(graph: Graph, module: nn.Module, mod: str, old: float,
                 consumers: dict[int, list[OpNode]], recorded: bool = False
                 ) -> tuple[list[str], list[tuple[OpNode, int]]]:
    """One-element buffers of ``module`` holding ``old`` (Gemma2 keeps its embedding scale
    as ``scalar_embed_scale`` and as the buffer ``embed_scale`` its forward multiplies by),
    and the ``x * buffer`` ops that use them, with ``x``. A weightless buffer holds no value:
    it counts only when the fold is ``recorded`` (made with weights at cut time, replayed)."""
    names = [f"{mod}.{b}" if mod else b for b, t in module.named_buffers(recurse=False)
             if t.is_floating_point() and t.numel() == 1 and (
                 recorded if t.device.type == "meta" else
                 math.isclose(float(t), old, rel_tol=1e-6))]
    uses: list[tuple[OpNode, int]] = []
    stack = [vid for vid, v in graph.values.items()
             if v.kind is ValueKind.BUFFER and v.name in names]
    while stack:
        vid = stack.pop()
        for node in consumers.get(vid, []):
            ins = graph.tensor_ids(node.args)
            if node.op.overloadpacket in REARRANGE and ins[:1] == [vid]:
                stack.extend(o for o in node.outputs if o is not None)
            elif node.op.overloadpacket is aten.mul and len(ins) == 2 and vid in ins:
                uses.append((node, ins[1 - ins.index(vid)]))
    return names, uses


def plan_fold(graph: Graph, model: nn.Module, constants: dict[tuple[str, str], float],
              recorded: bool = False) -> Fold:
    """Which weights absorb each differing constant (``(module, attr) -> new value``);
    ``recorded``: a fold made with weights before, replayed on a weightless copy."""
    fold = Fold()
    consumers = _consumers(graph)
    for (mod, attr), new in constants.items():
        old = getattr(model.get_submodule(mod), attr)
        uses = [(node, vid) for node in graph.ops if node.module == mod
                for vid in _uses(node, float(old))]
        uses += _halved_uses(graph, mod, float(old), consumers)
        buffers, more = _buffer_uses(graph, model.get_submodule(mod), mod, float(old),
                                     consumers, recorded)
        uses += more
        fold.buffers.update(dict.fromkeys(buffers, new))
        if not uses:  # read by no traced op (a branch not taken): it just follows the
            # config; the forward check below catches a use this search does not see,
            # except through a buffer the constructor computed from it (not compared)
            owner = model.get_submodule(mod)
            recomputed = sorted(owner._non_persistent_buffers_set)
            if recomputed:
                fold.reason = (f"{mod}.{attr} is read by no traced op, and '{mod}' holds "
                               f"buffers a load recomputes ({', '.join(recomputed)})")
                if any(getattr(owner, b).device.type == "meta" for b in recomputed):
                    fold.reason += (" whose values a weightless (meta) copy does not have: "
                                    "export the pruned model in memory to fold them")
                return fold
            fold.constants[f"{mod}.{attr}"] = [float(old), new]
            fold.unread.append(f"{mod}.{attr}")
            continue
        for node, vid in uses:
            found = _cone(graph, vid)
            if isinstance(found, str):
                fold.reason = f"{mod}.{attr} scales a value that cannot absorb it: {found}"
                return fold
            for v in found.values:  # scaling the cone must change nothing but this use
                for user in consumers.get(v, []):
                    if user is not node and not any(o in found.values for o in user.outputs
                                                    if o is not None):
                        fold.reason = (f"{mod}.{attr}: a value it scales is also used by "
                                       f"{user.short} at {user.location or user.module}")
                        return fold
            factor = float(old) / new
            for p in [*found.params, *found.elements]:
                if fold.scaled.get(p, factor) != factor:
                    fold.reason = f"'{p}' would absorb two different constants"
                    return fold
            fold.reason = _merge_elements(fold, found, model)
            if fold.reason:
                return fold
            fold.scaled.update(dict.fromkeys([*found.params, *found.elements], factor))
        fold.constants[f"{mod}.{attr}"] = [float(old), new]
    return fold


def _merge_elements(fold: Fold, found: _Cone, model: nn.Module) -> str:
    """Record the parts of parameters ``found`` scales (before `Fold.scaled` takes them);
    a parameter one use scales whole is scaled whole. Returns why two uses disagree."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    whole = {n for n in fold.scaled if n not in fold.elements} | found.params
    for name in found.params:
        fold.elements.pop(name, None)
    for name, (dim, idx) in found.elements.items():
        if name in whole:
            continue
        before = fold.elements.get(name, (dim, []))
        if before[0] != dim:
            return f"two parts of '{name}' along different dims absorb it"
        merged = set(before[1]) | idx
        if name in shapes and len(merged) == shapes[name][dim]:
            fold.elements.pop(name, None)
        else:
            fold.elements[name] = (dim, sorted(merged))
    return ""


def scale_tensor(t: torch.Tensor, factor: float, part: tuple[int, Sequence[int]] | None
                 ) -> None:
    """Multiply ``t`` in place by ``factor``, only at the indices ``part[1]`` along dim
    ``part[0]`` when given: the one operation the in-memory export and the streamed replay
    both run (same bits)."""
    if part is None:
        t.mul_(factor)
        return
    index = torch.as_tensor(part[1], dtype=torch.long, device=t.device)
    t.index_copy_(part[0], index, t.index_select(part[0], index) * factor)


def fold_into(model: nn.Module, constants: dict[tuple[str, str], float],
              inputs: Sequence[Any]) -> tuple[Fold, dict[str, torch.Tensor]]:
    """Set ``constants`` (``(module, attr) -> the config's value``) and fold their ratios into
    the weights, for good, when a forward on ``inputs`` gives the same outputs.

    The scaled tensors are replaced by new objects, never written in place, so a transaction
    or an undo that puts the old objects back restores the model bit for bit. A weightless
    (``meta``) model has no values to fold or compare: its export or streamed replay folds
    (`plan_fold`).

    Returns:
        The fold (``Fold.reason`` says why nothing was changed) and the tensors it replaced,
        by name, with `Fold.constants` holding the old values of the constants.
    """
    if any(t.device.type == "meta" for t in model.parameters()):
        return Fold(reason="a weightless (meta) model has no values to fold; its export or "
                           "streamed replay folds them"), {}
    try:
        graph = trace(model, tuple(inputs))
    except TraceError as e:
        return Fold(reason=f"cannot trace the model to fold constants ({e})"), {}
    fold = plan_fold(graph, model, constants)
    if fold.reason:
        return fold, {}
    tensors = _tensors(model)
    new: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, factor in fold.scaled.items():
            new[name] = tensors[name].detach().clone()
            scale_tensor(new[name], factor, fold.elements.get(name))
        for name, value in fold.buffers.items():
            new[name] = torch.full_like(tensors[name], value)
    # the check compares two eval forwards (dropout would make any two differ), and leaves
    # the caller's random state and train/eval modes as they were
    with torch.no_grad(), evaluating(model, inputs):
        before = flat_floats(model(*inputs))
        previous = _swap(model, new, constants)
        after = flat_floats(model(*inputs))
    if before.shape != after.shape or not torch.allclose(before, after, rtol=1e-4, atol=1e-5):
        unfold(model, fold, previous)
        return Fold(reason="the model computes something else after folding the constants "
                           "into its weights"), {}
    return fold, previous


def unfold(model: nn.Module, fold: Fold, previous: dict[str, torch.Tensor]) -> None:
    """Take back `fold_into`: the replaced tensors and the constants' old values."""
    _swap(model, previous, {})
    for key, (old, _new) in fold.constants.items():
        mod, _, attr = key.rpartition(".")
        setattr(model.get_submodule(mod), attr, old)


@contextmanager
def folded(model: nn.Module, constants: dict[tuple[str, str], float],
           inputs: Sequence[Any]) -> Iterator[Fold]:
    """Inside the block, ``model`` is as `fold_into` leaves it; it is restored exactly on
    leaving. ``Fold.reason`` says why nothing was folded."""
    fold, previous = fold_into(model, constants, inputs)
    try:
        yield fold
    finally:
        if not fold.reason:
            unfold(model, fold, previous)


Part = tuple[int, list[int]]  # a dim and the indices along it a factor applies to
Product = tuple[str, float, Part | None]  # tensor, factor, part (None: all of it)
StepConstants = dict[tuple[str, str], tuple[float, float]]  # (module, attr) -> (old, new)


def refold(model: nn.Module, graph: Graph, steps: Sequence[StepConstants]
           ) -> tuple[list[Product], dict[str, float]] | str:
    """Repeat recorded folds on a model whose cuts are all applied (a plan replay).

    ``steps`` holds, per pruning step, the constants folded then: ``(module, attr) -> (old,
    new)``. Each constant's weights are found on ``graph`` (a trace of ``model`` now, its
    constants still at their first values), and each step's ratio ``old / new`` multiplies
    them in step order: the same products, element by element, as folding after each cut
    (a cut only selects elements), so the replay is bit-identical to the pruning.

    Returns:
        The multiplications in order (tensor, factor, part or None) and the one-element
        buffers set (name -> value), to apply to the model or to checkpoint tensors; or why
        the recorded folds do not fit the model.
    """
    final: dict[tuple[str, str], float] = {}
    for step in steps:
        for key, (old, new) in step.items():
            try:
                current = final.get(key, getattr(model.get_submodule(key[0]), key[1]))
            except AttributeError:
                return f"the model has no constant {key[0]}.{key[1]} to fold"
            if not isinstance(current, float) or not math.isclose(current, old, rel_tol=1e-12):
                return (f"{key[0]}.{key[1]} is {current!r} where the plan folds it from "
                        f"{old!r}")
            final[key] = new
    per_key: dict[tuple[str, str], Fold] = {}
    for key, new in final.items():
        fold = plan_fold(graph, model, {key: new}, recorded=True)
        if fold.reason:
            return fold.reason
        per_key[key] = fold
    products: list[Product] = []
    fills: dict[str, float] = {}
    for step in steps:
        factors: dict[str, float] = {}  # one product per tensor and step, as `plan_fold`
        for key, (old, new) in step.items():
            fold = per_key[key]
            for name in fold.scaled:
                factors.setdefault(name, float(old) / new)
            fills.update(dict.fromkeys(fold.buffers, new))
        products += [(name, factor, _part(per_key, name))
                     for name, factor in factors.items()]
    return products, fills


def _part(per_key: dict[tuple[str, str], Fold], name: str) -> Part | None:
    """The part of tensor ``name`` a fold scales (None: all of it)."""
    for fold in per_key.values():
        if name in fold.elements:
            return fold.elements[name]
    return None


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def _swap(model: nn.Module, new: dict[str, torch.Tensor],
          constants: dict[tuple[str, str], float]) -> dict[str, torch.Tensor]:
    """Put ``new`` tensors in place (every tied name of each: ties stay) and set
    ``constants``; returns the tensors replaced, by name."""
    names: dict[int, list[str]] = {}
    for name, t in _tensors(model).items():
        names.setdefault(id(t), []).append(name)
    current = _tensors(model)
    previous: dict[str, torch.Tensor] = {}
    for name, tensor in new.items():
        old = current[name]
        value: torch.Tensor = nn.Parameter(tensor, requires_grad=old.requires_grad) \
            if isinstance(old, nn.Parameter) and not isinstance(tensor, nn.Parameter) \
            else tensor
        for alias in names[id(old)]:
            owner, _, attr = alias.rpartition(".")
            module = model.get_submodule(owner)
            previous[alias] = getattr(module, attr)
            if attr in module._parameters and isinstance(value, nn.Parameter):
                module._parameters[attr] = value
            else:
                module._buffers[attr] = value
    for (mod, attr), value_ in constants.items():
        setattr(model.get_submodule(mod), attr, value_)
    return previous
