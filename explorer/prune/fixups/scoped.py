"""Width attributes read by a module's forward, found from the ops it ran.

A module need not own a resized tensor to read a width: OLMo's weightless LayerNorm calls
``F.layer_norm(x, self.normalized_shape)``, LeViT's attention calls
``split([self.key_dim, self.key_dim, self.val_dim])`` and ``reshape(B, N, self.val_attn_dim)``.
The trace records, for every op, the module that ran it and its integer arguments. An
integer attribute of that module (or an integer inside a tuple attribute) whose value is
one of those arguments, and is the size of a dim of the op's tensors that pruning changes,
is set to the new size. Only unambiguous evidence is used: when the same old size maps to
two new sizes in a module (a pruned channel dim and an untouched token dim of equal size),
the attribute is left alone and the pre-flight reports the group with its line. A width no
code of the module reads is left alone too (`widths.describes_only`): its value matching an
argument is a coincidence.

Equal values are told apart by position: LeViT's ``split([self.key_dim, self.key_dim,
self.val_dim])`` with key and value dims both 16 cuts them differently. For ``split`` and
``view``/``reshape`` the i-th integer argument is the size of a known output dim, and the
source line the trace recorded names the attribute at each position.
"""
from __future__ import annotations

import ast
import functools
import linecache
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ...coupling.analyze import Coupling
from ...coupling.heads import (
    HEAD_COUNT_ATTRS,
    HEAD_DIM_ATTRS,
    HEAD_WIDTH_ATTRS,
    KV_HEAD_ATTRS,
    ROTARY_DIM_ATTRS,
)
from ...graph.ir import OpNode, ValueRef
from .patch import TUPLE_WRITES, WRITES, has_patcher
from .widths import describes_only, width_name

Widths = dict[str, dict[str, list[object]]]  # module -> attr -> [old, new]


def _ints(obj: Any) -> Iterator[int]:
    """Integer (not bool) leaves of an op's non-tensor arguments."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, int):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _ints(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _ints(item)


# Names a plan may record (`explorer.io.plan_rules`): widths, head counts and shapes only.
_NAMED = WRITES | set(HEAD_COUNT_ATTRS) | set(HEAD_DIM_ATTRS) | set(HEAD_WIDTH_ATTRS) | \
    set(KV_HEAD_ATTRS) | set(ROTARY_DIM_ATTRS)


def _int_attrs(module: nn.Module) -> dict[str, int | tuple[int, ...]]:
    """Public attributes holding an int (width-like name) or a tuple of ints (a shape)."""
    out: dict[str, int | tuple[int, ...]] = {}
    for attr, value in vars(module).items():
        if attr.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, tuple) and attr not in TUPLE_WRITES:
            continue
        if isinstance(value, int) and not (attr in _NAMED or width_name(attr)):
            continue
        is_int = isinstance(value, int) and value > 1
        is_ints = isinstance(value, tuple) and bool(value) and \
            all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if is_int or is_ints:
            out[attr] = value
    return out


def _flat(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value,)


def _evidence(coupling: Coupling, attrs: dict[str, dict[str, int | tuple[int, ...]]],
              removed_atoms: np.ndarray, named: dict[str, dict[str, set[int]]]
              ) -> dict[str, dict[int, set[int]]]:
    """Module -> old size -> new sizes, from dims of the tensors of ops whose integer
    arguments hold one of the module's attribute values; fills ``named`` (module -> attr
    -> new sizes) where the source line names the attribute at a position."""
    count = coupling.survivors(removed_atoms)
    table: dict[str, dict[int, set[int]]] = {}
    for node in coupling.graph.ops:
        own = attrs.get(node.module)
        if not own:
            continue
        wanted = {v for value in own.values() for v in _flat(value)} & \
            set(_ints((node.args, node.kwargs)))
        if not wanted:
            continue
        _by_name(coupling, node, own, count, named.setdefault(node.module, {}))
        sizes = table.setdefault(node.module, {})
        for vid in _tensor_ids(coupling, node):
            for ids in coupling.value_dims(vid):
                if len(ids) in wanted:
                    sizes.setdefault(len(ids), set()).add(count(ids))
    return table


_SHAPING = {torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.reshape}
_SPLITS = {torch.ops.aten.split_with_sizes, torch.ops.aten.split}


def _by_name(coupling: Coupling, node: OpNode, own: dict[str, int | tuple[int, ...]],
             count: Callable[[np.ndarray], int], named: dict[str, set[int]]) -> None:
    """New sizes of the attributes the op's source line names at each position."""
    if node.location and node.op.overloadpacket is torch.ops.aten.slice:
        _slice_bounds(coupling, node, own, count, named)
        return
    found = _positional(coupling, node, count) if node.location else None
    if found is None:
        return
    values, new = found
    names = _named_positions(node.location, values, own)
    for name, size in zip(names or [], new, strict=False):
        if name is not None and isinstance(own.get(name), int):
            named.setdefault(name, set()).add(size)


