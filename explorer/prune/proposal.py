"""A proposal: what the pruner suggests removing from one group (or a joint set of groups).

The one `Proposal` of the package: `Pruner.proposals()` yields them bound to the pruner
(`accept` / `reject` act on it directly), and the app's session lists and decides them.
A *joint* proposal carries ``partners``: groups that are unsafe to cut alone but safe when
cut together by the same fraction (see `explorer.prune.joint`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..coupling.groups import Group, GroupKey
from .joint import merge
from .preflight import Verdict
from .records import GroupChange
from .removal import Applied, Removal

if TYPE_CHECKING:
    from .pruner import Pruner

Counts = Mapping[int, int]  # axis index -> how many indices to remove


def lowest(scores: np.ndarray, n: int) -> list[int]:
    """The ``n`` indices with the lowest scores, ascending (ties: lower index first)."""
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:n])


@dataclass
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
    """

    group: Group
    changes: list[GroupChange]
    axes: list[int]
    scores: dict[int, np.ndarray]
    partners: list[Proposal] = field(default_factory=list)
    reason: str = ""
    pruner: Pruner | None = field(default=None, repr=False, compare=False)
    decided: bool = False
    applied: Applied | None = None
    verdict: Verdict | None = field(default=None, repr=False)

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

    # ------------------------------------------------------------------ deciding (bound)
    def accept(self, indices: dict[int, list[int]] | list[int] | None = None,
               count: int | Counts | None = None) -> Verdict:
        """Apply as proposed, with other indices, or with other counts (lowest scores).

        Needs a bound pruner. Returns the pre-flight verdict; when it is not ok nothing
        is changed.
        """
        if self.pruner is None:
            raise RuntimeError("this proposal is not bound to a pruner; accept it through "
                               "the session or build it with Pruner.proposals()")
        if self.decided:
            raise RuntimeError("this proposal was already accepted or rejected")
        if isinstance(indices, list):
            indices = {self.axes[0]: indices}
        if isinstance(indices, dict):
            removal = Removal()
            for axis, idx in indices.items():
                removal.add(self.group.id, axis, sorted(int(i) for i in idx))
        else:
            removal = self.removal(count)
        verdict = self.pruner.preflight().check(removal)
        self.verdict = verdict
        if verdict.ok:
            self.applied = self.pruner.apply(removal)
            self.decided = True
        return verdict

    def reject(self) -> None:
        """Leave the group as it is."""
        self.decided = True
