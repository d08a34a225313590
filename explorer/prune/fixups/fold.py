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
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...graph.ir import Graph, OpNode, ValueKind, ValueRef
from ...graph.ops import ATTENTION_OPS
from ...graph.tracer import TraceError, trace
from ...graph.walk import flat_floats

__all__ = ["Fold", "folded"]

aten = torch.ops.aten
# ops whose output is the first tensor argument rearranged (linear, one input)
_REARRANGE = {aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.permute,
              aten.t, aten.clone, aten.contiguous, aten.expand, aten.unsqueeze,
              aten.squeeze, aten.alias, aten.slice, aten.select, aten.neg, aten.detach,
              aten._to_copy, aten.flatten, aten.lift_fresh}
_SUM = {aten.add, aten.sub, aten.cat, aten.stack}  # linear when every input is in the cone
_PRODUCT = {aten.mul, aten.div}  # linear in the one operand that depends on parameters
_MATMUL = {aten.addmm, aten.linear, aten.mm, aten.matmul, aten.bmm, aten.embedding}


@dataclass
class Fold:
    """Constants set to the config's values, with the weights that absorb the ratio."""

    constants: dict[str, list[float]] = field(default_factory=dict)  # "mod.attr" -> [old, new]
    scaled: dict[str, float] = field(default_factory=dict)  # parameter -> factor
    buffers: dict[str, float] = field(default_factory=dict)  # one-element buffer -> new value
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


def _cone(graph: Graph, start: int) -> tuple[set[int], set[str]] | str:
    """Values between ``start`` and the parameters it is linear in, and those parameters'
    names; or why ``start`` is not such a linear function."""
    producers = _producers(graph)
    memo: dict[int, bool] = {}
    cone: set[int] = set()
    params: set[str] = set()
    stack = [start]
    while stack:
        vid = stack.pop()
        if vid in cone:
            continue
        cone.add(vid)
        value = graph.values[vid]
        if value.kind is ValueKind.PARAM:
            params.add(str(value.name))
            continue
        node = producers.get(vid)
        if node is None:
            return f"it reaches the {value.kind.value} '{value.name}' that is not a weight"
        packet = node.op.overloadpacket
        ins = graph.tensor_ids((node.args, node.kwargs))
        if packet in _REARRANGE or packet in _SUM:
            stack.extend(ins)
        elif packet in _PRODUCT:
            live = [v for v in ins if _has_param(graph, v, producers, memo)]
            if len(live) != 1 or (packet is aten.div and ins and live[0] != ins[0]):
                return f"{node.short} at {node.location or node.module} is not linear in it"
            stack.append(live[0])
        elif packet in _MATMUL:
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
    return cone, params


def _only_params(graph: Graph, vid: int, producers: dict[int, OpNode]) -> bool:
    """Whether ``vid`` is a parameter, or a rearrangement of one (``t(weight)``)."""
    while graph.values[vid].kind is not ValueKind.PARAM:
        node = producers.get(vid)
        if node is None or node.op.overloadpacket not in _REARRANGE:
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


def _buffer_uses(graph: Graph, module: nn.Module, mod: str, old: float,
                 consumers: dict[int, list[OpNode]]) -> tuple[list[str], list[tuple[OpNode, int]]]:
    """One-element buffers of ``module`` holding ``old`` (Gemma2 keeps its embedding scale
    as ``scalar_embed_scale`` and as the buffer ``embed_scale`` its forward multiplies by),
    and the ``x * buffer`` ops that use them, with ``x``."""
    names = [f"{mod}.{b}" if mod else b for b, t in module.named_buffers(recurse=False)
             if t.is_floating_point() and t.numel() == 1 and t.device.type != "meta"
             and math.isclose(float(t), old, rel_tol=1e-6)]
    uses: list[tuple[OpNode, int]] = []
    stack = [vid for vid, v in graph.values.items()
             if v.kind is ValueKind.BUFFER and v.name in names]
    while stack:
        vid = stack.pop()
        for node in consumers.get(vid, []):
            ins = graph.tensor_ids(node.args)
            if node.op.overloadpacket in _REARRANGE and ins[:1] == [vid]:
                stack.extend(o for o in node.outputs if o is not None)
            elif node.op.overloadpacket is aten.mul and len(ins) == 2 and vid in ins:
                uses.append((node, ins[1 - ins.index(vid)]))
    return names, uses


