"""What a prune will cut, per target, said before anything is cut.

`statement` runs the pruner's own checked proposal (`Pruner.checked`, the picks a step makes
once the pre-flight has dropped what breaks the forward) and sums it per target
(`explorer.coupling.targets`): the widths each target goes from and to, the attention heads,
the parameters it removes, and in words how the ratio is read. Where whole units round the
ratio (three key/value groups a layer cannot lose 25 %), it says what is really removed and
why; where layers keep different widths (global or measured allocation), each layer's real
count ("8 -> 4 in layers 1, 3; kept in layers 0, 2"), never an average; a selected target
such an allocation gives none of the cut is said uncut, with why; what the pre-flight refuses
is said apart and counted nowhere.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..coupling.groups import Group, number_ranges
from ..coupling.heads import query_kv_heads_by_axis
from ..coupling.places import axis_layers, natural_key
from ..coupling.targets import target_list, target_of
from ..coupling.vocab import AxisRole, HeadMode, Target
from .counts import global_counts, normalised
from .measured import LEVELS
from .pruner import Pruner
from .records import GroupChange
from .removal import Removal

TOLERANCE = 0.005  # a removed fraction this close to the ratio asked is not called rounded


@dataclass(frozen=True)
class Width:
    """Axes of one role that go from one width to another (``count`` of them)."""

    role: str
    before: int
    after: int
    count: int
    # which layers, where this role's widths differ between layers ("layers 1, 3"), else ""
    layers: str = ""


@dataclass(frozen=True)
class LayerHeads:
    """One layer's query and key/value heads before and after the cut."""

    layer: str  # the attention module (`coupling.places.axis_layers`)
    query_before: int
    query_after: int
    kv_before: int
    kv_after: int


@dataclass
class TargetLoss:
    """What one target will lose."""

    target: str
    selected: bool
    groups: int  # prunable groups of this kind
    cut: int  # groups the plan cuts
    params_removed: int
    reading: str  # how the ratio is read for this target, or why it is left alone
    widths: list[Width] = field(default_factory=list)
    removed_fraction: float | None = None  # of the widths cut (heads: of the heads)
    heads: dict[str, int] | None = None  # query / key-value heads before and after
    head_layers: list[LayerHeads] = field(default_factory=list)  # the same, layer by layer
    note: str = ""  # the ratio asked vs the fraction removed, and why they differ

    def line(self) -> str:
        """One line for the command line's text output: ``"mlp: 20% of ..."``."""
        return f"{self.target}: {self.details()}"

    def details(self) -> str:
        """How the ratio is read, the widths, heads and parameters it removes, the note."""
        parts = [self.reading]
        if self.cut:
            gqa = self.heads is not None and self.heads["kv_before"] != self.heads["query_before"]
            parts.append(", ".join(_widths_words(self.widths, gqa)))
        if self.heads and self.cut:
            h, per = self.heads, self.head_layers
            words = _heads_words("query heads", h["query_before"], h["query_after"],
                                 [(x.layer, x.query_before, x.query_after) for x in per])
            if h["kv_before"] != h["query_before"]:
                words += ", " + _heads_words("key/value heads", h["kv_before"], h["kv_after"],
                                             [(x.layer, x.kv_before, x.kv_after) for x in per])
            parts.append(words)
        if self.cut:
            parts.append(f"-{self.params_removed:,} params")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


@dataclass
class Statement:
    """The whole statement: the ratio used, and each target's loss."""

    ratio: float  # the ratio the plan uses (searched when a parameter/MAC target is set)
    targets: list[str]  # the targets selected
    default: bool  # the targets are the model's default
    params_before: int
    params_after: int  # predicted for the cut the pre-flight lets through
    losses: list[TargetLoss]
    # "uniform": every layer of a kind keeps the same width (a transformers config describes
    # it); "global": widths ranked across layers (`--global`); "measured": widths from the
    # change each layer's cut causes alone (`--allocation measured`); "per-group": ``ratios``
    allocation: str = "uniform"
    # groups the settings would cut but the pre-flight refuses (left uncut, not counted above)
    refused: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """Lines for the command line: a heading, then one line per target."""
        which = ", ".join(self.targets) + (" (default)" if self.default else "")
        head = (f"what will be cut (ratio {self.ratio:.3g}, targets {which}, {self.allocation}"
                f" widths): params {self.params_before:,} -> {self.params_after:,}")
        return "\n".join([head, *(f"  {loss.line()}" for loss in self.losses),
                          *(f"  refused by the pre-flight: {r}" for r in self.refused)])


