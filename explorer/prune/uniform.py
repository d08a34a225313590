"""Whether a cut keeps one width per layer kind, and the same cut in every layer.

A transformers config holds one ``intermediate_size`` (one head count, one head size) for
every layer, so a ``from_pretrained`` folder can describe a pruned model only while every
layer of a kind keeps the same shapes. `breaks_uniform` says, before a cut is applied, which
kinds it would make differ (from the indices it keeps); `same_cut_everywhere` offers the same cut
in the other layers as one joint proposal.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from torch import nn

from ..coupling.analyze import Coupling
from ..coupling.targets import target_of
from .proposal import Proposal
from .removal import Removal, removed_atoms

SAME_CUT = ("the same cut in every layer, so every layer of a kind keeps one width and the "
            "export stays a from_pretrained folder")  # the reason of `same_cut_everywhere`
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def kind_of(name: str) -> tuple[str, str]:
    """(the kind: ``model.layers.*.mlp.gate_proj.weight``, the layer: ``model.layers.3``) of a
    parameter name; the layer is '' for a name outside numbered layers."""
    m = _INDEX.search(name)
    if m is None:
        return name, ""
    return name[:m.start()] + "*" + name[m.end():], name[:m.end()]


def shapes_by_kind(model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """Kind -> layer -> shape, for every parameter that lives in a numbered layer."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, p in model.named_parameters():
        kind, layer = kind_of(name)
        if layer:
            out.setdefault(kind, {})[layer] = tuple(p.shape)
    return out


def differing(shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> list[str]:
    """One line per kind whose layers do not all have the same shape, e.g.
    ``model.layers.*.mlp.gate_proj.weight: 768x576 in model.layers.0, 1536x576 in 29 other
    layers``."""
    lines = []
    for kind, layers in shapes.items():
        counts: dict[tuple[int, ...], list[str]] = {}
        for layer, shape in layers.items():
            counts.setdefault(shape, []).append(layer)
        if len(counts) < 2:
            continue
        parts = sorted(counts.items(), key=lambda kv: len(kv[1]))
        words = [f"{'x'.join(map(str, s))} in " + (ls[0] if len(ls) == 1 else f"{len(ls)} layers")
                 for s, ls in parts]
        lines.append(f"{kind}: " + ", ".join(words))
    return lines


def breaks_uniform(model: nn.Module, coupling: Coupling, removal: Removal) -> list[str]:
    """The kinds whose layers ``removal`` would make differ in shape (kinds that differ
    already are left out), from the indices it keeps (no copy is cut); ``model`` is
    untouched.

    Raises:
        PruneError: if the removal does not fit the model.
    """
    before = set(differing(shapes_by_kind(model)))
    keeps = coupling.keep_indices(removed_atoms(coupling, removal))
    after: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, p in model.named_parameters():
        kind, layer = kind_of(name)
        if layer:
            after.setdefault(kind, {})[layer] = tuple(
                len(keeps[(name, d)]) if (name, d) in keeps else n for d, n in enumerate(p.shape))
    kinds_before = {line.split(":", 1)[0] for line in before}
    return [line for line in differing(after) if line.split(":", 1)[0] not in kinds_before]


def _signature(p: Proposal) -> tuple[object, ...]:
    """What must match for two proposals to be the same cut in different layers."""
    return (target_of(p.group), _INDEX.sub("*", p.group.title),
            tuple((p.group.axes[a].role, c.width_before) for a, c in zip(p.axes, p.changes,
                                                                          strict=True)))


def same_cut_everywhere(proposal: Proposal, pending: Sequence[Proposal]) -> Proposal | None:
    """``proposal`` joined by every other pending proposal that is the same cut in another
    layer (same target, same title but for the layer index, same widths), each cut by the
    same fraction (`Proposal.removal`); None when there is no other such proposal."""
    if proposal.joint:
        return None
    sig = _signature(proposal)
    partners = [q for q in pending if q.key != proposal.key and not q.joint
                and _signature(q) == sig]
    if not partners:
        return None
    return dataclasses.replace(proposal, partners=partners, reason=SAME_CUT)
