"""When a cut fails: the outer axis of a group that still runs, why groups must shrink
together (the model line that fails, quoted), and what to do about a refused cut. Used by
`Pruner.step` and its proposals."""
from __future__ import annotations

import linecache
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..coupling.analyze import Coupling
from ..coupling.groups import Group, GroupKey
from ..coupling.places import axis_layers
from ..coupling.vocab import AxisRole
from .counts import kept
from .importance import lowest
from .joint import merge
from .preflight import Preflight, Verdict
from .proposal import Proposal
from .records import GroupChange
from .removal import Removal


def outer_cut(flight: Preflight, coupling: Coupling, group: Group,
              scores: Callable[[], Sequence[np.ndarray]],
              picked: dict[int, list[int]], verdict: Verdict, base: Removal, round_to: int
              ) -> tuple[Removal, GroupChange] | None:
    """``group`` re-cut on an outer channel axis that runs, when its inner cut does not.

    In an (outer x inner) layout the pruner cuts the inner axis (so widths shrink once).
    When model code fixes that inner width (``view(-1, self.conv.in_channels, 4, 4)``
    after a linear layer keeps the 4 x 4 block), whole blocks of ``inner`` channels may
    still go: the outer axes are tried, outermost first, on top of ``base``, at the
    fraction the inner cut had (``scores`` gives the group's, per axis). Only channel and group
    axes are tried (heads stay the head mode's choice). None when no outer axis runs.
    """
    outer = [i for i, a in enumerate(group.axes) if a.prunable and not a.inner and
             a.role in (AxisRole.CHANNELS, AxisRole.GROUPS) and i not in picked]
    if not picked or not outer:
        return None
    fraction = max(len(idx) / group.axes[a].size for a, idx in picked.items())
    per_axis = scores()
    for i in outer:
        ax = group.axes[i]
        n = ax.size - kept(ax.size, fraction, round_to)
        if n <= 0:
            continue
        part = Removal()
        part.add(group.id, i, lowest(np.asarray(per_axis[i]), n))
        if not flight.check(merge([base, part])).ok:
            continue
        inner = ", ".join(f"{group.axes[a].size}" for a in picked)
        block = int(np.prod([a.size for a in group.axes[i + 1:]] or [1]))
        where = f"{verdict.location}: " if verdict.location else ""
        why = (f"its innermost axis ({inner}) fails when cut ({where}{verdict.error}); "
               f"cut the outer {ax.role} axis of {ax.size} instead, whole blocks of "
               f"{block} channels")
        idx = part.picks[(group.id, i)]
        return part, GroupChange(group.id, group.title, ax.role, idx, ax.size,
                                 ax.size - n, why, axis_layers(coupling, group)[i])
    return None


def advice(group: Group, picked: Mapping[int, object]) -> str:
    """What to do about a cut of ``group`` (axis -> picks) the pre-flight refuses."""
    roles = {group.axes[a].role for a in picked}
    if AxisRole.HEAD_DIM in roles:
        return ("left uncut; the model's code splits heads by a width this cut does not keep: "
                "cut whole or query heads (heads 'whole' or 'query') or keep attention as it "
                "is (heads 'keep')")
    if roles & {AxisRole.HEADS, AxisRole.HEAD_REPEAT}:
        return ("left uncut; the model's code reads a head count this cut does not keep: "
                "cut dims inside the heads (heads 'dims') or keep attention as it is "
                "(heads 'keep')")
    return ("left uncut; the model's code at that line needs this width: leave its module "
            "out of the cut (ignore it) or choose another ratio")


def joint_reason(location: str, props: Mapping[GroupKey, Proposal], keys: list[GroupKey]
                 ) -> str:
    """Why these groups must shrink together, quoting the model line when it is readable."""
    code = source_line(location)
    names = " and ".join(props[k].group.title for k in keys)
    where = f"`{location}`" + (f" (`{code}`)" if code else "")
    return (f"{where} fails when any one of {names} is cut alone; cut together by the same "
            f"fraction the model runs, so they must shrink together")


def source_line(location: str) -> str:
    """The text of ``file:line`` when the file is readable, else ""."""
    path, _, line = location.rpartition(":")
    if not path or not line.isdigit():
        return ""
    code = linecache.getline(path, int(line)).strip()
    return code.split("  #", 1)[0].rstrip()  # an inline comment (a lint directive) is not code


__all__ = ["advice", "joint_reason", "outer_cut", "source_line"]