def statement(pruner: Pruner) -> Statement:
    """What ``pruner``'s full prune will cut, per target, before cutting (scores are
    computed, as the first step would; nothing is changed)."""
    ratio = pruner.plan_ratio()
    removal, checked = pruner.checked(ratio)
    changes = checked.changes
    params = pruner.params_now()
    losses = []
    for target in Target:
        groups = [g for g in pruner.groups if g.prunable and target_of(g) is target]
        if not groups:
            continue
        ids = {g.id for g in groups}
        mine = [c for c in changes if c.group in ids]
        part = Removal({k: v for k, v in removal.picks.items() if k[0] in ids})
        loss = TargetLoss(target.value, target in pruner.targets, len(groups),
                          len({c.group for c in mine}),
                          params - pruner.predict_params(part) if part else 0,
                          _reading(pruner, target, ratio), _widths(mine, Counter(
                              g.axes[a].role for g in groups for a in pruner.target_axes(g))))
        if target is Target.HEADS:
            loss.head_layers = _head_layers(pruner, groups, part)
            loss.heads = _head_totals(loss.head_layers)
        loss.removed_fraction = _fraction(mine, loss.heads)
        stopped = [u.group for u in checked.unsafe if u.group in ids]
        loss.note = (f"the pre-flight refuses the cut of {len(stopped)} group(s) (below)"
                     if stopped and not mine else
                     _rounding(pruner, target, ratio, loss, mine, groups))
        losses.append(loss)
    allocation = pruner.allocation if pruner.allocation != "uniform" else \
        "per-group" if pruner.ratios else "uniform"
    refused = [f"group {u.group} ({u.module}) fails at {u.location}: {u.error}; {u.advice}"
               for u in checked.unsafe]
    return Statement(ratio, target_list(pruner.targets), pruner.targets_default, params,
                     pruner.predict_params(removal), losses, allocation, refused)


def _reading(pruner: Pruner, target: Target, ratio: float) -> str:
    """How the ratio is read for ``target`` (or why the target is left alone)."""
    if target not in pruner.targets:
        return f"kept: {pruner.untargeted(target)}"
    mode = HeadMode(pruner.heads)
    if target is Target.HEADS and mode is HeadMode.KEEP:
        return "kept: heads 'keep' leaves every attention parameter unchanged"
    pct = f"{ratio:.0%}"
    gqa = any(g.heads is not None and g.heads.kv_heads for g in pruner.groups)
    if pruner.global_pruning:
        return (f"{pct} of all selected channels ranked together across groups (scores "
                f"normalised per axis), each keeping at least {1 - pruner.max_ratio:.0%}: "
                f"widths differ per layer")
    if pruner.allocation == "measured":
        return (f"as many parameters as {pct} of each group's channels, shared out by the "
                f"change each layer's cut causes alone on calibration data (each cut alone at "
                f"{len(LEVELS)} depths and measured): widths differ per layer")
    words = {
        Target.MLP: f"{pct} of each MLP's hidden units, in every layer",
        Target.RESIDUAL: f"{pct} of the hidden size: one width shared by the embeddings, "
                         f"every norm and every projection reading or writing the residual "
                         f"stream",
        Target.CHANNELS: f"{pct} of each group's channels",
        Target.HEADS: {
            HeadMode.DIMS: f"{pct} of the dims inside every head (the same dims in each "
                           f"head), in every layer",
            HeadMode.WHOLE: f"{pct} of each layer's heads, as whole key/value groups with "
                            f"their query heads" if gqa else f"{pct} of each layer's heads, "
                                                             f"as whole heads",
            HeadMode.QUERY: f"{pct} of the query heads inside every key/value group, keys "
                            f"and values kept" if gqa else f"{pct} of each layer's heads, as "
                                                           f"whole heads (no key/value groups)",
        }.get(mode, ""),
    }[target]
    if pruner.target_params is not None or pruner.target_macs is not None:
        goal = ("parameters" if pruner.target_params is not None else "MACs")
        frac = pruner.target_params if pruner.target_params is not None else pruner.target_macs
        words = f"ratio {ratio:.3g} searched to keep {frac:.0%} of the {goal}: {words}"
    if pruner.ratios:
        words += " (per-module ratios: " + ", ".join(
            f"{k} {v:.0%}" for k, v in sorted(pruner.ratios.items())) + ")"
    return words


