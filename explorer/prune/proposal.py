"""A proposal: what the pruner suggests removing from one group (or a joint set of groups).

The one `Proposal` of the package, immutable: `Pruner.proposals()` yields them bound to the
pruner, and every accept goes through it (`Pruner.accept`; `accept` / `reject` here are
shorthands). Whether one is decided lives in the pruner's `decisions`, not on the proposal.
A *joint* proposal carries ``partners``: groups that are unsafe to cut alone but safe when
cut together by the same fraction (see `explorer.prune.joint`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..coupling.groups import Group, GroupKey
from .decisions import Decisions
from .importance import lowest
from .joint import merge
from .preflight import Verdict
from .records import GroupChange
from .removal import Applied, Removal

Counts = Mapping[int, int]  # axis index -> how many indices to remove


class Decider(Protocol):
    """What a proposal needs of the pruner that made it (`Pruner` is one): its decisions,
    and the one accept / reject path. A protocol, so this module never imports the pruner."""

    @property
    def decisions(self) -> Decisions: ...

    def accept(self, proposal: Proposal, indices: dict[int, list[int]] | list[int] | None = None,
               count: int | Counts | None = None) -> Verdict: ...

    def reject(self, proposal: Proposal) -> None: ...


@dataclass(frozen=True)
class Proposal:
    """The pruner's suggestion for one group at this step.

    Attributes:
        group: the group (its id is valid for the pruner's current trace only).
        changes: one per pruned axis, in the order of ``axes``.
        axes: the axis index of each change.
        scores: axis index -> importance scores (lower = less important).
        partners: other groups' proposals to cut together with this one (a joint proposal).
        reason: why the partners must be cut together (the model line and its code).
        pruner: the pruner that made it, when `accept`/`reject` should act on it.
        version: the model state it was made for (`explorer.prune.history.History.version`).
    """

    group: Group
    changes: list[GroupChange]
    axes: list[int]
    scores: dict[int, np.ndarray]
    partners: list[Proposal] = field(default_factory=list)
    reason: str = ""
    pruner: Decider | None = field(default=None, repr=False, compare=False)
    version: int = field(default=0, compare=False)

    # ------------------------------------------------------------------ reading
    @property
    def key(self) -> GroupKey:
        return self.group.key

    @property
    def keys(self) -> list[GroupKey]:
        """The keys of every group this decision covers (itself first)."""
        return [self.key, *(p.key for p in self.partners)]

    @property
    def joint(self) -> bool:
        return bool(self.partners)

    @property
    def fallback(self) -> bool:
        """An outer-axis cut standing in for an unsafe innermost one (``reason`` says why)."""
        return any(c.fallback for c in self.changes)

    @property
    def title(self) -> str:
        return " + ".join([self.group.title, *(p.group.title for p in self.partners)])

    @property
    def picks(self) -> dict[int, list[int]]:
        """Axis index -> the indices proposed for removal."""
        return {a: list(c.removed) for a, c in zip(self.axes, self.changes, strict=True)}

    def counts(self) -> dict[int, int]:
        """Axis index -> the proposed count."""
        return {a: len(c.removed) for a, c in zip(self.axes, self.changes, strict=True)}

    # ------------------------------------------------------------------ as a removal
    def removal(self, count: int | Counts | None = None) -> Removal:
        """The proposal as a `Removal`; partners are cut by the same fraction.

        ``count`` resizes axes (the k lowest scores are removed): an int resizes the primary
        axis, a mapping gives axis index -> count for any of the proposal's axes.

        Raises:
            ValueError: an axis this proposal does not prune, or a count out of range.
        """
        counts = {self.axes[0]: count} if isinstance(count, int) else dict(count or {})
        unknown = set(counts) - set(self.axes)
        if unknown:
            raise ValueError(f"axes {sorted(unknown)} are not pruned by this proposal")
        out = Removal()
        for axis, change in zip(self.axes, self.changes, strict=True):
            idx = change.removed
            if axis in counts:
                n = int(counts[axis])
                if not 0 <= n < change.width_before:
                    raise ValueError(f"count for '{change.axis}' must be in "
                                     f"[0, {change.width_before - 1}], got {n}")
                idx = lowest(self.scores[axis], n)
            if idx:
                out.add(self.group.id, axis, idx)
        if not self.partners:
            return out
        return merge([out, *(p.removal(p.scaled(self.fraction(counts))) for p in self.partners)])

    def fraction(self, counts: Counts | None = None) -> float:
        """The fraction of the primary axis removed (as proposed, or with ``counts``)."""
        change = self.changes[0]
        n = (counts or {}).get(self.axes[0], len(change.removed))
        return n / change.width_before if change.width_before else 0.0

    def scaled(self, fraction: float) -> dict[int, int]:
        """Counts that remove ``fraction`` of every axis (rounded, at least one kept)."""
        return {a: min(int(round(c.width_before * fraction)), c.width_before - 1)
                for a, c in zip(self.axes, self.changes, strict=True)}

    def chosen(self, indices: dict[int, list[int]] | list[int] | None = None,
               count: int | Counts | None = None) -> Removal:
        """The removal of an accept: as proposed, with other ``indices`` (a list: of the
        primary axis), or with other counts (`removal`)."""
        if isinstance(indices, list):
            indices = {self.axes[0]: indices}
        if not isinstance(indices, dict):
            return self.removal(count)
        out = Removal()
        for axis, idx in indices.items():
            out.add(self.group.id, axis, sorted(int(i) for i in idx))
        return out

    def lines(self, removal: Removal, count: int | Counts | None,
              attributes: dict[str, dict[str, list[object]]]) -> list[dict[str, Any]]:
        """What accepting it with ``removal`` did, one JSON-ready line per group it covers
        (for a session's report)."""
        return [{"group": q.group.title, "key": list(q.key),
                 "axes": [{"role": q.group.axes[a].role, "size": q.group.axes[a].size,
                           "removed": removal.picks.get((q.group.id, a), [])} for a in q.axes],
                 "count": count if not isinstance(count, dict) else
                 {str(k): v for k, v in count.items()},
                 "attributes": attributes}
                for q in [self, *self.partners]]

    # ------------------------------------------------------------------ deciding (bound)
    def _bound(self) -> Decider:
        if self.pruner is None:
            raise RuntimeError("this proposal is not bound to a pruner; accept it through "
                               "the session or build it with Pruner.proposals()")
        return self.pruner

    @property
    def decided(self) -> bool:
        """Whether it was accepted or rejected (at the model state it was made for)."""
        return self.pruner is not None and \
            self.pruner.decisions.of(self.version, self.key) is not None

    @property
    def applied(self) -> Applied | None:
        """What accepting it changed, once accepted (and not undone)."""
        if self.pruner is None:
            return None
        edit = self.pruner.decisions.accepted_by(self.version, self.key)
        return None if edit is None else edit.applied

    def accept(self, indices: dict[int, list[int]] | list[int] | None = None,
               count: int | Counts | None = None) -> Verdict:
        """Apply as proposed, with other indices, or with other counts (lowest scores):
        `Pruner.accept`. Returns the pre-flight verdict; when it is not ok nothing is
        changed."""
        return self._bound().accept(self, indices, count)

    def reject(self) -> None:
        """Leave the group as it is (`Pruner.reject`)."""
        self._bound().reject(self)