def _slice_bounds(coupling: Coupling, node: OpNode, own: dict[str, int | tuple[int, ...]],
                  count: Callable[[np.ndarray], int], named: dict[str, set[int]]) -> None:
    """A slice bound the source names (``q[..., :self.rotary_ndims]``, ``q[...,
    self.rotary_ndims:]``): the rotated part of partial rotary embeddings. The bound is
    the new width of a head slice (``[:a]``) or of what the tail slice leaves (``[a:]``)."""
    args = list(node.args) + [None] * (4 - len(node.args))
    dim, start, end = (args[1] if args[1] is not None else 0), args[2], args[3]
    if not (isinstance(dim, int) and isinstance(node.args[0], ValueRef) and node.outputs
            and node.outputs[0] is not None):
        return
    src = coupling.value_dims(node.args[0].vid)
    out = coupling.value_dims(node.outputs[0])
    if not -len(src) <= dim < len(src) or len(src) != len(out):
        return
    old_in = len(src[dim])
    new_in, new_out = count(src[dim]), count(out[dim])
    start = 0 if start is None else start
    end = old_in if end is None or end > old_in else end
    for attr, bound in _named_bounds(node.location, own):
        if bound == "upper" and own.get(attr) == end and start == 0:
            named.setdefault(attr, set()).add(new_out)
        elif bound == "lower" and own.get(attr) == start and end == old_in:
            named.setdefault(attr, set()).add(new_in - new_out)


def _named_bounds(location: str, attrs: dict[str, int | tuple[int, ...]]
                  ) -> list[tuple[str, str]]:
    """``(attr, "lower"|"upper")`` for every ``self.<attr>`` slice bound in the statement."""
    return [(attr, bound) for attr, bound in _slice_bounds_of(location) if attr in attrs]


@functools.lru_cache(maxsize=4096)  # a statement is parsed once, not at every cut
def _slice_bounds_of(location: str) -> tuple[tuple[str, str], ...]:
    """``(attr, "lower"|"upper")`` for every ``self.<attr>`` slice bound in the statement."""
    path, _, line = location.rpartition(":")
    if not line.isdigit():
        return ()
    first = int(line)
    text = " ".join(linecache.getline(path, n).strip() for n in range(first, first + 4))
    found: list[tuple[str, str]] = []
    for segment in _bracketed(text):
        if not segment.startswith("["):
            continue
        try:
            tree = ast.parse("_" + segment, mode="eval").body
        except SyntaxError:
            continue
        if not isinstance(tree, ast.Subscript):
            continue
        parts = tree.slice.elts if isinstance(tree.slice, ast.Tuple) else [tree.slice]
        for part in parts:
            if not isinstance(part, ast.Slice):
                continue
            for bound, e in (("lower", part.lower), ("upper", part.upper)):
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and \
                        e.value.id == "self":
                    found.append((e.attr, bound))
    return tuple(dict.fromkeys(found))


def _positional(coupling: Coupling, node: OpNode, count: Callable[[np.ndarray], int]
                ) -> tuple[list[int], list[int]] | None:
    """(integer list argument, new size at each position) for ops whose list argument
    gives output sizes: ``view``/``reshape`` (output dims) and ``split`` (output parts)."""
    packet = node.op.overloadpacket
    sizes = node.args[1] if len(node.args) > 1 else None
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(v, int) for v in sizes):
        return None
    if packet in _SHAPING and node.outputs and node.outputs[0] is not None:
        dims = coupling.value_dims(node.outputs[0])
        if len(dims) == len(sizes):
            return list(sizes), [count(d) for d in dims]
    if packet in _SPLITS and len(node.outputs) == len(sizes):
        dim = node.args[2] if len(node.args) > 2 else 0
        new = []
        for vid in node.outputs:
            dims = coupling.value_dims(vid) if vid is not None else []
            if not isinstance(dim, int) or not -len(dims) <= dim < len(dims):
                return None
            new.append(count(dims[dim]))
        return list(sizes), new
    return None


def _named_positions(location: str, values: list[int],
                     attrs: dict[str, int | tuple[int, ...]]) -> list[str | None] | None:
    """The ``self.<attr>`` at each position of the list or call arguments in the source
    statement that match ``values`` (None where the element is not such an attribute)."""
    for names in _positions_of(location):
        if len(names) == len(values) and any(names) and all(
                n is None or attrs.get(n) == v for n, v in zip(names, values, strict=True)):
            return list(names)
    return None


@functools.lru_cache(maxsize=4096)  # a statement is parsed once, not at every cut
def _positions_of(location: str) -> tuple[tuple[str | None, ...], ...]:
    """Per list or call arguments of the source statement at ``location``: the
    ``self.<attr>`` at each position (None where it is another expression)."""
    path, _, line = location.rpartition(":")
    if not line.isdigit():
        return ()
    first = int(line)  # a statement's first line; its arguments may follow on the next
    text = " ".join(linecache.getline(path, n).strip() for n in range(first, first + 4))
    out: list[tuple[str | None, ...]] = []
    for segment in _bracketed(text):
        try:
            tree = ast.parse(segment, mode="eval").body
        except SyntaxError:
            continue
        elts = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
        out.append(tuple(e.attr if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name)
                         and e.value.id == "self" else None for e in elts))
    return tuple(out)