def plan_fold(graph: Graph, model: nn.Module, constants: dict[tuple[str, str], float]
              ) -> Fold:
    """Which weights absorb each differing constant (``(module, attr) -> new value``)."""
    fold = Fold()
    consumers = _consumers(graph)
    for (mod, attr), new in constants.items():
        old = getattr(model.get_submodule(mod), attr)
        uses = [(node, vid) for node in graph.ops if node.module == mod
                for vid in _uses(node, float(old))]
        buffers, more = _buffer_uses(graph, model.get_submodule(mod), mod, float(old),
                                     consumers)
        uses += more
        fold.buffers.update(dict.fromkeys(buffers, new))
        if not uses:  # read by no traced op (a branch not taken): it just follows the
            # config; the forward check below catches a use this search does not see,
            # except through a buffer the constructor computed from it (not compared)
            recomputed = sorted(model.get_submodule(mod)._non_persistent_buffers_set)
            if recomputed:
                fold.reason = (f"{mod}.{attr} is read by no traced op, and '{mod}' holds "
                               f"buffers a load recomputes ({', '.join(recomputed)})")
                return fold
            fold.constants[f"{mod}.{attr}"] = [float(old), new]
            continue
        for node, vid in uses:
            found = _cone(graph, vid)
            if isinstance(found, str):
                fold.reason = f"{mod}.{attr} scales a value that cannot absorb it: {found}"
                return fold
            cone, params = found
            for v in cone:  # scaling the cone must change nothing but this use
                for user in consumers.get(v, []):
                    if user is not node and not any(o in cone for o in user.outputs
                                                    if o is not None):
                        fold.reason = (f"{mod}.{attr}: a value it scales is also used by "
                                       f"{user.short} at {user.location or user.module}")
                        return fold
            factor = float(old) / new
            for p in params:
                if fold.scaled.get(p, factor) != factor:
                    fold.reason = f"'{p}' would absorb two different constants"
                    return fold
                fold.scaled[p] = factor
        fold.constants[f"{mod}.{attr}"] = [float(old), new]
    return fold


@contextmanager
def folded(model: nn.Module, constants: dict[tuple[str, str], float],
           inputs: Sequence[Any]) -> Iterator[Fold]:
    """Inside the block, ``model`` has ``constants`` set and their ratios folded into its
    weights, when a forward on ``inputs`` shows the same outputs; the model is restored
    exactly on leaving. ``Fold.reason`` says why nothing was folded."""
    try:
        graph = trace(model, tuple(inputs))
    except TraceError as e:
        yield Fold(reason=f"cannot trace the model to fold constants ({e})")
        return
    fold = plan_fold(graph, model, constants)
    if fold.reason:
        yield fold
        return
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    params.update(model.named_buffers())
    saved = {name: params[name].detach().clone() for name in [*fold.scaled, *fold.buffers]}
    attrs = {key: getattr(model.get_submodule(key[0]), key[1]) for key in constants}
    modes = {m: m.training for m in model.modules()}
    try:
        # the check compares two eval forwards (dropout would make any two differ), and
        # leaves the caller's random state and train/eval modes as they were
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            try:
                before = flat_floats(model(*inputs))
                for name, factor in fold.scaled.items():
                    params[name].mul_(factor)
                for name, value in fold.buffers.items():
                    params[name].fill_(value)
                for (mod, attr), new in constants.items():
                    setattr(model.get_submodule(mod), attr, new)
                after = flat_floats(model(*inputs))
            finally:
                for m, training in modes.items():
                    m.training = training
        same = before.shape == after.shape and \
            torch.allclose(before, after, rtol=1e-4, atol=1e-5)
        if not same:
            fold = Fold(reason="the model computes something else after folding the "
                               "constants into its weights")
            _restore(model, params, saved, attrs)
        yield fold
    finally:
        _restore(model, params, saved, attrs)


def _restore(model: nn.Module, params: dict[str, torch.Tensor],
             saved: dict[str, torch.Tensor], attrs: dict[tuple[str, str], Any]) -> None:
    with torch.no_grad():
        for name, t in saved.items():
            params[name].copy_(t)
    for (mod, attr), value in attrs.items():
        setattr(model.get_submodule(mod), attr, value)
