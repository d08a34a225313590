"""The pruner: choose indices per group, pre-flight them, apply, and report each step."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from .coupling.analyze import Coupling
from .groups import Group
from .importance import scores as importance_scores
from .metrics import count_macs, count_params
from .preflight import Preflight
from .prune import Applied, Removal, apply_removal
from .tracer import trace

HEAD_MODES = ("dims", "whole", "keep")


@dataclass
class GroupChange:
    """One group's share of a step."""

    group: int
    title: str
    axis: str  # role of the pruned axis
    removed: list[int]
    width_before: int
    width_after: int


@dataclass
class Skip:
    group: int
    title: str
    reason: str


@dataclass
class Unsafe:
    group: int
    module: str
    location: str
    error: str


@dataclass
class StepReport:
    """What a step really removed; truthy iff it removed anything."""

    step: int
    changes: list[GroupChange] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    unsafe: list[Unsafe] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    forward_ok: bool = True
    output_shape_ok: bool = True
    attributes: dict[str, dict[str, list[object]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(c.removed for c in self.changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kept(original: int, ratio: float, round_to: int, minimum: int = 1) -> int:
    keep = max(int(round(original * (1.0 - ratio))), minimum)
    if round_to > 1 and original >= round_to:
        keep = max(round_to, int(math.ceil(keep / round_to) * round_to))
    return min(keep, original)


class Pruner:
    """Structural pruner over the exact coupling groups of a traced model.

    Args:
        model: the model to prune in place.
        example_inputs: positional inputs for one forward.
        importance: criterion name (see `explorer.importance.CRITERIA`).
        ratio: fraction of each group's channels to remove by the last step.
        iterative_steps: number of `step()` calls to reach ``ratio``.
        heads: "dims" (same dims removed in every head), "whole" (remove heads), or "keep".
        round_to: keep every remaining width a multiple of this.
        ignored: module names whose outputs are never pruned.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, importance: str = "magnitude",
                 ratio: float = 0.5, iterative_steps: int = 1, global_pruning: bool = False,
                 heads: str = "dims", round_to: int = 1, ignored: Sequence[str] = (),
                 max_ratio: float = 0.9) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        if heads not in HEAD_MODES:
            raise ValueError(f"heads must be one of {HEAD_MODES}, got {heads!r}")
        self.model = model
        self.inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        self.importance = importance
        self.ratio = ratio
        self.steps = max(1, int(iterative_steps))
        self.global_pruning = global_pruning
        self.heads = heads
        self.round_to = max(1, int(round_to))
        self.ignored = list(ignored)
        self.max_ratio = max_ratio
        self.current_step = 0
        self.applied: list[Applied] = []  # every application, in order (for plans and undo)
        self._analyse()
        self._original = {self._key(g, i): a.size for g in self.groups
                          for i, a in enumerate(g.axes)}

    def _analyse(self) -> None:
        self.graph = trace(self.model, self.inputs)
        self.coupling = Coupling(self.graph, ignored=self.ignored)
        self.groups: list[Group] = self.coupling.groups

    @staticmethod
    def _key(group: Group, axis: int) -> tuple[str, int, int, str]:
        m = group.members[0]
        return (m.param, m.dim, axis, group.axes[axis].role)

    def _target_axes(self, group: Group) -> list[int]:
        roles = {"channels", "groups"}
        if self.heads == "dims":
            roles.add("head-dim")
        elif self.heads == "whole":
            roles.add("heads")
        out = [i for i, a in enumerate(group.axes) if a.prunable and a.role in roles]
        if self.heads == "whole":  # prune the outermost head axis only (kv groups for GQA)
            heads = [i for i in out if group.axes[i].role == "heads"]
            out = [i for i in out if group.axes[i].role != "heads"] + heads[:1]
        return out

    def propose(self) -> tuple[Removal, list[GroupChange], list[Skip]]:
        """Indices the next step would remove (lowest importance first)."""
        step_ratio = self.ratio * min(self.current_step + 1, self.steps) / self.steps
        removal, changes, skipped = Removal(), [], []
        for g in self.groups:
            if not g.prunable:
                skipped.append(Skip(g.id, g.title, g.reason))
                continue
            axes = self._target_axes(g)
            if not axes:
                skipped.append(Skip(g.id, g.title, f"no axis prunable in head mode "
                                                   f"'{self.heads}'"))
                continue
            s = importance_scores(self.importance, self.model, self.coupling, g)
            for i in axes:
                ax = g.axes[i]
                original = self._original.get(self._key(g, i), ax.size)
                keep = _kept(original, min(step_ratio, self.max_ratio), self.round_to)
                n = ax.size - keep
                if n <= 0:
                    why = "at its minimum width" if keep <= 1 else "already at the target width"
                    skipped.append(Skip(g.id, g.title, f"{ax.role}: {why}"))
                    continue
                order = np.argsort(s[i], kind="stable")[:n]
                idx = sorted(int(x) for x in order)
                removal.add(g.id, i, idx)
                changes.append(GroupChange(g.id, g.title, ax.role, idx, ax.size, keep))
        return removal, changes, skipped

    def step(self) -> StepReport:
        """Prune one step; the report says what was removed and why groups were skipped."""
        report = StepReport(self.current_step + 1, params_before=count_params(self.model),
                            macs_before=count_macs(self.graph))
        if self.current_step >= self.steps:
            report.skipped.append(Skip(-1, "all", f"the schedule has {self.steps} step(s) "
                                                  f"and they are done"))
            report.params_after, report.macs_after = report.params_before, report.macs_before
            return report
        removal, changes, skipped = self.propose()
        self.current_step += 1
        report.skipped = skipped
        flight = Preflight(self.model, self.inputs, self.coupling)
        removal, changes = self._drop_unsafe(flight, removal, changes, report)
        report.changes = changes
        if removal:
            applied = apply_removal(self.model, self.coupling, removal)
            self.applied.append(applied)
            report.attributes = applied.attributes
        try:
            self._analyse()
            report.forward_ok = True
            report.output_shape_ok = [tuple(self.graph.values[o].shape) for o in
                                      self.graph.outputs] == flight.expected
        except Exception:  # noqa: BLE001 - reported, not hidden: the flag says it failed
            report.forward_ok = report.output_shape_ok = False
        report.params_after = count_params(self.model)
        report.macs_after = count_macs(self.graph)
        return report

    def _drop_unsafe(self, flight: Preflight, removal: Removal, changes: list[GroupChange],
                     report: StepReport) -> tuple[Removal, list[GroupChange]]:
        if not removal or flight.check(removal).ok:
            return removal, changes
        safe = Removal()
        for gid in sorted({g for g, _ in removal.picks}):
            trial = Removal({k: list(v) for k, v in safe.picks.items()})
            for (g, a), idx in removal.picks.items():
                if g == gid:
                    trial.add(g, a, idx)
            verdict = flight.check(trial)
            if verdict.ok:
                safe = trial
            else:
                report.unsafe.append(Unsafe(gid, verdict.module, verdict.location,
                                            verdict.error))
        bad = {u.group for u in report.unsafe}
        return safe, [c for c in changes if c.group not in bad]
