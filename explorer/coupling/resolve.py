"""Resolve recorded unions and products into classes of elements and their atoms.

Two elements are in one class when a chain of unions joins them. A product says a class is
the tuple of its component classes; products are treated as injective functions, so

* two tuples with equal components are the same class (functionality), and
* one class defined by two tuples makes their components equal (injectivity).

Both are applied until nothing changes (usually 2-3 rounds). A class with no product
definition is an *atom*: the unit that pruning removes. Every element expands to the tuple
of atoms it is made of; removing any of those atoms removes the element.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .spaces import Spaces


class Form(Protocol):
    """A resolution kept over intervals (`explorer.coupling.intervals.IntervalForm`): what
    `Resolution` reads from it (a protocol, so this module imports nothing above it)."""

    def classes(self, ids: np.ndarray) -> np.ndarray: ...

    def atoms_of_classes(self, classes: np.ndarray) -> np.ndarray: ...

    def element_arrays(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ...


class Resolution:
    """Element classes, atom expansion and any reshape conflicts.

    The atom expansion is one dense table (a row per class, -1 padded) so that expanding
    the millions of elements of a large model is one indexing operation. A resolution
    computed over intervals (``form``) answers `atoms_matrix` from the intervals and builds
    the element-wise arrays (``label``, ``table``, ``arity``, ``is_def``) only when read.

    Attributes:
        label: element id -> class id.
        num_classes: number of classes.
        table: ``(num_classes, k)``: class -> its atom classes (itself for an atom).
        arity: class -> number of atoms in its row of ``table``.
        is_def: class -> it is a product of other classes (not an atom).
        conflicts: reshape conflicts found while resolving.
        conflict_classes: classes that must not be pruned.
        form: the same resolution over intervals, when it was computed that way.
    """

    def __init__(self, label: np.ndarray | None, num_classes: int, table: np.ndarray | None,
                 arity: np.ndarray | None, is_def: np.ndarray | None,
                 conflicts: list[str] | None = None, conflict_classes: set[int] | None = None,
                 form: Form | None = None, num_elements: int = 0) -> None:
        self._arrays = None if label is None or table is None or arity is None or \
            is_def is None else (label, table, arity, is_def)
        self.num_classes = num_classes
        self.conflicts = conflicts if conflicts is not None else []
        self.conflict_classes = conflict_classes if conflict_classes is not None else set()
        self.form = form
        self._num_elements = num_elements

    def _element_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            assert self.form is not None  # noqa: S101 - built with arrays or with a form
            self._arrays = self.form.element_arrays(self._num_elements)
        return self._arrays

    @property
    def label(self) -> np.ndarray:
        return self._element_arrays()[0]

    @property
    def table(self) -> np.ndarray:
        return self._element_arrays()[1]

    @property
    def arity(self) -> np.ndarray:
        return self._element_arrays()[2]

    @property
    def is_def(self) -> np.ndarray:
        return self._element_arrays()[3]

    @property
    def defs(self) -> dict[int, tuple[int, ...]]:
        """Composite class -> atom classes (flattened), as a dict (for reading)."""
        return {int(c): tuple(int(x) for x in self.table[c, :self.arity[c]])
                for c in np.nonzero(self.is_def)[0]}

    def classes(self, ids: np.ndarray) -> np.ndarray:
        """The class of each element of ``ids``."""
        if self._arrays is None and self.form is not None:
            return self.form.classes(np.asarray(ids, dtype=np.int64))
        return np.asarray(self.label[ids])

    def atoms_matrix_of_classes(self, classes: np.ndarray) -> np.ndarray:
        """Like `atoms_matrix`, for class ids instead of element ids."""
        classes = np.asarray(classes, dtype=np.int64)
        if self._arrays is None and self.form is not None:
            return self.form.atoms_of_classes(classes)
        k = int(self.arity[classes].max()) if len(classes) else 1
        return self.table[classes, :k].copy()

    def atoms_matrix(self, ids: np.ndarray) -> np.ndarray:
        """``(len(ids), k)`` atom classes per element, padded with -1 to the longest tuple."""
        return self.atoms_matrix_of_classes(self.classes(ids))


Prods = dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]  # sizes -> (flat, components)


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0:
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
    _, lab = connected_components(graph, directed=False)
    return np.asarray(lab, dtype=np.int64)


def resolve_elements(sp: Spaces, max_rounds: int = 50) -> Resolution:
    """`resolve` with one element per channel (the reference the interval path matches)."""
    a = np.concatenate([u[0].expand() for u in sp.unions]) if sp.unions else \
        np.zeros(0, np.int64)
    b = np.concatenate([u[1].expand() for u in sp.unions]) if sp.unions else \
        np.zeros(0, np.int64)
    # Products are keyed by the sizes of their component dims: two factorizations of one
    # space are only unified component by component when their sizes agree.
    by_shape: dict[tuple[int, ...], tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for flat, parts, _op, sizes in sp.products:
        fl, cs = by_shape.setdefault(sizes, ([], []))
        fl.append(flat.expand())
        cs.append(np.stack(Spaces.grids(parts), axis=1))
    prods = {k: (np.concatenate(f), np.concatenate(c)) for k, (f, c) in by_shape.items()}
    return resolve_facts(sp.count, a, b, prods, max_rounds)[0]


def resolve_facts(n: int, a: np.ndarray, b: np.ndarray, prods: Prods, max_rounds: int = 50
                  ) -> tuple[Resolution, bool]:
    """Classes and atoms of ``n`` elements with unions ``a[i] ~ b[i]`` and products ``prods``
    (component sizes -> (flat ids, component ids per row)); also whether some definition
    was cyclic (searched one class at a time)."""
    label = _components(n, a, b)
    conflicts: list[str] = []
    cross_bad: set[int] = set()
    for _ in range(max_rounds):
        na: list[np.ndarray] = []
        nb: list[np.ndarray] = []
        bound = int(label.max()) + 1  # labels are component ids below this
        for flat, comps in prods.values():
            lc = label[comps]
            _, first, inv = np.unique(_row_keys(lc, bound), return_index=True,
                                      return_inverse=True)
            na.append(label[flat])
            nb.append(label[flat[first[inv.reshape(-1)]]])
            _, first2, inv2 = np.unique(label[flat], return_index=True, return_inverse=True)
            na.append(lc.reshape(-1))
            nb.append(lc[first2[inv2.reshape(-1)]].reshape(-1))
        cross_bad.clear()
        conflicts.clear()
        ea, eb = _cross_arity(label, prods, conflicts, cross_bad)
        na.append(ea)
        nb.append(eb)
        xa, xb = np.concatenate(na), np.concatenate(nb)
        diff = xa != xb
        if not diff.any():
            break
        merged = _components(bound, xa[diff], xb[diff])  # over classes, not elements
        label = merged[label]
    uniq, relabel = np.unique(label, return_inverse=True)
    relabel = relabel.reshape(-1).astype(np.int64)
    bad: set[int] = set()
    if cross_bad:  # class ids of the last round, mapped to the compact numbering
        old = np.fromiter(cross_bad, dtype=np.int64)
        bad.update(int(x) for x in np.searchsorted(uniq, old[np.isin(old, uniq)]))
    label = relabel
    table, arity, is_def, cyclic = _flatten_defs(label, len(uniq), prods, conflicts, bad)
    return Resolution(label, len(uniq), table, arity, is_def, conflicts, bad), cyclic


def _row_keys(rows: np.ndarray, bound: int) -> np.ndarray:
    """One int64 per row, equal exactly when the rows (values below ``bound``) are equal:
    `np.unique` on it replaces the much slower row-wise ``np.unique(rows, axis=0)``."""
    key = rows[:, 0].astype(np.int64)
    for j in range(1, rows.shape[1]):
        if len(key) and int(key.max()) >= (2**62) // bound:  # would overflow: densify
            key = np.unique(key, return_inverse=True)[1].reshape(-1).astype(np.int64)
        key = key * bound + rows[:, j]
    return key


FirstRows = list[tuple[tuple[int, ...], np.ndarray, np.ndarray]]  # (sizes, classes, rows)


def _first_rows(label: np.ndarray, prods: Prods) -> FirstRows:
    """Per product shape, in order: each class defined there (ascending) and its component
    classes at its first definition."""
    out = []
    for sizes, (flat, comps) in prods.items():
        classes, idx = np.unique(label[flat], return_index=True)
        out.append((sizes, classes, label[comps[idx]]))
    return out


class _FirstDefs:
    """``class -> (row, sizes)`` of its first definition, read from `_first_rows` arrays
    (a mapping for `_expand_sized` without a dict of every class)."""

    def __init__(self, firsts: FirstRows, n: int) -> None:
        self.firsts = firsts
        self.shape = np.full(n, -1, dtype=np.int64)
        self.pos = np.zeros(n, dtype=np.int64)
        for si in range(len(firsts) - 1, -1, -1):  # the earliest shape wins
            classes = firsts[si][1]
            self.shape[classes] = si
            self.pos[classes] = np.arange(len(classes))

    def __contains__(self, cls: object) -> bool:
        return bool(self.shape[int(cls)] >= 0)  # type: ignore[call-overload]

    def __getitem__(self, cls: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        sizes, _classes, rows = self.firsts[int(self.shape[cls])]
        return tuple(rows[self.pos[cls]].tolist()), sizes


def _cross_arity(label: np.ndarray, prods: Prods, conflicts: list[str],
                 bad: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Classes factored under different component sizes: unify when they agree once fully
    expanded (``3 x 384`` and ``3 x (6 x 64)``), otherwise the class is a conflict."""
    if len(prods) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    firsts = _first_rows(label, prods)
    n = int(label.max()) + 1
    counts = np.bincount(np.concatenate([c for _s, c, _r in firsts]), minlength=n)
    multi = counts >= 2  # defined under two or more component sizes
    if not multi.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first_def = _FirstDefs(firsts, n)
    pending: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    clash: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for sizes, classes, rows in firsts:  # in the order the per-class loop met them
        for i in np.nonzero(multi[classes])[0].tolist():
            cls, entry = int(classes[i]), (tuple(rows[i].tolist()), sizes)
            if cls in pending:
                clash.setdefault(cls, [pending[cls]]).append(entry)
            else:
                pending[cls] = entry
    ea: list[int] = []
    eb: list[int] = []
    for cls, rows_ in clash.items():
        expanded = [_expand_sized(first_def, row, sizes, {cls}) for row, sizes in rows_]
        base = expanded[0]
        for other in expanded[1:]:
            if base is None or other is None or [s for _a, s in base] != [s for _a, s in other]:
                conflicts.append(f"class {cls}: reshapes that factor one space in "
                                 f"incompatible ways")
                bad.add(cls)
                for row, _sizes in rows_:
                    bad.update(row)
                continue
            ea.extend(a for a, _s in base)
            eb.extend(a for a, _s in other)
    return np.asarray(ea, np.int64), np.asarray(eb, np.int64)


