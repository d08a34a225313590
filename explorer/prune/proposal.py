"""Interactive pruning: one group proposal at a time, accepted, resized or rejected.

After every accepted proposal the model is re-traced, so later proposals are computed on
the model as it now is; a rejected proposal changes nothing.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .preflight import Preflight, Verdict
from .removal import Applied, Removal, apply_removal
from .transaction import transaction

if TYPE_CHECKING:
    from ..coupling.groups import Group
    from .pruner import Pruner


@dataclass
class Proposal:
    """The pruner's proposal for one group at this step."""

    pruner: Pruner
    group: Group
    picks: dict[int, list[int]]  # axis -> indices proposed for removal
    scores: dict[int, np.ndarray]  # axis -> importance scores
    decided: bool = False
    applied: Applied | None = None
    verdict: Verdict | None = field(default=None, repr=False)

    def _removal(self, picks: dict[int, list[int]]) -> Removal:
        r = Removal()
        for axis, idx in picks.items():
            r.add(self.group.id, axis, idx)
        return r

    def accept(self, indices: dict[int, list[int]] | list[int] | None = None,
               count: int | None = None) -> Verdict:
        """Apply as proposed, with other indices, or with another count (lowest scores).

        Returns the pre-flight verdict; when it is not ok nothing is changed.
        """
        if self.decided:
            raise RuntimeError("this proposal was already accepted or rejected")
        picks = dict(self.picks)
        if isinstance(indices, list):
            picks = {next(iter(self.picks)): indices}
        elif isinstance(indices, dict):
            picks = indices
        elif count is not None:
            picks = {a: sorted(int(i) for i in np.argsort(self.scores[a], kind="stable")[:count])
                     for a in self.picks}
        removal = self._removal(picks)
        p = self.pruner
        verdict = Preflight(p.model, p.inputs, p.coupling).check(removal)
        self.verdict = verdict
        if not verdict.ok:
            return verdict
        with transaction(p.model):  # re-tracing the pruned model is part of accepting
            applied = apply_removal(p.model, p.coupling, removal)
            p._analyse()
        self.applied = applied
        p.applied.append(applied)
        self.decided = True
        return verdict

    def reject(self) -> None:
        """Leave the group as it is."""
        self.decided = True


def proposals(pruner: Pruner) -> Iterator[Proposal]:
    """Yield one proposal per prunable group, re-planning after each accepted one."""
    done: set[tuple[str, int]] = set()
    while True:
        removal, _changes, _skipped = pruner.propose()
        nxt = None
        for (gid, _axis), idx in removal.picks.items():
            g = pruner.groups[gid]
            key = (g.members[0].param, g.members[0].dim)
            if key not in done and idx:
                nxt = (g, key)
                break
        if nxt is None:
            pruner.current_step = min(pruner.current_step + 1, pruner.steps)
            return
        group, key = nxt
        done.add(key)
        picks = {a: list(i) for (g, a), i in removal.picks.items() if g == group.id}
        cands, _ = pruner.candidates()
        scores = {c.axis: c.scores for c in cands if c.group.id == group.id}
        yield Proposal(pruner, group, picks, scores)
