"""The records of what the pruner chose and did: one group's change, a skip, an unsafe group,
a step's report, and a scored candidate axis.

Plain data, imported by the pruner, its proposals and the statement alike (none of them
imports another for these records).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..coupling.groups import Group
from ..coupling.vocab import AxisRole


@dataclass
class GroupChange:
    """One group's share of a step."""

    group: int
    title: str
    axis: AxisRole  # role of the pruned axis
    removed: list[int]
    width_before: int
    width_after: int
    # why this axis and not the innermost one, when the pruner fell back to an outer axis
    fallback: str = ""
    # the layer this axis lives in (`coupling.places.axis_layers`): a group spanning layers
    # (attention tied by shared rotary frequencies) has one change per layer
    where: str = ""


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
    advice: str = ""  # what to do about it (`outer.advice`)


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
    config: dict[str, list[object]] = field(default_factory=dict)  # transformers config changes
    notes: list[str] = field(default_factory=list)  # caveats the user should read

    def __bool__(self) -> bool:
        return any(c.removed for c in self.changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidate:
    """One axis of one group the pruner may cut, with its scores."""

    group: Group
    axis: int
    scores: np.ndarray
    original: int  # width of this axis in the unpruned model
    limit: float  # ratio of ``original`` this axis may lose at this step


def said_once(notes: Iterable[str]) -> list[str]:
    """A run's notes as they are shown, each fact said once: the one place notes from the
    load, the statement, the steps and an export are gathered. Notes keep the order they
    came in; a note is dropped where an earlier one is the same or another says it whole
    (an export's ``hf: no transformers folder: ...`` carries the step's config note, so the
    step's note is not said again)."""
    seen = list(dict.fromkeys(n for n in notes if n))
    return [n for n in seen if not any(n != other and n in other for other in seen)]


__all__ = ["Candidate", "GroupChange", "Skip", "StepReport", "Unsafe", "said_once"]