def _expand_sized(defs: _FirstDefs,
                  row: tuple[int, ...], sizes: tuple[int, ...],
                  seen: set[int]) -> list[tuple[int, int]] | None:
    """Atoms of a product row with the size of the dim each came from."""
    out: list[tuple[int, int]] = []
    for c, size in zip(row, sizes, strict=False):
        if c in defs and c not in seen:
            sub_row, sub_sizes = defs[c]
            if int(np.prod(sub_sizes)) != size:
                return None
            sub = _expand_sized(defs, sub_row, sub_sizes, seen | {c})
            if sub is None:
                return None
            out.extend(sub)
        elif c in seen:
            return None
        else:
            out.append((c, size))
    return out


def _expand(defs: Mapping[int, tuple[int, ...]], row: tuple[int, ...],
            seen: set[int]) -> tuple[int, ...] | None:
    out: list[int] = []
    for c in row:
        if c in defs:
            if c in seen:
                return None
            sub = _expand(defs, defs[c], seen | {c})
            if sub is None:
                return None
            out.extend(sub)
        else:
            out.append(c)
    return tuple(out)


class _Rows(Mapping[int, tuple[int, ...]]):
    """``class -> component classes`` of the classes still defined, over a dense table."""

    def __init__(self, table: np.ndarray, length: np.ndarray) -> None:
        self.table, self.length = table, length

    def __contains__(self, cls: object) -> bool:
        return bool(self.length[int(cls)] > 0)  # type: ignore[call-overload]

    def __getitem__(self, cls: int) -> tuple[int, ...]:
        return tuple(self.table[cls, :self.length[cls]].tolist())

    def __iter__(self) -> Iterator[int]:
        return iter(np.nonzero(self.length > 0)[0].tolist())

    def __len__(self) -> int:
        return int((self.length > 0).sum())