def _bracketed(text: str) -> Iterator[str]:
    """Every balanced ``[...]`` and ``(...)`` substring of one source line."""
    closing = {"[": "]", "(": ")"}
    for start, ch in enumerate(text):
        if ch not in closing:
            continue
        depth = 0
        for end in range(start, len(text)):
            if text[end] in "[(":
                depth += 1
            elif text[end] in "])":
                depth -= 1
                if depth == 0:
                    yield text[start:end + 1]
                    break


def _tensor_ids(coupling: Coupling, node: OpNode) -> list[int]:
    ids = coupling.graph.tensor_ids((node.args, node.kwargs))
    return ids + [v for v in node.outputs if v is not None]


def patch_scoped_widths(model: nn.Module, coupling: Coupling, removed_atoms: np.ndarray,
                        already: Widths) -> Widths:
    """Set width attributes that traced ops read to their pruned sizes; returns changes.

    Args:
        model: the model whose tensors were just resized.
        coupling: the coupling the removal was computed on.
        removed_atoms: the removed atom classes.
        already: attributes other fix-ups set (left as they set them).
    """
    traced = {node.module for node in coupling.graph.ops}
    attrs: dict[str, dict[str, int | tuple[int, ...]]] = {}
    for name in traced:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if has_patcher(module):
            continue  # conv groups, norm shapes: its type's handler keeps them
        found = {a: v for a, v in _int_attrs(module).items()
                 if a not in already.get(name, {}) and not describes_only(module, a)}
        if found:
            attrs[name] = found
    changes: Widths = _split_lists(model, coupling, removed_atoms, already)
    named: dict[str, dict[str, set[int]]] = {}
    for name, sizes in _evidence(coupling, attrs, removed_atoms, named).items():
        module = model.get_submodule(name)
        for attr, value in attrs[name].items():
            by_name = named.get(name, {}).get(attr, set())
            new = next(iter(by_name)) if len(by_name) == 1 else _mapped(value, sizes)
            if new is not None and new != value:
                setattr(module, attr, new)
                changes.setdefault(name, {})[attr] = [value, new]
    return changes


def _mapped(value: int | tuple[int, ...],
            sizes: dict[int, set[int]]) -> int | tuple[int, ...] | None:
    """``value`` with every element that has one unambiguous new size replaced; None when
    an element is ambiguous or no element is in ``sizes``."""
    out: list[int] = []
    hit = False
    for v in _flat(value):
        new = sizes.get(v)
        if new is None:
            out.append(v)
        elif len(new) == 1:
            out.append(next(iter(new)))
            hit = True
        else:
            return None
    if not hit:
        return None
    return tuple(out) if isinstance(value, tuple) else out[0]


# List attributes a module passes whole as the sizes of a split: CoaT's
# ``torch.split(v_img, self.channel_splits, dim=1)`` (channels per window group of heads).
SPLIT_LISTS = ("_splits", "_sizes")


def _split_lists(model: nn.Module, coupling: Coupling, removed_atoms: np.ndarray,
                 already: Widths) -> Widths:
    """Set list attributes (names ending in `SPLIT_LISTS`) that a traced ``split`` received
    whole, named on its source line, to the parts' pruned sizes; unchanged when two calls
    disagree."""
    count = coupling.survivors(removed_atoms)
    found: dict[tuple[str, str], set[tuple[int, ...]]] = {}
    for node in coupling.graph.ops:
        if node.op.overloadpacket not in _SPLITS or not node.location:
            continue
        try:
            module = model.get_submodule(node.module)
        except AttributeError:
            continue
        lists = {a: v for a, v in vars(module).items() if a.endswith(SPLIT_LISTS) and
                 not a.startswith("_") and a not in already.get(node.module, {}) and
                 isinstance(v, list)}
        got = _positional(coupling, node, count) if lists else None
        if got is None:
            continue
        values, new = got
        path, _, line = node.location.rpartition(":")
        text = " ".join(linecache.getline(path, int(line) + k) for k in range(4)) \
            if line.isdigit() else ""
        for attr, value in lists.items():
            if value == values and re.search(rf"\bself\.{re.escape(attr)}\b", text):
                found.setdefault((node.module, attr), set()).add(tuple(new))
    changes: Widths = {}
    for (name, attr), news in sorted(found.items()):
        if len(news) != 1:
            continue
        module = model.get_submodule(name)
        old, new = list(getattr(module, attr)), list(next(iter(news)))
        if new != old:
            setattr(module, attr, new)
            changes.setdefault(name, {})[attr] = [old, new]
    return changes
