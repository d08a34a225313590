"""Where each axis of a group lives: the layer its members share.

A group can span many layers (the head group of a Llama couples every layer's attention
through the shared rotary frequencies); each of its axes still belongs to one layer or is
shared by all. Reports list cuts by these places, not under the group's first module.
"""
from __future__ import annotations

from .analyze import Coupling
from .groups import Group, common_prefix

SHARED = "all layers (shared)"  # an axis whose members sit in several numbered layers


def axis_layers(coupling: Coupling, group: Group) -> dict[int, str]:
    """Axis index -> the layer (module prefix) its members share, `SHARED` when several."""
    members = coupling.members_of(group)
    out: dict[int, str] = {}
    for i, ax in enumerate(group.axes):
        mods = sorted({m.module for m, fams in members if ax.family in fams})
        many = len({_layer_index(m) for m in mods}) > 1
        out[i] = SHARED if many else (common_prefix([m for m in mods if m]) or "model")
    return out


def _layer_index(module: str) -> str:
    """The first numbered part of a module path (``layers.3``), or the path."""
    parts = module.split(".")
    for k, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:k + 1])
    return module


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders module names as people count: ``layers.2`` before ``layers.10``."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in name.replace(".", " ").split())
