"""Width attributes read by a module's forward, found from the ops it ran.

A module need not own a resized tensor to read a width: OLMo's weightless LayerNorm calls
``F.layer_norm(x, self.normalized_shape)``, LeViT's attention calls
``split([self.key_dim, self.key_dim, self.val_dim])`` and ``reshape(B, N, self.val_attn_dim)``.
The trace records, for every op, the module that ran it and its integer arguments. An
integer attribute of that module (or an integer inside a tuple attribute) whose value is
one of those arguments, and is the size of a dim of the op's tensors that pruning changes,
is set to the new size. Only unambiguous evidence is used: when the same old size maps to
two new sizes in a module (a pruned channel dim and an untouched token dim of equal size),
the attribute is left alone and the pre-flight reports the group with its line.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch import nn

from ...coupling.analyze import Coupling
from ...graph.ir import OpNode

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


def _int_attrs(module: nn.Module) -> dict[str, int | tuple[int, ...]]:
    """Public attributes holding an int or a non-empty tuple of ints."""
    out: dict[str, int | tuple[int, ...]] = {}
    for attr, value in vars(module).items():
        if attr.startswith("_") or isinstance(value, bool):
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
              removed_atoms: np.ndarray) -> dict[str, dict[int, set[int]]]:
    """Module -> old size -> new sizes, from dims of the tensors of ops whose integer
    arguments hold one of the module's attribute values."""
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
        sizes = table.setdefault(node.module, {})
        for vid in _tensor_ids(coupling, node):
            for ids in coupling.value_dims(vid):
                if len(ids) in wanted:
                    sizes.setdefault(len(ids), set()).add(count(ids))
    return table


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
        found = {a: v for a, v in _int_attrs(module).items() if a not in already.get(name, {})}
        if found:
            attrs[name] = found
    changes: Widths = {}
    for name, sizes in _evidence(coupling, attrs, removed_atoms).items():
        module = model.get_submodule(name)
        for attr, value in attrs[name].items():
            new = _mapped(value, sizes)
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
