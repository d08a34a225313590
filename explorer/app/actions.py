"""The session's action log: what the user did, typed, as JSON and back, and how to redo it.

The log is what survives a browser refresh (`explorer.app.store`) and what `Session.replay`
redoes. Each action is one frozen record of a closed `ActionKind`; its JSON is
``{"do": kind, **fields}`` exactly as earlier sessions wrote it. `parse` judges an entry of a
log (maybe hand-edited) and says why it is not an action instead of raising.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


class ActionKind(str, enum.Enum):
    """What one logged action did (its ``"do"`` in JSON)."""

    CONFIGURE = "configure"
    ACCEPT = "accept"
    ACCEPT_ALL = "accept_all"
    REJECT = "reject"
    UNDO = "undo"
    BLOCK = "block"
    PLAN = "plan"
    COMPENSATE = "compensate"


class Redoer(Protocol):
    """What an action needs of the session to be done again (`explorer.app.session.Session`
    is one; kept as a protocol so this module does not import the session)."""

    def configure(self, importance: str, ratio: float, heads: str,
                  global_pruning: bool | None = None, round_to: int | None = None,
                  targets: tuple[str, ...] | list[str] | None = None) -> bool: ...

    def redo_accept(self, key: tuple[Any, ...], joint: bool, counts: dict[int, int] | None,
                    same_cut: list[list[Any]] | None = None,
                    cut: dict[str, Any] | None = None) -> bool: ...

    def accept_all(self) -> bool: ...

    def redo_reject(self, key: tuple[Any, ...], keys: list[list[Any]] | None = None,
                    what: str | None = None) -> bool: ...

    def undo(self) -> bool: ...

    def remove_block(self, name: str) -> bool: ...

    def apply_plan(self, text: str | bytes) -> bool: ...

    def set_compensation(self, name: str) -> bool: ...


@dataclass(frozen=True)
class Configure:
    """New settings: (importance, ratio, heads, global_pruning, round_to, targets)."""

    settings: list[Any]
    kind = ActionKind.CONFIGURE

    def fields(self) -> dict[str, Any]:
        return {"settings": list(self.settings)}

    def redo(self, session: Redoer) -> bool:
        return session.configure(*self.settings)


@dataclass(frozen=True)
class Accept:
    """One proposal accepted (its group key; a joint or outer-axis one; resized counts; what
    it cut, exactly, when that can be said: replayed as recorded, without choosing again)."""

    key: list[Any]
    joint: bool = False
    counts: list[list[int]] | None = None  # [[axis, count], ...]; None: as proposed
    same_cut: list[list[Any]] | None = None  # the same cut in these groups' layers too
    # {"step": a plan step's JSON (`explorer.io.plan.step_record`), "what", "keys",
    # "titles", "report"}: the cut as made; None (older logs, refits): chosen again
    cut: dict[str, Any] | None = None
    kind = ActionKind.ACCEPT

    def fields(self) -> dict[str, Any]:
        return {"key": list(self.key), "joint": self.joint, "counts": self.counts,
                **({"same_cut": self.same_cut} if self.same_cut is not None else {}),
                **({"cut": self.cut} if self.cut is not None else {})}

    def redo(self, session: Redoer) -> bool:
        counts = None if self.counts is None else {int(a): int(n) for a, n in self.counts}
        return session.redo_accept(tuple(self.key), bool(self.joint), counts, self.same_cut,
                                   self.cut)


@dataclass(frozen=True)
class AcceptAll:
    """Every pending proposal accepted at once."""

    kind = ActionKind.ACCEPT_ALL

    def fields(self) -> dict[str, Any]:
        return {}

    def redo(self, session: Redoer) -> bool:
        return session.accept_all()


@dataclass(frozen=True)
class Reject:
    """A proposal rejected (the keys of every group it covers, its own first; what it was,
    in words: with it a replay rejects the keys without proposing again)."""

    keys: list[Any]
    what: str | None = None  # None in older logs
    kind = ActionKind.REJECT

    def fields(self) -> dict[str, Any]:
        return {"keys": [list(k) for k in self.keys],
                **({"what": self.what} if self.what is not None else {})}

    def redo(self, session: Redoer) -> bool:
        return session.redo_reject(tuple(self.keys[0]), [list(k) for k in self.keys],
                                   self.what)


@dataclass(frozen=True)
class Undo:
    """The last accept, reject, block removal or plan replay taken back."""

    kind = ActionKind.UNDO

    def fields(self) -> dict[str, Any]:
        return {}

    def redo(self, session: Redoer) -> bool:
        return session.undo()


@dataclass(frozen=True)
class Block:
    """A residual block removed."""

    name: str
    kind = ActionKind.BLOCK

    def fields(self) -> dict[str, Any]:
        return {"name": self.name}

    def redo(self, session: Redoer) -> bool:
        return session.remove_block(str(self.name))


@dataclass(frozen=True)
class PlanReplay:
    """A plan replayed (its JSON text)."""

    text: str
    kind = ActionKind.PLAN

    def fields(self) -> dict[str, Any]:
        return {"text": self.text}

    def redo(self, session: Redoer) -> bool:
        return session.apply_plan(str(self.text))


@dataclass(frozen=True)
class Compensate:
    """How accepts refit the consumers of removed channels ("none", "bias", "lstsq")."""

    name: str
    kind = ActionKind.COMPENSATE

    def fields(self) -> dict[str, Any]:
        return {"name": self.name}

    def redo(self, session: Redoer) -> bool:
        return session.set_compensation(str(self.name))


Action = Configure | Accept | AcceptAll | Reject | Undo | Block | PlanReplay | Compensate

# kind -> the fields its log entry must have, and their JSON types
_REQUIRED: dict[ActionKind, dict[str, type]] = {
    ActionKind.CONFIGURE: {"settings": list}, ActionKind.ACCEPT: {"key": list},
    ActionKind.ACCEPT_ALL: {}, ActionKind.REJECT: {"keys": list}, ActionKind.UNDO: {},
    ActionKind.BLOCK: {"name": str}, ActionKind.PLAN: {"text": str},
    ActionKind.COMPENSATE: {"name": str},
}


def to_json(action: Action) -> dict[str, Any]:
    """The action as its log entry: ``{"do": kind, **fields}``."""
    return {"do": action.kind.value, **action.fields()}


def problem(act: object) -> str | None:
    """Why ``act`` (an entry of a session log, maybe hand-edited) is not an action the
    session records, or None when it is one."""
    if not isinstance(act, dict):
        return f"{type(act).__name__} {str(act)[:40]!r} is not an action object"
    do = act.get("do")
    kind = next((k for k in ActionKind if k.value == do), None)
    if kind is None:
        return f"unknown action {str(do)[:40]!r}"
    for name, typ in _REQUIRED[kind].items():
        if not isinstance(act.get(name), typ):
            return f"action {do!r} without a {typ.__name__} field {name!r}"
    return None


def parse(act: Mapping[str, Any]) -> Action:
    """The typed action of a log entry `problem` found none in (extra fields are ignored;
    optional ones missing in older logs take their defaults)."""
    kind = ActionKind(act["do"])
    if kind is ActionKind.CONFIGURE:
        return Configure(list(act["settings"]))
    if kind is ActionKind.ACCEPT:
        same, cut = act.get("same_cut"), act.get("cut")
        return Accept(list(act["key"]), bool(act.get("joint")), act.get("counts"),
                      same if isinstance(same, list) else None,
                      cut if isinstance(cut, dict) else None)
    if kind is ActionKind.REJECT:
        what = act.get("what")
        return Reject(list(act["keys"]), what if isinstance(what, str) else None)
    if kind is ActionKind.BLOCK:
        return Block(str(act["name"]))
    if kind is ActionKind.PLAN:
        return PlanReplay(str(act["text"]))
    if kind is ActionKind.COMPENSATE:
        return Compensate(str(act["name"]))
    return AcceptAll() if kind is ActionKind.ACCEPT_ALL else Undo()


__all__ = ["Accept", "AcceptAll", "Action", "ActionKind", "Block", "Compensate", "Configure",
           "PlanReplay",
           "Redoer", "Reject", "Undo", "parse", "problem", "to_json"]