def _widths(changes: list[GroupChange], axes: Counter[AxisRole]) -> list[Width]:
    """The widths cut, one per (role, before, after); where a role's widths differ between
    layers (``axes``: how many axes of each role the target has), each says its layers."""
    counts = Counter((c.axis, c.width_before, c.width_after) for c in changes)
    mixed = {r for r in {c.axis for c in changes} if sum(k[0] is r for k in counts) > 1
             or sum(c.axis is r for c in changes) < axes[r]}
    return [Width(str(r), b, a, n, _layer_list(
        [c.where for c in changes if (c.axis, c.width_before, c.width_after) == (r, b, a)])
        if r in mixed and all(c.where for c in changes) else "")
        for (r, b, a), n in sorted(counts.items())]


def _width_words(w: Width, gqa: bool) -> str:
    words = AxisRole(w.role).words(w.before, gqa)
    where = f" in {w.layers}" if w.layers else f" (x{w.count})" if w.count > 1 else ""
    return f"{words} {w.before} -> {w.after}{where}"


def _widths_words(widths: list[Width], gqa: bool) -> list[str]:
    """The widths in words; a rotary model's two head-dim widths said as what they are."""
    dims = sorted((w for w in widths if w.role == str(AxisRole.HEAD_DIM)), key=lambda w: w.before)
    if len(dims) == 2 and dims[0].count == 1 and dims[1].before == 2 * dims[0].before \
            and dims[1].after == 2 * dims[0].after:
        half, full = dims
        where = f" in each of {full.count} layers" if full.count > 1 else ""
        return [*(_width_words(w, gqa) for w in widths if w.role != str(AxisRole.HEAD_DIM)),
                f"dims per head {full.before} -> {full.after}{where} (query and key: both "
                f"rotary halves {half.before} -> {half.after}, the same dims in every layer, "
                f"which read one rotary table; value and output: in each layer)"]
    return [_width_words(w, gqa) for w in widths]


def _heads_words(name: str, before: int, after: int, layers: list[tuple[str, int, int]]
                 ) -> str:
    """``query heads 32 -> 24 (8 -> 6 in each of 4 layers)``, all kept, or, where layers
    differ, each layer's real count: ``query heads 32 -> 16 (8 -> 4 in layers 0, 2; kept in
    layers 1, 3)``."""
    counts = Counter((b, a) for _l, b, a in layers)
    if before == after:
        return (f"{name} all kept ({layers[0][1]} in each of {len(layers)} layers)"
                if len(layers) > 1 and len(counts) == 1 else f"{name} all kept ({before})")
    head = f"{name} {before} -> {after}"
    if len(layers) < 2:
        return head
    if len(counts) == 1:
        (b, a), = counts
        return f"{head} ({b} -> {a} in each of {len(layers)} layers)"
    parts = []
    for b, a in sorted(counts, key=lambda k: (k[1] - k[0], k)):
        where = _layer_list([lay for lay, lb, la in layers if (lb, la) == (b, a)])
        parts.append(f"kept in {where}" if a == b else f"{b} -> {a} in {where}")
    return f"{head} ({'; '.join(parts)})"


def _layer_list(layers: list[str]) -> str:
    """``layers 0, 2`` from ``model.layers.0.self_attn``, ``model.layers.2.self_attn`` (the
    numbered part that differs), else the names."""
    names = sorted(layers, key=natural_key)
    split = [n.split(".") for n in names]
    at = next((k for k, p in enumerate(split[0]) if p.isdigit()), None)
    if at is not None and all(len(p) == len(split[0]) and p[at].isdigit() and
                              p[:at] + p[at + 1:] == split[0][:at] + split[0][at + 1:]
                              for p in split):
        return ("layers " if len(names) > 1 else "layer ") + number_ranges(
            int(p[at]) for p in split)
    return ", ".join(names)


def _head_layers(pruner: Pruner, groups: list[Group], part: Removal) -> list[LayerHeads]:
    """Each layer's query and key/value heads before and after ``part``, in layer order."""
    out = []
    for g in groups:
        cut = {a: len(idx) for (gid, a), idx in part.picks.items() if gid == g.id}
        found = query_kv_heads_by_axis(pruner.coupling, g, cut)
        if found:
            where = axis_layers(pruner.coupling, g)
            out += [LayerHeads(where[i], *counts) for i, counts in found.items()]
    return sorted(out, key=lambda x: natural_key(x.layer))


def _head_totals(layers: list[LayerHeads]) -> dict[str, int] | None:
    """Query and key/value heads before and after, summed over every layer."""
    if not layers:
        return None
    return {"query_before": sum(x.query_before for x in layers),
            "query_after": sum(x.query_after for x in layers),
            "kv_before": sum(x.kv_before for x in layers),
            "kv_after": sum(x.kv_after for x in layers), "layers": len(layers)}


