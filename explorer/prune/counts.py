"""How many channels each candidate axis loses at a ratio: per group (local) or ranked across
groups (global), rounded to multiples, with a floor, and value head dims tied to the query/key
dims of a rotary model. Pure functions of scored candidates."""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..coupling.groups import Group
from .records import Candidate, GroupChange


def kept(original: int, ratio: float, round_to: int, minimum: int = 1) -> int:
    """The width an axis of ``original`` keeps at ``ratio`` (a multiple of ``round_to``
    where the axis is that wide, at least ``minimum``)."""
    keep = max(int(round(original * (1.0 - ratio))), minimum)
    if round_to > 1 and original >= round_to:
        keep = max(round_to, int(math.ceil(keep / round_to) * round_to))
    return min(keep, original)


def group_ratio(group: Group, ratios: Mapping[str, float], base: float) -> float:
    """The ratio of the longest module prefix in ``ratios`` that holds a member of
    ``group``, else ``base``."""
    best = None
    for prefix, r in ratios.items():
        inside = any(m == prefix or m.startswith(prefix + ".") for m in group.modules)
        if inside and (best is None or len(prefix) > len(best[0])):
            best = (prefix, r)
    return best[1] if best else base


def local_counts(cands: list[Candidate], ratio: float, ratios: Mapping[str, float],
                 max_ratio: float, round_to: int) -> list[int]:
    """Each axis cut to ``ratio`` of its original width (or its module's ratio)."""
    out = []
    for c in cands:
        r = min(group_ratio(c.group, ratios, ratio), max_ratio)
        out.append(c.group.axes[c.axis].size - kept(c.original, r, round_to))
    return out


def normalised(cand: Candidate) -> np.ndarray:
    """A candidate's scores as the global ranking compares them across axes: divided by
    their mean magnitude (FLAP's per-layer normalisation), so no axis wins by its scale."""
    out: np.ndarray = cand.scores / (np.mean(np.abs(cand.scores)) + 1e-12)
    return out


def global_counts(cands: list[Candidate], ratio: float, max_ratio: float, round_to: int
                  ) -> list[int]:
    """Rank all indices together; every axis keeps at least (1 - max_ratio)."""
    total = sum(c.original for c in cands)
    budget = int(round(total * ratio)) - sum(c.original - c.group.axes[c.axis].size
                                             for c in cands)
    pool = []
    for k, c in enumerate(cands):
        for s in np.sort(normalised(c)):
            pool.append((float(s), k))
    pool.sort()
    counts = [0] * len(cands)
    floor = [max(kept(c.original, max_ratio, round_to), 1) for c in cands]
    for _s, k in pool:
        if budget <= 0:
            break
        size = cands[k].group.axes[cands[k].axis].size
        if size - counts[k] - 1 >= floor[k]:
            counts[k] += 1
            budget -= 1
    if round_to > 1:  # round each kept width up to a multiple
        for k, c in enumerate(cands):
            size = c.group.axes[c.axis].size
            keep = size - counts[k]
            keep = min(size, int(math.ceil(keep / round_to) * round_to))
            counts[k] = size - keep
    return counts


def tie_head_dims(cands: list[Candidate], counts: list[int],
                  ties: Mapping[int, Mapping[int, Mapping[int, int]]]) -> list[int]:
    """``counts`` with every tied value head-dim axis cut to the width its query/key axes
    keep (``ties``: group id -> `coupling.heads.head_dim_ties`): a rotary half keeping 26 of
    32 pairs makes the value dims keep 52 of 64, never their own rounding of 20 %."""
    at = {(c.group.id, c.axis): k for k, c in enumerate(cands)}
    out = list(counts)
    for k, c in enumerate(cands):
        parts = ties.get(c.group.id, {}).get(c.axis)
        if parts is None:
            continue
        keep = 0
        for a, channels in parts.items():
            j = at.get((c.group.id, a))
            keep += channels * (c.group.axes[a].size - (out[j] if j is not None else 0))
        out[k] = max(c.group.axes[c.axis].size - keep, 0)
    return out


def allocation_note(changes: list[GroupChange], measured: str = "") -> str:
    """What the global ranking (or, with ``measured``, the measured allocation that note
    describes) gave each width: the spread of kept widths per original width. Whether a
    transformers config still describes the model is the step's config note
    (`history.History.follow_config`), said there once."""
    spans: dict[int, tuple[int, int, int]] = {}
    for c in changes:
        lo, hi, n = spans.get(c.width_before, (c.width_after, c.width_after, 0))
        spans[c.width_before] = (min(lo, c.width_after), max(hi, c.width_after), n + 1)
    parts = [f"{lo}-{hi} of {w} kept across {n} groups" if lo != hi else
             f"{lo} of {w} kept in all {n} groups" for w, (lo, hi, n) in sorted(spans.items())]
    uneven = any(lo != hi for lo, hi, _n in spans.values())
    how = measured or "global allocation: per-layer widths from scores normalised per group"
    return (f"{how} ({'; '.join(parts)})" +
            ("; layers of one kind now differ in width (with --allocation uniform every "
             "layer keeps the same width)" if uneven else ""))


__all__ = ["allocation_note", "global_counts", "group_ratio", "kept", "local_counts",
           "normalised", "tie_head_dims"]
