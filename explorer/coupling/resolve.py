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

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .spaces import Spaces


@dataclass
class Resolution:
    """Element classes, atom expansion and any reshape conflicts."""

    label: np.ndarray  # element id -> class id
    num_classes: int
    defs: dict[int, tuple[int, ...]]  # composite class -> atom classes (flattened)
    conflicts: list[str] = field(default_factory=list)
    conflict_classes: set[int] = field(default_factory=set)  # must not be pruned
    _table: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False,
                                                         compare=False)

    def atoms_matrix_of_classes(self, classes: np.ndarray) -> np.ndarray:
        """Like `atoms_matrix`, for class ids instead of element ids."""
        k = max((len(self.defs[int(c)]) for c in classes if int(c) in self.defs), default=1)
        out = np.full((len(classes), k), -1, dtype=np.int64)
        out[:, 0] = classes
        for i, c in enumerate(classes):
            t = self.defs.get(int(c))
            if t is not None:
                out[i, :len(t)] = t
        return out

    def atoms_matrix(self, ids: np.ndarray) -> np.ndarray:
        """``(len(ids), k)`` atom classes per element, padded with -1 to the longest tuple."""
        labels = self.label[ids]
        table, lengths = self._atom_table()
        k = int(lengths[labels].max()) if len(labels) else 1
        return table[labels, :k]  # fancy indexing: a new array

    def _atom_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Class id -> its atom tuple padded with -1, and the tuple lengths (built once: a
        7B model asks for thousands of member matrices)."""
        if self._table is None:
            n = max(int(self.label.max()) + 1 if len(self.label) else 0, self.num_classes,
                    max(self.defs, default=-1) + 1)
            k = max((len(t) for t in self.defs.values()), default=1)
            table = np.full((n, k), -1, dtype=np.int64)
            table[:, 0] = np.arange(n)
            lengths = np.ones(n, dtype=np.int64)
            for c, t in self.defs.items():
                table[c, :len(t)] = t
                lengths[c] = len(t)
            self._table = (table, lengths)
        return self._table


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0:
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
    _, lab = connected_components(graph, directed=False)
    return np.asarray(lab, dtype=np.int64)


def resolve(sp: Spaces, max_rounds: int = 50) -> Resolution:
    """Compute classes and atom tuples from the facts in ``sp``."""
    n = sp.count
    a = np.concatenate([u[0] for u in sp.unions]) if sp.unions else np.zeros(0, np.int64)
    b = np.concatenate([u[1] for u in sp.unions]) if sp.unions else np.zeros(0, np.int64)
    # Products are keyed by the sizes of their component dims: two factorizations of one
    # space are only unified component by component when their sizes agree.
    by_shape: dict[tuple[int, ...], tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for flat, parts, _op, sizes in sp.products:
        fl, cs = by_shape.setdefault(sizes, ([], []))
        fl.append(flat)
        cs.append(np.stack(parts, axis=1))
    prods = {k: (np.concatenate(f), np.concatenate(c)) for k, (f, c) in by_shape.items()}
    label = _components(n, a, b)
    conflicts: list[str] = []
    cross_bad: set[int] = set()
    for _ in range(max_rounds):
        na: list[np.ndarray] = []
        nb: list[np.ndarray] = []
        for flat, comps in prods.values():
            lc = label[comps]
            _, first, inv = np.unique(lc, axis=0, return_index=True, return_inverse=True)
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
        merged = _components(n, xa[diff], xb[diff])
        label = merged[label]
    uniq, relabel = np.unique(label, return_inverse=True)
    relabel = relabel.reshape(-1).astype(np.int64)
    bad: set[int] = set()
    if cross_bad:  # class ids of the last round, mapped to the compact numbering
        old = np.fromiter(cross_bad, dtype=np.int64)
        bad.update(int(x) for x in np.searchsorted(uniq, old[np.isin(old, uniq)]))
    label = relabel
    defs = _flatten_defs(label, prods, conflicts, bad)
    return Resolution(label, len(uniq), defs, conflicts, bad)


def _cross_arity(label: np.ndarray, prods: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]],
                 conflicts: list[str], bad: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Classes factored under different component sizes: unify when they agree once fully
    expanded (``3 x 384`` and ``3 x (6 x 64)``), otherwise the class is a conflict."""
    if len(prods) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first_def: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # cls -> (row, sizes)
    clash: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for sizes, (flat, comps) in prods.items():
        lf, lc = label[flat], label[comps]
        _, idx = np.unique(lf, return_index=True)
        for i in idx:
            cls, row = int(lf[i]), tuple(int(x) for x in lc[i])
            if cls in first_def and first_def[cls][1] != sizes:
                clash.setdefault(cls, [first_def[cls]]).append((row, sizes))
            first_def.setdefault(cls, (row, sizes))
    ea: list[int] = []
    eb: list[int] = []
    for cls, rows in clash.items():
        expanded = [_expand_sized(first_def, row, sizes, {cls}) for row, sizes in rows]
        base = expanded[0]
        for other in expanded[1:]:
            if base is None or other is None or [s for _a, s in base] != [s for _a, s in other]:
                conflicts.append(f"class {cls}: reshapes that factor one space in "
                                 f"incompatible ways")
                bad.add(cls)
                for row, _sizes in rows:
                    bad.update(row)
                continue
            ea.extend(a for a, _s in base)
            eb.extend(a for a, _s in other)
    return np.asarray(ea, np.int64), np.asarray(eb, np.int64)


def _expand_sized(defs: dict[int, tuple[tuple[int, ...], tuple[int, ...]]],
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


def _expand(defs: dict[int, tuple[int, ...]], row: tuple[int, ...],
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


def _flatten_defs(label: np.ndarray, prods: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]],
                  conflicts: list[str], bad: set[int]) -> dict[int, tuple[int, ...]]:
    raw: dict[int, tuple[int, ...]] = {}
    for flat, comps in prods.values():
        lf, lc = label[flat], label[comps]
        _, idx = np.unique(lf, return_index=True)
        for key, row in zip(lf[idx].tolist(), lc[idx].tolist(), strict=True):
            raw.setdefault(key, tuple(row))
    # A class that is a product containing itself (interleaved rotary embeddings stack
    # x[..., 1::2] and x[..., ::2] back into x) is one channel pair removed as a unit: it
    # becomes an atom, and classes built on it expand through it normally.
    for cls in _cyclic(raw):
        del raw[cls]
    out: dict[int, tuple[int, ...]] = {}
    for cls, row in raw.items():
        expanded = _expand(raw, row, {cls})
        if expanded is None:
            conflicts.append(f"class {cls}: reshapes that could not be expanded")
            bad.add(cls)
            bad.update(row)
            continue
        out[cls] = expanded
    return out


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