def _fraction(changes: list[GroupChange], heads: dict[str, int] | None) -> float | None:
    """The fraction removed: of the heads when whole heads go, else of the widths cut."""
    whole = {AxisRole.HEADS, AxisRole.HEAD_REPEAT}
    if heads and any(c.axis in whole for c in changes) and heads["query_before"]:
        return 1 - heads["query_after"] / heads["query_before"]
    before = sum(c.width_before for c in changes)
    return None if not before else sum(c.width_before - c.width_after
                                       for c in changes) / before


def _rounding(pruner: Pruner, target: Target, ratio: float, loss: TargetLoss,
              changes: list[GroupChange], groups: list[Group]) -> str:
    """Why the fraction removed differs from the ratio asked, when it does."""
    got = loss.removed_fraction
    if ratio <= 0 or not loss.selected:
        return ""
    if pruner.allocation != "uniform" and got is None:
        return _left_out(pruner, target, {g.id for g in groups})
    if pruner.allocation != "uniform" or pruner.ratios:
        return ""
    if got is None:  # nothing of this target is cut: every width rounds back to itself
        sizes = [g.axes[a].size for g in groups for a in pruner.target_axes(g)]
        if not sizes:
            return ""
        return (f"removes nothing at {ratio:.0%}: the narrowest width to cut is "
                f"{min(sizes)}, and {ratio:.0%} of it rounds to none")
    if abs(got - ratio) <= TOLERANCE:
        return ""
    smallest = min(c.width_before for c in changes)
    if target is Target.HEADS and any(c.axis in (AxisRole.HEADS, AxisRole.HEAD_REPEAT)
                                        for c in changes):
        unit = ("key/value groups" if any(c.axis is AxisRole.HEADS for c in changes)
                and loss.heads and loss.heads["kv_before"] != loss.heads["query_before"]
                else "query heads per key/value group" if any(
                    c.axis is AxisRole.HEAD_REPEAT for c in changes) else "heads")
        why = (f"heads go whole, {smallest} {unit} a layer, so the fraction moves in steps "
               f"of 1/{smallest}")
    else:
        why = f"widths are whole channels (the narrowest is {smallest})"
        if pruner.round_to > 1:
            why += f", rounded to multiples of {pruner.round_to}"
    return f"removes {got:.1%}, not the {ratio:.0%} asked: {why}"


def _left_out(pruner: Pruner, target: Target, ids: set[int]) -> str:
    """Why an allocation across targets (global, measured) gave ``target`` none of the cut."""
    cands, _skipped = pruner.candidates()
    mine = [k for k, c in enumerate(cands) if c.group.id in ids]
    others = [k for k, c in enumerate(cands) if c.group.id not in ids]
    if not mine:
        return ""
    what = f"none cut: the {pruner.allocation} allocation gave {target.value} none of the cut"
    if not others:
        return what
    if pruner.allocation == "global":
        removal, _checked = pruner.checked(pruner.plan_ratio())
        norm = {k: normalised(c) for k, c in enumerate(cands)}
        taken = [float(norm[k][i]) for k in others
                 for i in removal.picks.get((cands[k].group.id, cands[k].axis), [])]
        ranked = global_counts(cands, pruner.plan_ratio(), pruner.max_ratio, pruner.round_to)
        given = sum(ranked[k] for k in mine)
        if given:  # ranked in, then tied or rounded back (value dims follow rotary pairs)
            return (f"{what}: the ranking across targets gave it {given} unit(s), all taken "
                    f"back by the whole-unit steps after it (head dims follow their rotary "
                    f"pairs, heads go whole, widths round)")
        lowest = min(float(norm[k].min()) for k in mine)
        if not taken or lowest < max(taken):
            return what
        return (f"{what}: ranked together (scores normalised per axis), its lowest unit scores "
                f"{lowest:.3g}, above the last unit taken from the other targets "
                f"({max(taken):.3g})")
    found = pruner.measured_result()
    if pruner.allocation != "measured" or found is None or len(found.curves) != len(cands):
        return what
    mine_cost = [c.change[1] / c.params[1] for k in mine
                 if len((c := found.curves[k]).params) > 1 and c.params[1] > 0]
    if not mine_cost:
        return f"{what}: every trial cut of it alone broke the forward"
    taken_cost = [c.at(n) / float(np.interp(n, c.removed, c.params)) for k in others
                  if (n := found.counts[k]) and (c := found.curves[k]).params[-1] > 0]
    if not taken_cost:
        return what
    return (f"{what}: the parameter budget went where a removed parameter changed the outputs "
            f"least ({found.measure} per million parameters: {min(mine_cost) * 1e6:.3g} at its "
            f"cheapest measured cut, at most {max(taken_cost) * 1e6:.3g} for the cuts taken)")
