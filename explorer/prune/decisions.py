"""What was decided about which groups: the one home of "accepted" and "rejected".

An accept is a cut edit of the timeline (`explorer.prune.history.Edit` with the keys of the
groups it decided); a reject changes no model, so it is kept here, placed among the edits
(after how many it came). Both the pruner's proposals (decided at their model state) and the
app's session (decided over the whole timeline) read them here; undo takes back the last
decision of either kind.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..coupling.groups import GroupKey
from .history import Edit, History


class Decision(str, enum.Enum):
    """What was decided about a group."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Rejection:
    """Groups left as they are (not proposed again until undone)."""

    version: int  # the model state it was decided at
    keys: tuple[GroupKey, ...]
    what: str  # in words, for an undo list
    at: int  # how many edits the timeline had when it was decided


class Decisions:
    """Accepts (the timeline's edits that decided groups) and rejects, in one order."""

    def __init__(self, history: History) -> None:
        self.history = history
        self.rejected: list[Rejection] = []

    def reject(self, version: int, keys: list[GroupKey], what: str) -> None:
        self.rejected.append(Rejection(version, tuple(keys), what,
                                       len(self.history.edits)))

    def of(self, version: int, key: GroupKey) -> Decision | None:
        """The decision about group ``key`` made at model state ``version`` (a proposal's)."""
        if self.accepted_by(version, key) is not None:
            return Decision.ACCEPTED
        if any(r.version == version and key in r.keys for r in self.rejected):
            return Decision.REJECTED
        return None

    def accepted_by(self, version: int, key: GroupKey) -> Edit | None:
        """The edit that accepted group ``key`` at model state ``version``, if one did."""
        return next((e for e in self.history.edits
                     if e.before.version == version and key in e.keys), None)

    def _timeline(self) -> list[Edit | Rejection]:
        out: list[Edit | Rejection] = []
        rejects = iter(self.rejected)
        nxt = next(rejects, None)
        for i, edit in enumerate([*self.history.edits, None]):
            while nxt is not None and nxt.at <= i:
                out.append(nxt)
                nxt = next(rejects, None)
            if edit is not None:
                out.append(edit)
        return out

    def by_key(self) -> dict[GroupKey, Decision]:
        """Every group decided so far (over the whole timeline), oldest first."""
        out: dict[GroupKey, Decision] = {}
        for item in self._timeline():
            decision = Decision.REJECTED if isinstance(item, Rejection) else Decision.ACCEPTED
            for key in item.keys:
                out[key] = decision
        return out

    def titles(self) -> list[str]:
        """What `undo` would take back, oldest first."""
        return [item.what for item in self._timeline()]

    @property
    def can_undo(self) -> bool:
        return bool(self.rejected or self.history.edits)

    def undo(self) -> str | None:
        """Take back the last reject or edit (whichever came last); what it was, or None."""
        if self.rejected and self.rejected[-1].at >= len(self.history.edits):
            return self.rejected.pop().what
        edit = self.history.undo()
        if edit is None:
            return None
        self.trim()
        return edit.what

    def trim(self) -> None:
        """Drop rejects decided after edits that were since undone."""
        self.rejected = [r for r in self.rejected if r.at <= len(self.history.edits)]


__all__ = ["Decision", "Decisions", "Rejection"]