def _flatten_defs(label: np.ndarray, n: int, prods: Prods, conflicts: list[str],
                  bad: set[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """The atom table: every class's row of atom classes, its arity, and which are products.

    A definition whose components are all atoms is its own expansion; nested ones are
    expanded level by level (`_atom_table`). Classes that reach a cycle are searched one
    by one (`_cyclic`), in first-definition order as conflicts are reported in that order.
    The last value says whether any class reached a cycle.
    """
    firsts = _first_rows(label, prods)
    width = max((rows.shape[1] for _s, _c, rows in firsts), default=1)
    raw = np.full((n, width), -1, dtype=np.int64)
    length = np.zeros(n, dtype=np.int64)
    first_shape = np.full(n, -1, dtype=np.int64)
    for si in range(len(firsts) - 1, -1, -1):  # the earliest shape's definition wins
        _sizes, classes, rows = firsts[si]
        raw[classes] = -1
        raw[classes, :rows.shape[1]] = rows
        length[classes] = rows.shape[1]
        first_shape[classes] = si
    defined = np.nonzero(length > 0)[0]
    order = defined[np.lexsort((defined, first_shape[defined]))]  # first-definition order

    # A class that is a product containing itself (interleaved rotary embeddings stack
    # x[..., 1::2] and x[..., ::2] back into x) is one channel pair removed as a unit: it
    # becomes an atom, and classes built on it expand through it normally. Only classes
    # that reach a cycle through their definitions (no finite nesting level) are searched.
    rows_view = _Rows(raw, length)
    level = _levels(raw, length)
    tangled = order[(length[order] > 0) & (level[order] < 0)]
    if len(tangled):
        cyclic = _cyclic({int(c): rows_view[int(c)] for c in tangled})
        length[cyclic] = 0
        level = _levels(raw, length)
    expanded: dict[int, tuple[int, ...]] = {}
    for cls in order[(length[order] > 0) & (level[order] < 0)].tolist():  # none in a DAG
        row = rows_view[cls]
        got = _expand(rows_view, row, {cls})
        if got is None:
            conflicts.append(f"class {cls}: reshapes that could not be expanded")
            bad.add(cls)
            bad.update(row)
            continue
        expanded[cls] = got
    return (*_atom_table(raw, length, level, expanded), bool(len(tangled)))


def _levels(raw: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Nesting level of every defined class (0: its components are atoms; -1: it reaches a
    cycle, or is not defined)."""
    has = length > 0
    comp_def = np.where(raw >= 0, has[np.maximum(raw, 0)], False)
    level = np.full(len(length), -1, dtype=np.int64)
    simple = has & ~comp_def.any(axis=1)
    level[simple] = 0
    todo = np.nonzero(has & ~simple)[0]
    while len(todo):
        sub = np.where(comp_def[todo], level[np.maximum(raw[todo], 0)], 0)
        ready = (sub >= 0).all(axis=1)
        if not ready.any():
            break  # the rest reach a cycle
        level[todo[ready]] = sub[ready].max(axis=1) + 1
        todo = todo[~ready]
    return level


def _atom_table(raw: np.ndarray, length: np.ndarray, level: np.ndarray,
                expanded: dict[int, tuple[int, ...]]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense expansion: atoms are themselves, level-0 products their row, and deeper ones
    the concatenated expansions of their components, one level at a time."""
    n, width = raw.shape
    has = length > 0
    top = int(level.max()) if n else 0
    k = max([width if (level == 0).any() else 1, 1, *map(len, expanded.values())])
    table = np.full((n, max(k, 1)), -1, dtype=np.int64)
    table[:, 0] = np.arange(n)
    arity = np.ones(n, dtype=np.int64)
    simple = level == 0
    if simple.any():  # (with none, the table may be narrower than ``raw``)
        table[simple, :width] = raw[simple]
        arity[simple] = length[simple]
    for lv in range(1, top + 1):
        cls = np.nonzero(level == lv)[0]
        comps = raw[cls]
        parts = [np.where((comps[:, j] >= 0)[:, None],
                          table[np.maximum(comps[:, j], 0)], -1) for j in range(width)]
        cat = np.concatenate(parts, axis=1)
        cat = np.take_along_axis(cat, np.argsort(cat < 0, axis=1, kind="stable"), axis=1)
        count = (cat >= 0).sum(axis=1)
        need = int(count.max())
        if need > table.shape[1]:
            table = np.concatenate([table, np.full((n, need - table.shape[1]), -1,
                                                   dtype=np.int64)], axis=1)
        table[cls] = -1
        table[cls, :need] = cat[:, :need]
        arity[cls] = count
    for cls_, atoms in expanded.items():
        if len(atoms) > table.shape[1]:
            table = np.concatenate([table, np.full((n, len(atoms) - table.shape[1]), -1,
                                                   dtype=np.int64)], axis=1)
        table[cls_] = -1
        table[cls_, :len(atoms)] = atoms
        arity[cls_] = len(atoms)
    is_def = (level >= 0) & has
    is_def[list(expanded)] = True
    return table, arity, is_def


def _cyclic(raw: dict[int, tuple[int, ...]]) -> list[int]:
    """Classes that reach themselves through their product definitions."""
    state: dict[int, int] = {}  # 1 = on the stack, 2 = done
    found: list[int] = []
    for root in raw:
        if root in state:
            continue
        stack = [(root, iter(raw[root]))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif nxt in raw:
                if state.get(nxt) == 1:
                    found.append(nxt)
                elif nxt not in state:
                    state[nxt] = 1
                    stack.append((nxt, iter(raw[nxt])))
    return list(dict.fromkeys(found))
