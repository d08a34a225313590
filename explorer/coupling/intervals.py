"""Resolve the coupling facts over intervals of channels instead of single channels.

Rules give every tensor dim a fresh run of element ids, and nearly every fact relates such
runs position by position (a union of two dims, a reshape of ``64 x 128`` into ``8192``).
So the element ids are cut into *intervals*: the coarsest partition of ``range(count)``
into runs of consecutive ids such that every fact reads whole intervals, position by
position:

* a union ``a[i] ~ b[i]`` breaks ``a`` and ``b`` at the same positions, and each piece of
  ``a`` and ``b`` is one whole interval (so interval ``I`` of ``a`` at position ``k`` and
  interval ``J`` of ``b`` at ``k`` are joined offset by offset);
* a product ``flat = p_1 x ... x p_m`` (row-major) makes every element of the outer parts
  ``p_1 .. p_{m-1}`` an interval of its own, and breaks the innermost part and every one of
  the ``flat`` blocks of its size at the same positions, so a piece of ``flat`` is the tuple
  (outer elements, piece of the inner part), offset by offset.

With one *super element* per interval, the same resolution as `resolve.resolve_facts`
runs on the super elements; the element-wise answer is then read off exactly: the class of
element ``start(I) + i`` is (the class of ``I``, offset ``i``), every class's atoms are
its super class's atoms with the offset carried by the last one (the outer ones are single
channels), and class ids are ranked by their smallest element as the element-wise
resolution numbers them. The cost follows the number of intervals, which grows with heads
and slices but not with channel width. Where the interval answer could differ in anything
shown (reshape conflicts, whose messages name class ids; cyclic definitions), `None` is
returned and the caller resolves element by element.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .resolve import Prods, Resolution, resolve_elements, resolve_facts
from .spaces import IdArray, Runs, Spaces, inside


class _Unions:
    """The unions, those of two single runs (nearly all) held in arrays and read at once."""

    def __init__(self, pairs: list[tuple[Runs, Runs]]) -> None:
        self.pairs = pairs
        self.simple = np.array([len(a.start) == 1 and len(b.start) == 1 for a, b in pairs],
                               dtype=bool)
        chosen = [pairs[i] for i in np.flatnonzero(self.simple).tolist()]
        self.a0 = np.array([a.value[0] for a, _b in chosen], dtype=np.int64)
        self.b0 = np.array([b.value[0] for _a, b in chosen], dtype=np.int64)
        self.size = np.array([a.size for a, _b in chosen], dtype=np.int64)
        self.row = np.cumsum(self.simple) - 1  # union -> its index among the simple ones

    def breaks(self, sel: np.ndarray, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Break positions of the simple unions ``sel`` (indices among the simple ones):
        (union, local position) pairs by union then position, position 0 included."""
        size = self.size[sel]
        units = [np.arange(len(sel), dtype=np.int64)]
        pos = [np.zeros(len(sel), dtype=np.int64)]
        for first in (self.a0[sel], self.b0[sel]):
            run, at = inside(cuts, first, size)
            units.append(run)
            pos.append(at - first[run])
        span = int(size.max(initial=0)) + 1
        key = np.unique(np.concatenate(units) * span + np.concatenate(pos))
        return key // span, key % span

    def cuts(self, which: np.ndarray, cuts: np.ndarray) -> list[np.ndarray]:
        """Interval bounds the unions ``which`` need under ``cuts``."""
        out = []
        sel = self.row[which[self.simple[which]]]
        if len(sel):
            unit, pos = self.breaks(sel, cuts)
            a0, b0, size = self.a0[sel], self.b0[sel], self.size[sel]
            out += [a0[unit] + pos, b0[unit] + pos, a0 + size, b0 + size]
        for f in which[~self.simple[which]].tolist():
            a, b = self.pairs[f]
            brk = _union_breaks(a, b, cuts)
            out += [a.cuts_at(brk), b.cuts_at(brk)]
        return out

    def super_pairs(self, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The elements starting each piece of every union, both sides."""
        sel = np.arange(len(self.a0))
        unit, pos = self.breaks(sel, cuts)
        sa, sb = [self.a0[unit] + pos], [self.b0[unit] + pos]
        for f in np.flatnonzero(~self.simple).tolist():
            a, b = self.pairs[f]
            brk = _union_breaks(a, b, cuts)
            sa.append(a.at(brk))
            sb.append(b.at(brk))
        return np.concatenate(sa), np.concatenate(sb)


def _union_breaks(a: Runs, b: Runs, cuts: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate([a.start, b.start, a.interior(cuts), b.interior(cuts)]))


@dataclass
class _Product:
    flat: Runs
    outer: list[IdArray]  # the parts before the innermost one
    inner: Runs
    sizes: tuple[int, ...]

    def inner_breaks(self, cuts: np.ndarray) -> np.ndarray:
        """Break positions inside one block of ``flat`` (= in the inner part)."""
        step = self.sizes[-1]
        flat = np.concatenate([self.flat.start, self.flat.interior(cuts)]) % step
        return np.unique(np.concatenate([self.inner.start, self.inner.interior(cuts), flat]))

    def flat_breaks(self, inner: np.ndarray) -> np.ndarray:
        blocks = self.flat.size // self.sizes[-1]
        return np.asarray((np.arange(blocks, dtype=np.int64)[:, None] * self.sizes[-1]
                           + inner[None, :]).reshape(-1), dtype=np.int64)


def _refine(n: int, unions: _Unions, prods: list[_Product], whole: list[Runs]
            ) -> np.ndarray:
    """Sorted interval starts (with ``n`` last): the coarsest cuts every fact reads whole.

    Cuts only grow; after the first sweep only the facts with a run around a new cut are
    read again (a worklist), so long chains of facts do not cost whole sweeps.
    """
    seed = [np.array([0, n], dtype=np.int64)] + [w.cuts_at(w.start) for w in whole]
    lo: list[np.ndarray] = []  # every run of every fact: first id, end, fact index
    hi: list[np.ndarray] = []
    owner: list[np.ndarray] = []
    count = len(unions.pairs)
    for f, (a, b) in enumerate(unions.pairs):
        for r in (a, b):
            lo.append(r.value)
            hi.append(r.value + r.length)
            owner.append(np.full(len(r.value), f, dtype=np.int64))
    for f, p in enumerate(prods, start=count):
        for part in p.outer:  # each outer element is an interval of its own
            part = np.asarray(part, dtype=np.int64)
            seed += [part, part + 1]
        for r in (p.flat, p.inner):
            lo.append(r.value)
            hi.append(r.value + r.length)
            owner.append(np.full(len(r.value), f, dtype=np.int64))
    run_lo = np.concatenate(lo) if lo else np.zeros(0, np.int64)
    run_hi = np.concatenate(hi) if hi else np.zeros(0, np.int64)
    run_of = np.concatenate(owner) if owner else np.zeros(0, np.int64)
    cuts = np.unique(np.concatenate(seed))
    dirty = np.arange(count + len(prods))
    while len(dirty):
        found = [cuts] + unions.cuts(dirty[dirty < count], cuts)
        for f in dirty[dirty >= count].tolist():
            p = prods[f - count]
            inner = p.inner_breaks(cuts)
            found += [p.inner.cuts_at(inner), p.flat.cuts_at(p.flat_breaks(inner))]
        grown = np.unique(np.concatenate(found))
        new = np.setdiff1d(grown, cuts, assume_unique=True)
        cuts = grown
        # facts with a run strictly around a new cut must be read again
        inside = (np.searchsorted(new, run_hi, side="left")
                  - np.searchsorted(new, run_lo, side="right")) > 0
        dirty = np.unique(run_of[inside])
    return cuts


def resolve(sp: Spaces, max_rounds: int = 50, whole: Iterable[Runs] = ()) -> Resolution:
    """Compute classes and atom tuples from the facts in ``sp``.

    The facts are first resolved over intervals of channels (`intervals.resolve_intervals`,
    whose cost does not grow with channel width); when that cannot give the element-wise
    answer exactly (reshape conflicts, cyclic definitions), every element is resolved.
    ``whole``: id arrays (parameter dims) the interval form should read piece by piece.
    """
    got = resolve_intervals(sp, max_rounds, whole)
    return got if got is not None else resolve_elements(sp, max_rounds)


def resolve_intervals(sp: Spaces, max_rounds: int = 50, whole: Iterable[Runs] = ()
                      ) -> Resolution | None:
    """`resolve.resolve_elements`'s exact result computed over intervals, or ``None`` where
    it cannot be given exactly this way (the caller then resolves element by element).

    ``whole``: dims (parameter dims) whose runs should start and end on interval
    bounds, so that `IntervalForm.rows` reads them piece by piece.
    """
    n = sp.count
    unions = _Unions([(a, b) for a, b, _op in sp.unions])
    prods = [_Product(flat, parts[:-1], Runs.of(parts[-1]), sizes)
             for flat, parts, _op, sizes in sp.products]
    cuts = _refine(n, unions, prods, [w for w in whole if len(w)])
    starts, lengths = cuts[:-1], np.diff(cuts)

    def sid(ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(cuts, ids, side="right") - 1

    ea, eb = unions.super_pairs(cuts)
    ua, ub = sid(ea), sid(eb)
    if not np.array_equal(lengths[ua], lengths[ub]):
        return None
    by_shape: dict[tuple[int, ...], tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for p in prods:
        inner = p.inner_breaks(cuts)
        fb = p.flat_breaks(inner)
        rows = len(fb)
        block = fb // p.sizes[-1]
        comps = []
        for j, part in enumerate(p.outer):  # row-major index of the outer parts
            stride = int(np.prod(p.sizes[j + 1:-1], dtype=np.int64))
            comps.append(sid(np.asarray(part)[(block // stride) % p.sizes[j]]))
        comps.append(np.tile(sid(p.inner.at(inner)), rows // max(len(inner), 1)))
        flat = sid(p.flat.at(fb))
        if not np.array_equal(lengths[flat], lengths[comps[-1]]) or \
                any(lengths[c].max(initial=1) != 1 for c in comps[:-1]):
            return None
        fl, cs = by_shape.setdefault(p.sizes, ([], []))
        fl.append(flat)
        cs.append(np.stack(comps, axis=1))
    sprods: Prods = {k: (np.concatenate(f), np.concatenate(c))
                     for k, (f, c) in by_shape.items()}
    sres, cyclic = resolve_facts(len(starts), ua, ub, sprods, max_rounds)
    if cyclic or sres.conflicts or sres.conflict_classes:
        return None
    return _expand(sres, cuts, n)


def _expand(sres: Resolution, cuts: np.ndarray, n: int) -> Resolution | None:
    """The element-wise resolution of a resolution over intervals."""
    starts, lengths = cuts[:-1], np.diff(cuts)
    nc = sres.num_classes
    # the first (smallest) interval of each super class, and its length
    first = np.full(nc, len(starts), dtype=np.int64)
    np.minimum.at(first, sres.label, np.arange(len(starts), dtype=np.int64))
    width = lengths[first]
    if not np.array_equal(lengths, width[sres.label]):
        return None  # intervals of one class must be read offset by offset
    # element classes (C, i) are numbered by their smallest element, start(first C) + i;
    # super classes are numbered by their smallest interval, so the ranks are cumulative
    base = np.cumsum(width) - width  # id of (C, 0)
    k = np.arange(sres.table.shape[1])[None, :]
    sw = np.where(sres.table >= 0, width[np.maximum(sres.table, 0)], 0)
    carrier = np.take_along_axis(sw, (sres.arity - 1)[:, None], axis=1)[:, 0]
    if not (np.array_equal(carrier, width) and  # the last atom carries the offset,
            (sw[k < (sres.arity - 1)[:, None]] == 1).all()):  # the others are single
        return None
    form = IntervalForm(cuts, sres.label, sres.table, sres.arity, sres.is_def, base, width)
    return Resolution(None, int(width.sum()), None, None, None, form=form, num_elements=n)


@dataclass
class IntervalForm:
    """A resolution over intervals: what `Coupling` reads instead of single channels.

    A *super class* is a class of intervals; its element classes are ``base[C] + i`` for
    ``i < width[C]``. A super class's atoms are ``table[C, :arity[C]]`` (super atoms); the
    element class ``base[C] + i`` has the atoms ``base[A]`` of those, plus ``i`` on the
    last one (the others are single channels).
    """

    cuts: np.ndarray  # interval starts, then the number of elements
    label: np.ndarray  # interval -> super class
    table: np.ndarray  # super class -> its super atoms, -1 padded
    arity: np.ndarray
    is_def: np.ndarray
    base: np.ndarray  # super class -> element class of its offset 0
    width: np.ndarray  # super class -> channels per interval

    def pieces(self, runs: Runs) -> tuple[np.ndarray, np.ndarray] | None:
        """Super classes of the whole intervals ``runs`` reads, in order, with their
        lengths; ``None`` when ``runs`` does not read whole intervals."""
        brk = np.unique(np.concatenate([runs.start, runs.interior(self.cuts)]))
        first = runs.at(brk)
        sid = np.searchsorted(self.cuts, first, side="right") - 1
        size = np.diff(np.concatenate([brk, [runs.size]]))
        if not (np.array_equal(self.cuts[sid], first)
                and np.array_equal(self.cuts[sid + 1] - first, size)):
            return None
        return self.label[sid], size

    def classes(self, ids: np.ndarray) -> np.ndarray:
        """The element class of each element id."""
        sid = np.searchsorted(self.cuts, ids, side="right") - 1
        return np.asarray(self.base[self.label[sid]] + (ids - self.cuts[sid]), dtype=np.int64)

    def atoms_of_classes(self, classes: np.ndarray) -> np.ndarray:
        """``(len(classes), k)`` atoms of element classes, -1 padded to the longest row."""
        owner = np.searchsorted(self.base, classes, side="right") - 1
        arity = self.arity[owner]
        k = int(arity.max()) if len(classes) else 1
        rows = self.table[owner, :k]
        out = np.where(rows >= 0, self.base[np.maximum(rows, 0)], -1)
        if len(classes):
            out[np.arange(len(classes)), arity - 1] += classes - self.base[owner]
        return np.asarray(out, dtype=np.int64)

    def element_arrays(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The element-wise ``label``, ``table``, ``arity`` and ``is_def`` of ``n`` elements."""
        starts, lengths = self.cuts[:-1], np.diff(self.cuts)
        label = np.repeat(self.base[self.label] - starts, lengths) + np.arange(n, dtype=np.int64)
        num = int(self.width.sum())
        owner = np.repeat(np.arange(len(self.width), dtype=np.int64), self.width)
        offset = np.arange(num, dtype=np.int64) - self.base[owner]
        rows = self.table[owner]
        arity = self.arity[owner]
        table = np.where(rows >= 0, self.base[np.maximum(rows, 0)], -1)
        last = np.arange(rows.shape[1])[None, :] == (arity - 1)[:, None]
        table += np.where(last, offset[:, None], 0)
        return label, table, arity, self.is_def[owner]

    def elements(self, classes: np.ndarray) -> np.ndarray:
        """The element classes of super classes ``classes``, in order (offsets ascending)."""
        w = self.width[classes]
        total = int(w.sum())
        return (np.repeat(self.base[classes] - np.cumsum(w) + w, w)
                + np.arange(total, dtype=np.int64))
