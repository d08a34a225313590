"""Keep attention modules' head attributes in line with pruned heads and head dims.

Attention code reads head counts from attributes (``self.num_heads``, ``self.head_dim``,
``num_key_value_groups``) and from config objects. After a head group is pruned, the
nearest ancestor module of each member that carries such attributes is updated, but only
where the old value matches the traced head structure (so unrelated attributes are never
touched). A count the forward reads through the shared config (``self.config.<field>``) is
set on the module's own copy of the config (`fixups.configs`). Attention scaling is left as
it was, which keeps logits on kept dims unchanged.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from ...coupling.analyze import Coupling
from ...coupling.heads import (
    HEAD_COUNT_ATTRS,
    HEAD_DIM_ATTRS,
    HEAD_WIDTH_ATTRS,
    KV_HEAD_ATTRS,
    head_counts,
    owner_members,
    traced_queries,
)
from .configs import CONFIG, own
from .reads import config_reads


def _set(module: object, names: tuple[str, ...], old: int, new: int,
         log: dict[str, list[object]]) -> None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value == old and old != new:
            setattr(module, name, new)
            log[name] = [old, new]


def _config_counts(module: nn.Module, name: str, pairs: list[tuple[tuple[str, ...], int, int]],
                   configs: dict[str, object], log: dict[str, list[object]]) -> None:
    """Counts the forward reads as ``self.config.<field>`` (``pairs``: fields, old, new),
    set on the module's own copy of its config where the config holds the old value."""
    reads = config_reads(module)
    held = vars(module).get("config")
    values: dict[str, object] = {}
    for names, old, new in pairs:
        for field in names:
            value = getattr(held, field, None)
            if field in reads and isinstance(value, int) and not isinstance(value, bool) \
                    and value == old and old != new:
                values[field] = new
                log[CONFIG + field] = [old, new]
    if values:
        own(module, name, values, configs)


def _head_widths(coupling: Coupling, dead: np.ndarray | None
                 ) -> Callable[[str], tuple[int, int] | None]:
    """Module -> (head width, head width after removing ``dead``) of q at its attention op,
    None where not traced (or no atoms are given)."""
    if dead is None:
        return lambda _name: None
    queries = traced_queries(coupling.graph)
    count = coupling.survivors(dead)

    def widths(name: str) -> tuple[int, int] | None:
        vid = queries.get(name)
        dims = coupling.value_dims(vid) if vid is not None else []
        return (len(dims[-1]), count(dims[-1])) if dims else None
    return widths


def patch_attention(model: nn.Module, coupling: Coupling,
                    removed_per_axis: dict[int, dict[int, int]],
                    keeps: dict[tuple[str, int], np.ndarray],
                    configs: dict[str, object] | None = None,
                    dead: np.ndarray | None = None) -> dict[str, dict[str, list[object]]]:
    """Update head attributes for every pruned head group; returns module -> changes.

    Head counts are computed per attention module (a group can span several layers when
    they share a rotary embedding), from that module's own members. With the removed atoms
    (``dead``) the new head width is counted on q as the attention op reads it, channel by
    channel: a head made of several head-dim axes (GPT-NeoX's rotated pairs and unrotated
    dims in one fused weight) loses what each of them loses. A module given its own config
    copy has the object it held recorded in ``configs`` (module -> config).
    """
    configs = {} if configs is None else configs
    widths = _head_widths(coupling, dead)
    changes: dict[str, dict[str, list[object]]] = {}
    for gid, removed in removed_per_axis.items():
        group = coupling.groups[gid]
        if group.heads is None:
            continue
        kept_axis = {a.family: a.size - removed.get(i, 0) for i, a in enumerate(group.axes)}
        by_owner = owner_members(model, coupling, group, buffers=True, unowned=False)
        pieces = coupling.pieces_of(group)
        for name, members in by_owner.items():
            old = head_counts(group.axes, members, head_dims=coupling.head_dims, pieces=pieces)
            new = head_counts(group.axes, members, kept_axis, head_dims=coupling.head_dims,
                              pieces=pieces)
            if old is None or new is None:
                continue
            exact = widths(name)
            if exact is not None and exact[0] == old[1]:
                new = (new[0], exact[1], new[2])
            module = model.get_submodule(name)
            log = changes.setdefault(name, {})
            _set(module, HEAD_COUNT_ATTRS, old[0], new[0], log)
            _set(module, HEAD_DIM_ATTRS, old[1], new[1], log)
            if old[2] is not None and new[2] is not None:
                _set(module, KV_HEAD_ATTRS, old[2], new[2], log)
                _set(module, ("num_key_value_groups",), old[0] // old[2],
                     new[0] // max(new[2], 1), log)
            _set(module, HEAD_WIDTH_ATTRS, old[0] * old[1], new[0] * new[1], log)
            pairs = [(HEAD_COUNT_ATTRS, old[0], new[0]), (HEAD_DIM_ATTRS, old[1], new[1]),
                     (HEAD_WIDTH_ATTRS, old[0] * old[1], new[0] * new[1])]
            if old[2] is not None and new[2] is not None:
                pairs.append((KV_HEAD_ATTRS, old[2], new[2]))
            _config_counts(module, name, pairs, configs, log)
            if old[1] != new[1] and getattr(module, "fused_attn", None) is True:
                setattr(module, "fused_attn", False)  # noqa: B010 - fused SDPA would rescale by the new head_dim
                log["fused_attn"] = [True, False]  # keeps the original attention scale
            if not log:
                del changes[name]
    return changes


