"""The element store the coupling rules write to.

Every channel of every tensor dimension seen in a trace is an *element* with an integer id.
Rules read and write a dim's ids as an array; the facts keep them as `Runs` (runs of
consecutive ids: a fresh dim is one run however wide), and a value's arrays are turned into
runs once no later op reads it (`Spaces.retire`), so what the rules hold stays bounded by
the values alive at one point of the trace, not by every channel of the model. Rules record
three kinds of facts about elements:

* **union**: two elements are the same channel (pruning one means pruning the other);
* **product**: an element of a flattened dimension is the tuple of elements of the
  dimensions it was reshaped from (row-major), which is how heads and groups appear;
* **pin**: an element must not be pruned (model input/output, indexed by data, selected by
  a constant, touched by an op with no rule), with the reason.

Resolution (`resolve.py`) turns these facts into atoms and families.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np

from .vocab import PinKind, Tag

IdArray = np.ndarray  # element ids, one per index of a tensor dimension
# Ids are int32: a trace of a 70B model gives out 15 M of them (parameter dims mostly), and
# the rules hold every one; results read through them come out int64.
ID_DTYPE = np.int32


class Runs:
    """An id array as maximal runs of consecutive ids: local starts, first ids, lengths.

    One small array holds all three (a trace keeps one `Runs` per dim of every value).
    """

    __slots__ = ("_table", "size")

    def __init__(self, table: np.ndarray, size: int) -> None:
        self._table = table  # rows: start, value, length
        self.size = size

    @property
    def start(self) -> np.ndarray:
        return np.asarray(self._table[0])

    @property
    def value(self) -> np.ndarray:
        return np.asarray(self._table[1])

    @property
    def length(self) -> np.ndarray:
        return np.asarray(self._table[2])

    @staticmethod
    def of(ids: IdArray) -> Runs:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return Runs(np.zeros((3, 0), np.int64), 0)
        brk = np.flatnonzero(np.diff(ids) != 1)
        table = np.empty((3, len(brk) + 1), dtype=np.int64)
        table[0, 0] = 0
        table[0, 1:] = brk + 1
        table[1] = ids[table[0]]
        table[2, :-1] = np.diff(table[0])
        table[2, -1] = len(ids) - table[0, -1]
        return Runs(table, len(ids))

    @staticmethod
    def single(first: int, size: int) -> Runs:
        """The runs of ``size`` consecutive ids from ``first``."""
        return Runs(np.array([[0], [first], [size]], dtype=np.int64), size)

    def __len__(self) -> int:
        return self.size

    def expand(self) -> IdArray:
        """The id array these runs stand for."""
        if len(self.value) == 1:
            return np.arange(self.value[0], self.value[0] + self.size, dtype=ID_DTYPE)
        return np.asarray(np.repeat(self.value - self.start, self.length)
                          + np.arange(self.size), dtype=ID_DTYPE)

    def at(self, k: np.ndarray) -> np.ndarray:
        """Element ids at local positions ``k``."""
        j = np.searchsorted(self.start, k, side="right") - 1
        return np.asarray(self.value[j] + (k - self.start[j]), dtype=np.int64)

    def interior(self, cuts: np.ndarray) -> np.ndarray:
        """Local positions (not run starts) of the elements that start an interval."""
        run, at = inside(cuts, self.value, self.length)
        return np.asarray(at + (self.start - self.value)[run], dtype=np.int64)

    def cuts_at(self, breaks: np.ndarray) -> np.ndarray:
        """Interval bounds needed for the pieces starting at local positions ``breaks``
        (sorted, starting with 0): each piece's first id and the id after its last one."""
        ends = np.concatenate([breaks[1:], [self.size]]) - 1
        return np.concatenate([self.at(breaks), self.at(ends) + 1])


