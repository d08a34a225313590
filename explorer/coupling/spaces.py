"""The element store the coupling rules write to.

Every channel of every tensor dimension seen in a trace is an *element* with an integer id.
Rules record three kinds of facts about elements:

* **union**: two elements are the same channel (pruning one means pruning the other);
* **product**: an element of a flattened dimension is the tuple of elements of the
  dimensions it was reshaped from (row-major), which is how heads and groups appear;
* **pin**: an element must not be pruned (model input/output, indexed by data, selected by
  a constant, touched by an op with no rule), with the reason.

Resolution (`resolve.py`) turns these facts into atoms and families.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .vocab import PinKind, Tag

IdArray = np.ndarray  # int64 element ids, one per index of a tensor dimension


@dataclass(frozen=True)
class Pin:
    """Why elements must not be pruned: a kind analyses compare, a reason people read."""

    kind: PinKind
    reason: str


@dataclass
class Spaces:
    """Element ids per value dimension plus the recorded relations."""

    count: int = 0
    dims: dict[int, list[IdArray]] = field(default_factory=dict)
    unions: list[tuple[IdArray, IdArray, int]] = field(default_factory=list)
    # (flat ids, per-element component ids, op index, sizes of the component dims)
    products: list[tuple[IdArray, list[IdArray], int, tuple[int, ...]]] = field(
        default_factory=list)
    pins: list[tuple[IdArray, Pin]] = field(default_factory=list)
    tags: list[tuple[IdArray, Tag]] = field(default_factory=list)

    def fresh(self, n: int) -> IdArray:
        """``n`` new element ids."""
        ids = np.arange(self.count, self.count + n, dtype=np.int64)
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
        self.unions.append((a, b, op_index))

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
        grids = np.meshgrid(*[np.asarray(p) for p in parts], indexing="ij")
        self.products.append((flat, [g.reshape(-1) for g in grids], op_index, tuple(sizes)))

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
            self.pins.append((np.asarray(ids, dtype=np.int64), Pin(kind, reason)))

    def tag(self, ids: IdArray, tag: Tag) -> None:
        """Mark elements with a role, e.g. `Tag.ATTENTION_HEAD` for the heads of attention."""
        if len(ids):
            self.tags.append((np.asarray(ids, dtype=np.int64), tag))