def inside(cuts: np.ndarray, first: np.ndarray, length: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """The cuts strictly inside the runs ``[first, first + length)``: (run, cut) pairs,
    by run then cut."""
    lo = np.searchsorted(cuts, first, side="right")
    count = np.searchsorted(cuts, first + length, side="left") - lo
    total = int(count.sum())
    if not total:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    run = np.repeat(np.arange(len(first), dtype=np.int64), count)
    return run, cuts[np.repeat(lo - np.cumsum(count) + count, count) + np.arange(total)]


Dim = IdArray | Runs  # a dim's ids while a rule may still read them, then as runs


@dataclass(frozen=True)
class Pin:
    """Why elements must not be pruned: a kind analyses compare, a reason people read."""

    kind: PinKind
    reason: str


@dataclass
class Spaces:
    """Element ids per value dimension plus the recorded relations."""

    count: int = 0
    dims: dict[int, list[Dim]] = field(default_factory=dict)
    unions: list[tuple[Runs, Runs, int]] = field(default_factory=list)
    # (flat ids, the component dims, op index, their sizes): ``flat`` is their row-major
    # product (`Spaces.grids` expands it one element at a time)
    products: list[tuple[Runs, list[IdArray], int, tuple[int, ...]]] = field(
        default_factory=list)
    pins: list[tuple[Runs, Pin]] = field(default_factory=list)
    tags: list[tuple[Runs, Tag]] = field(default_factory=list)
    # id(array) -> (weak reference to it, its runs), dropped when the array is freed
    _runs: dict[int, tuple[weakref.ref[IdArray], Runs]] = field(default_factory=dict,
                                                                repr=False)

    def fresh(self, n: int) -> IdArray:
        """``n`` new element ids."""
        if self.count + n > np.iinfo(ID_DTYPE).max:
            raise OverflowError(f"more than {np.iinfo(ID_DTYPE).max} channel ids")
        ids = np.arange(self.count, self.count + n, dtype=ID_DTYPE)
        self._remember(ids, Runs.single(self.count, n))
        self.count += n
        return ids

    def union(self, a: IdArray, b: IdArray, op_index: int) -> None:
        """Elements ``a[i]`` and ``b[i]`` are the same channel."""
        if a is b or len(a) == 0:
            return
        if len(a) != len(b):
            raise ValueError(f"union of dims of sizes {len(a)} and {len(b)}")
        if np.array_equal(a, b):
            return
        self.unions.append((self.runs_of(a), self.runs_of(b), op_index))

    def product(self, flat: IdArray, parts: list[IdArray], op_index: int) -> None:
        """``flat`` (row-major) is the product of the dims ``parts``.

        Unit dims carry no structure (``x`` times a dim of size 1 is ``x``) and are dropped,
        so a depthwise conv's (groups x 1) is the same space as its groups.
        """
        sizes = [len(p) for p in parts]
        if int(np.prod(sizes)) != len(flat):
            raise ValueError(f"product of {sizes} does not have {len(flat)} elements")
        real = [p for p in parts if len(p) != 1]
        if len(real) < len(parts):
            if len(real) == 1:
                self.union(flat, real[0], op_index)
            elif real:
                self.product(flat, real, op_index)
            return
        self.products.append((self.runs_of(flat), [np.asarray(p) for p in parts], op_index,
                              tuple(sizes)))

    @staticmethod
    def grids(parts: list[IdArray]) -> list[IdArray]:
        """A product's component ids per element of its flat dim (row-major)."""
        grids = np.meshgrid(*[np.asarray(p) for p in parts], indexing="ij")
        return [g.reshape(-1) for g in grids]

    def flatten(self, parts: list[IdArray], op_index: int) -> IdArray:
        """A new dim that is the row-major product of ``parts`` (unit dims dropped)."""
        real = [p for p in parts if len(p) != 1]
        if not real:
            return self.fresh(1)
        if len(real) == 1:
            return real[0]
        flat = self.fresh(int(np.prod([len(p) for p in real])))
        self.product(flat, real, op_index)
        return flat

    def split(self, flat: IdArray, sizes: list[int], op_index: int) -> list[IdArray]:
        """New dims of ``sizes`` whose row-major product is ``flat``."""
        real = [i for i, s in enumerate(sizes) if s != 1]
        out = [self.fresh(1) if s == 1 else None for s in sizes]
        if len(real) == 1:
            out[real[0]] = flat
        elif real:
            parts = [self.fresh(sizes[i]) for i in real]
            for i, p in zip(real, parts, strict=False):
                out[i] = p
            self.product(flat, parts, op_index)
        return out  # type: ignore[return-value]  # every slot is filled above

    def pin(self, ids: IdArray, reason: str, kind: PinKind = PinKind.STRUCTURE) -> None:
        """These elements (and every atom they are made of) must not be pruned."""
        if len(ids):
            self.pins.append((self.runs_of(ids), Pin(kind, reason)))

    def tag(self, ids: IdArray, tag: Tag) -> None:
        """Mark elements with a role, e.g. `Tag.ATTENTION_HEAD` for the heads of attention."""
        if len(ids):
            self.tags.append((self.runs_of(ids), tag))

    def retire(self, vids: list[int]) -> None:
        """No rule reads these values again: keep their dims as runs only (a dim shared by
        several values is converted once)."""
        for vid in vids:
            dims = self.dims.get(vid)
            if dims is not None:
                self.dims[vid] = [d if isinstance(d, Runs) else self.runs_of(d) for d in dims]

    def done(self) -> None:
        """The rules are over: drop the cache of runs (its weak references would also keep
        the store from being copied or pickled)."""
        self._runs.clear()

    def runs_of(self, ids: IdArray) -> Runs:
        """The runs of an id array, computed once per array while it lives (rules pass the
        same arrays around: views, residual streams; a fresh dim is known to be one run)."""
        key = id(ids)
        got = self._runs.get(key)
        if got is not None and got[0]() is ids:
            return got[1]
        runs = Runs.of(ids)
        self._remember(ids, runs)
        return runs

    def _remember(self, ids: IdArray, runs: Runs) -> None:
        key = id(ids)
        cache = self._runs
        try:
            ref = weakref.ref(ids, lambda dead: cache.pop(key, None)
                              if cache.get(key, (None,))[0] is dead else None)
        except TypeError:  # not an ndarray (a list a rule passed): nothing to key on
            return
        cache[key] = (ref, runs)

    def runs(self, vid: int) -> list[Runs]:
        """The dims of value ``vid`` as runs (empty for a value no rule saw); the same
        objects on every call, so they can key caches."""
        self.retire([vid])
        return [d for d in self.dims.get(vid, []) if isinstance(d, Runs)]

    def arrays(self, vid: int) -> list[IdArray]:
        """The dims of value ``vid`` as id arrays (empty for a value no rule saw)."""
        return [d.expand() if isinstance(d, Runs) else d for d in self.dims.get(vid, [])]
