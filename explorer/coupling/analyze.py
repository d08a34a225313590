"""From a traced graph to groups: run the rules, resolve, find families and groups."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from ..graph.collector import paused
from ..graph.ir import Graph, OpNode, Value, ValueKind, value_refs
from ..graph.ops import TOKEN_EMBEDDING_OPS
from .context import Ctx, tensor_args
from .dispatch import apply_rule
from .groups import Axis, Group, Member, number_parts
from .heads import head_info, traced_head_dims
from .intervals import IntervalForm, resolve
from .residual import mark_residual
from .resolve import Resolution, resolve_elements
from .spaces import Pin, Runs
from .vocab import GROUP_TAGS, HEAD_TAGS, AxisRole, PinKind, Tag


@dataclass
class _MemberData:
    member: Member
    vid: int
    ids: Runs  # element ids of the dim
    res: Resolution
    # over intervals (when the resolution has an interval form): the super atoms of each
    # piece of the dim (-1 padded) and each piece's length
    rows: np.ndarray | None = None
    widths: np.ndarray | None = None
    _atoms: np.ndarray | None = None

    @property
    def atoms(self) -> np.ndarray:
        """``(size, k)`` atom classes per index, -1 padded (computed on first use)."""
        if self._atoms is None:
            self._atoms = self.res.atoms_matrix(self.ids.expand())
        return self._atoms


class Coupling:
    """The exact channel coupling of one traced model.

    Attributes:
        graph: the trace it was computed from.
        groups: every group with at least one parameter member, in trace order.
        unknown_ops: ops that had no rule, with where they ran.
        conflicts: reshape conflicts found while resolving.

    ``intervals=False`` resolves channel by channel (`resolve.resolve_elements`), the
    reference the interval resolution must match; the results are the same, only slower.
    """

    def __init__(self, graph: Graph, ignored: Iterable[str] = (), *,
                 intervals: bool = True) -> None:
        self.graph = graph
        self.ignored = tuple(ignored)
        with paused():
            self._build(graph, intervals)

    def _build(self, graph: Graph, intervals: bool) -> None:
        ctx = Ctx(graph)
        last_reads = _last_reads(graph)
        for node in graph.ops:
            try:
                apply_rule(ctx, node)
            except Exception as exc:  # noqa: BLE001 - a rule bug must not hide the rest of the model
                reason = (f"coupling rule for {node.short} failed in '{node.module}' "
                          f"({type(exc).__name__}: {exc})")
                ctx.unknown.setdefault(node.name, []).append(node.location)
                ctx.pin_all(tensor_args(node), reason, PinKind.UNSUPPORTED)
                for i in range(len(node.outputs)):
                    ctx.fresh_out(node, i, pin=reason, kind=PinKind.UNSUPPORTED)
            ctx.sp.retire(last_reads.get(node.index, []))
        for vid in graph.outputs:
            value = graph.values[vid]
            for ids in ctx.dims(vid):
                ctx.sp.pin(ids, f"model output (shape {list(value.shape)})", PinKind.MODEL_IO)
        ctx.sp.retire(list(ctx.sp.dims))
        ctx.sp.done()
        self.unknown_ops = ctx.unknown
        self.head_dims = traced_head_dims(graph)
        self._ctx = ctx
        self.res: Resolution = resolve(ctx.sp, whole=[
            ids for vid, _v in self._member_values() for ids in ctx.sp.runs(vid)]
        ) if intervals else resolve_elements(ctx.sp)
        self.conflicts = self.res.conflicts
        self._symbolic = self.res.form is not None  # members read over intervals
        self._member_fams: list[list[int]] | None = None  # per member, see _member_families
        self._ignored_by_family: dict[int, str] | None = None  # see _ignored_reason
        self._members = self._collect_members()
        self._class_atoms: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._dim_families: dict[int, frozenset[int]] = {}
        self._build_families()
        self.groups: list[Group] = self._build_groups()
        mark_residual(graph, self.groups, self.value_families)

    # -- members --------------------------------------------------------------------------
    def _collect_members(self) -> list[_MemberData]:
        out = []
        form = _interval_form(self.res)
        for vid, value in self._member_values():
            for d, ids in enumerate(self._ctx.sp.runs(vid)):
                if len(ids) < 1:
                    continue
                member = Member(self.graph.param_owner.get(value.name or "", ""),
                                value.name or f"value{vid}", d, len(ids),
                                value.kind is ValueKind.BUFFER, len(value.shape))
                md = _MemberData(member, vid, ids, self.res)
                got = form.pieces(ids) if form is not None else None
                if form is None or got is None:
                    self._symbolic = False
                    md._atoms = md.atoms
                else:
                    classes, md.widths = got
                    k = int(form.arity[classes].max())
                    md.rows = form.table[classes, :k]
                out.append(md)
        return out

    def _member_values(self) -> list[tuple[int, Value]]:
        return [(vid, value) for vid, value in self.graph.values.items()
                if value.kind in (ValueKind.PARAM, ValueKind.BUFFER)
                and vid in self._ctx.sp.dims]

    # -- families -------------------------------------------------------------------------
    def _build_families(self) -> None:
        """Atoms with the same members at the same positions form a family."""
        n = self.res.num_classes
        form = _interval_form(self.res)
        if self._symbolic and form is not None:
            rows = [md.rows if md.rows is not None else md.atoms for md in self._members]
            units, sig = _signatures(rows, len(form.width))
            fams = _first_numbered(sig)
            width = form.width  # offsets of one super atom are consecutive atoms
        else:
            units, sig = _signatures([md.atoms for md in self._members], n)
            fams = _first_numbered(sig)
            width = np.ones(n, dtype=np.int64)
        self.num_families = int(fams.max()) + 1 if len(fams) else 0
        # units (atoms, or super atoms over intervals) grouped by family, in order of first
        # appearance inside each
        order = np.argsort(fams, kind="stable")
        counts = np.bincount(fams, minlength=self.num_families)
        split = np.split(units[order], np.cumsum(counts)[:-1]) if self.num_families else []
        symbolic = form if self._symbolic else None
        of_unit = np.full(len(width), -1, dtype=np.int64)
        of_unit[units] = fams
        self.family_of = FamilyOf(of_unit, symbolic, n)
        self.family_atoms = FamilyAtoms(split, symbolic)
        self._family_pins = _pins_per_family(self)
        self._family_tags = _tags_per_family(self)

    def _expand_ids(self, ids: Runs) -> np.ndarray:
        a = self.res.atoms_matrix(ids.expand())
        return a[a >= 0]

    # -- groups ---------------------------------------------------------------------------
    def _build_groups(self) -> list[Group]:
        parent = list(range(self.num_families))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        position: dict[int, list[float]] = {}
        self._outer_heads: set[int] = set()  # head axes outermost in some member (kv groups)
        self._inner: set[int] = set()  # families last in some composite layout
        self._outer: set[int] = set()  # families before another one in some layout
        for md in self._members:
            a = self._member_rows(md)
            if a.shape[1] < 2:
                continue
            fam = np.where(a >= 0, self.family_of[np.maximum(a, 0)], -1)
            for row in np.unique(fam, axis=0):
                row = [int(f) for f in row if f >= 0]
                heads = [f for f in row if self._is_head(f)]
                if heads:
                    self._outer_heads.add(heads[0])
                free = [f for f in row if f not in self._family_pins]  # fixed axes aside
                if free:
                    self._inner.add(free[-1])
                    self._outer.update(free[:-1])
                for j, f in enumerate(row):
                    position.setdefault(f, []).append(j / max(len(row) - 1, 1))
                    parent[find(f)] = find(row[0])
        by_root: dict[int, list[int]] = {}
        for f in range(self.num_families):
            by_root.setdefault(find(f), []).append(f)
        fam_members: dict[int, list[int]] = {}
        for m, fams_m in enumerate(self._member_families()):
            for f in fams_m:
                fam_members.setdefault(f, []).append(m)
        explanations = _explanations(self)
        groups: list[Group] = []
        for root in sorted(by_root, key=lambda r: min(by_root[r])):
            fams = sorted(by_root[root], key=lambda f: (np.mean(position.get(f, [0.0])), f))
            mids = sorted({m for f in fams for m in fam_members.get(f, [])})
            if not mids or _noise(fams, self):
                continue
            members = [self._members[m].member for m in mids]
            has_heads = any(self._is_head(f) for f in fams)
            axes = [self._axis(f, members, len(fams) > 1, has_heads) for f in fams]
            if len(fams) > 1:
                axes = [dataclasses.replace(ax, inner=ax.family in self._inner and
                                            ax.family not in self._outer) for ax in axes]
            info = head_info(axes, [(self._members[m].member, self.member_families(m))
                                    for m in mids], self.head_dims,
                             {self._members[m].member: self.member_pieces(m)
                              for m in mids} if has_heads else {})
            channels = int(np.prod([a.size for a in axes if a.role is not AxisRole.FIXED]
                                   or [0]))
            prunable = any(a.prunable for a in axes)
            reason = "" if prunable else "; ".join(dict.fromkeys(a.reason for a in axes))
            modules = list(dict.fromkeys(m.module for m in members))
            expl = list(dict.fromkeys(e for f in fams for e in explanations.get(f, [])))
            groups.append(Group(len(groups), channels, axes, members, info, prunable, reason,
                                expl[:12], modules))
        number_parts(groups)
        return groups

    def _is_head(self, fam: int) -> bool:
        tags = self._family_tags.get(fam, set())
        return fam not in self._family_pins and bool(tags & HEAD_TAGS)

    def _axis(self, fam: int, members: list[Member], composite: bool, heads: bool) -> Axis:
        size = self.family_atoms.size(fam)
        tags = self._family_tags.get(fam, set())
        pin = self._family_pins.get(fam)
        if pin is not None:
            role = AxisRole.FIXED if composite else AxisRole.CHANNELS
            return Axis(fam, size, role, False, pin.reason)
        if tags & HEAD_TAGS:
            role = AxisRole.HEADS if fam in self._outer_heads else AxisRole.HEAD_REPEAT
        elif tags & GROUP_TAGS:
            role = AxisRole.GROUPS
        elif composite and heads:
            role = AxisRole.HEAD_DIM
        else:
            role = AxisRole.CHANNELS
        if size < 2:
            return Axis(fam, size, role, False, "a single channel")
        ignored = self._ignored_reason(fam)
        if ignored:
            return Axis(fam, size, role, False, ignored)
        return Axis(fam, size, role, True, "")

    def _ignored_reason(self, fam: int) -> str:
        """Why ``fam`` is not pruned: the first ignored module whose outputs (dim 0 of a
        parameter; dim 1 of an embedding table, whose rows are looked up) share an atom
        with it."""
        if not self.ignored:
            return ""
        if self._ignored_by_family is None:
            found: dict[int, str] = {}
            tables = _embedding_tables(self.graph)
            for m, md in enumerate(self._members):
                out_dim = 1 if md.member.param in tables else 0
                if md.member.dim != out_dim or md.member.buffer:
                    continue
                if not any(md.member.module == i or md.member.module.startswith(i + ".")
                           for i in self.ignored):
                    continue
                for f in self._member_families()[m]:
                    found.setdefault(f, f"outputs of ignored module '{md.member.module}'")
            self._ignored_by_family = found
        return self._ignored_by_family.get(fam, "")

    # -- pruning support ------------------------------------------------------------------
    def keep_indices(self, removed_atoms: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
        """For every member dim that loses elements, the indices it keeps."""
        dead = np.zeros(self.res.num_classes + 1, dtype=bool)
        dead[removed_atoms] = True
        out: dict[tuple[str, int], np.ndarray] = {}
        touched = self._touched(dead)
        for md in self._members:
            if touched is not None and md.rows is not None and \
                    not touched[md.rows[md.rows >= 0]].any():
                continue
            a = md.atoms
            hit = np.where(a >= 0, dead[np.maximum(a, 0)], False).any(axis=1)
            if hit.any():
                out[(md.member.param, md.member.dim)] = np.nonzero(~hit)[0]
        return out

    def _member_rows(self, md: _MemberData) -> np.ndarray:
        """A member's atom rows: one per piece, of element atoms at offset 0 (families are
        the same at every offset), or one per index when resolved element by element."""
        form = _interval_form(self.res)
        if not self._symbolic or form is None or md.rows is None:
            return md.atoms
        return np.where(md.rows >= 0, form.base[np.maximum(md.rows, 0)], -1)

    def _touched(self, dead: np.ndarray) -> np.ndarray | None:
        """Per super class of the interval form: whether one of its channels is dead."""
        form = _interval_form(self.res)
        if not self._symbolic or form is None:
            return None
        count = np.concatenate([[0], np.cumsum(dead[:self.res.num_classes])])
        return np.asarray(count[form.base + form.width] - count[form.base] > 0)

    def value_families(self, vid: int) -> list[frozenset[int]]:
        """Atom families carried by each dim of value ``vid`` (empty for a value no rule saw).

        A group's channels flow along a tensor exactly when one of its families is here.
        """
        out: list[frozenset[int]] = []
        for ids in self._ctx.sp.runs(vid):
            known = self._dim_families.get(id(ids))  # views share the id arrays of their input
            if known is not None:
                out.append(known)
                continue
            fams = np.unique(self.family_of[self._dim_atoms(ids)])
            found = frozenset(int(f) for f in fams if f >= 0)
            self._dim_families[id(ids)] = found  # sp.dims keeps ids alive: the key stays unique
            out.append(found)
        return out

    def _dim_atoms(self, runs: Runs) -> np.ndarray:
        """Atoms of the elements ``ids`` (each at least once; over intervals, the offset-0
        atom of each super atom stands for all of its offsets, which share a family)."""
        form = _interval_form(self.res)
        if self._symbolic and form is not None:
            lo = np.searchsorted(form.cuts, runs.value, side="right") - 1
            hi = np.searchsorted(form.cuts, runs.value + runs.length, side="left")
            sid = np.concatenate([np.zeros(0, np.int64)] + [
                np.arange(a, b) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)])
            rows = form.table[np.unique(form.label[sid])]
            return np.asarray(form.base[rows[rows >= 0]])
        if self._class_atoms is None:
            self._class_atoms = _class_atom_table(self.res)
        start, length, flat = self._class_atoms
        classes = np.unique(self.res.classes(runs.expand()))
        n = length[classes]
        comp = classes[n > 0]
        counts = n[n > 0]
        offsets = np.repeat(start[comp] - np.cumsum(counts) + counts, counts)
        return np.concatenate([classes[n == 0], flat[offsets + np.arange(int(counts.sum()))]])

    def member_families(self, index: int) -> set[int]:
        """Families present in member ``index``."""
        return set(self._member_families()[index])

    def _member_families(self) -> list[list[int]]:
        """Families of every member, ascending (computed once)."""
        if self._member_fams is None:
            out: list[list[int]] = []
            for md in self._members:
                a = self._member_rows(md)
                fams = np.unique(self.family_of[a[a >= 0]])
                out.append([int(f) for f in fams if f >= 0])
            self._member_fams = out
        return self._member_fams

    def members_of(self, group: Group) -> list[tuple[Member, set[int]]]:
        """The group's members with the families each one spans."""
        index = {md.member: i for i, md in enumerate(self._members)}
        return [(m, self.member_families(index[m])) for m in group.members]

    def member_pieces(self, index: int) -> list[frozenset[int]]:
        """The families of each piece of member ``index``, distinct, in order: a fused
        ``query_key_value`` weight has a query piece (kv heads x query heads per kv head x
        dims) and key/value pieces (kv heads x fixed position x dims)."""
        a = self._member_rows(self._members[index])
        fams = np.where(a >= 0, self.family_of[np.maximum(a, 0)], -1)
        if len(fams):  # distinct rows in order (one row per channel when not over intervals)
            _rows, first = np.unique(fams, axis=0, return_index=True)
            fams = fams[np.sort(first)]
        rows = (frozenset(int(f) for f in row if f >= 0) for row in fams)
        return list(dict.fromkeys(r for r in rows if r))

    def pieces_of(self, group: Group) -> dict[Member, list[frozenset[int]]]:
        """`member_pieces` of each of the group's members."""
        index = {md.member: i for i, md in enumerate(self._members)}
        return {m: self.member_pieces(index[m]) for m in group.members}

    def kept_count(self, ids: np.ndarray, removed_atoms: np.ndarray) -> int:
        """How many of the elements ``ids`` survive removing ``removed_atoms``."""
        dead = np.zeros(self.res.num_classes + 1, dtype=bool)
        dead[removed_atoms] = True
        a = self.res.atoms_matrix(ids)
        return int((~np.where(a >= 0, dead[np.maximum(a, 0)], False).any(axis=1)).sum())

    def survivors(self, removed_atoms: np.ndarray) -> Callable[[np.ndarray], int]:
        """A counter of the elements of an id array that survive removing ``removed_atoms``
        (`kept_count` with the removed set computed once, for many queries)."""
        dead = np.zeros(self.res.num_classes + 1, dtype=bool)
        dead[removed_atoms] = True

        def count(ids: np.ndarray) -> int:
            a = self.res.atoms_matrix(ids)
            return int((~np.where(a >= 0, dead[np.maximum(a, 0)], False).any(axis=1)).sum())
        return count

    def value_dims(self, vid: int) -> list[np.ndarray]:
        """Element ids of each dim of traced value ``vid`` (empty if no rule gave it any)."""
        return self._ctx.sp.arrays(vid)

    @property
    def group_axes(self) -> dict[str, np.ndarray]:
        """Module name -> element ids of its conv/norm group axis (to patch ``groups``)."""
        return self._ctx.group_axes

    def member_atoms(self) -> list[tuple[Member, np.ndarray]]:
        """Each member with its ``(size, k)`` atom matrix (for importance scores)."""
        return [(md.member, md.atoms) for md in self._members]


def _signatures(matrices: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The atoms present in the members' atom ``matrices``, in order of first appearance,
    with a signature each: a sum of one random key per (member, position, arity) it
    appears at. Over intervals the matrices hold super atoms, whose channels share
    their signature and appear one after the other."""
    sig = np.zeros(n, dtype=np.uint64)
    rng = np.random.default_rng(12345)
    keys: dict[tuple[int, int, int], np.uint64] = {}
    flats: list[np.ndarray] = []
    for m, a in enumerate(matrices):
        arity = (a >= 0).sum(axis=1)
        for j in range(a.shape[1]):
            valid = a[:, j] >= 0
            here = arity[valid]
            lo, hi = (int(here.min()), int(here.max())) if len(here) else (0, 0)
            for r in ([lo] if lo == hi else np.unique(here).tolist()):
                sel = valid & (arity == r) if lo != hi else valid
                key = keys.setdefault((m, j, int(r)), np.uint64(rng.integers(1, 2**63)))
                sig[a[sel, j]] += key  # once per atom: fancy += does not accumulate
        flats.append(a[a >= 0])
    if not flats:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    seen, first = np.unique(np.concatenate(flats), return_index=True)
    present = seen[np.argsort(first, kind="stable")]
    return present, sig[present]


def _pins_per_family(c: Coupling) -> dict[int, Pin]:
    """Family -> the first pin on any of its atoms (reshape conflicts included)."""
    out: dict[int, Pin] = {}
    for ids, pin in c._ctx.sp.pins:
        fams = np.unique(c.family_of[c._expand_ids(ids)])
        for f in fams[fams >= 0]:
            out.setdefault(int(f), pin)
    bad = np.fromiter(c.res.conflict_classes, dtype=np.int64)
    if len(bad):
        atoms = c.res.atoms_matrix_of_classes(bad)
        fams = np.unique(c.family_of[atoms[atoms >= 0]])
        for f in fams[fams >= 0]:
            out.setdefault(int(f), Pin(PinKind.CONFLICT, "reshapes that factor these "
                                       "channels in incompatible ways (see conflicts)"))
    return out

def _tags_per_family(c: Coupling) -> dict[int, set[Tag]]:
    """Family -> the tags rules put on its atoms."""
    out: dict[int, set[Tag]] = {}
    for ids, tag in c._ctx.sp.tags:
        fams = np.unique(c.family_of[c._expand_ids(ids)])
        for f in fams[fams >= 0]:
            out.setdefault(int(f), set()).add(tag)
    return out


def _explanations(c: Coupling) -> dict[int, list[str]]:
    """Family -> the ops that coupled it, worded for people, in trace order."""
    out: dict[int, list[str]] = {}
    records = [(u[0], u[2]) for u in c._ctx.sp.unions]
    records += [(p[0], p[2]) for p in c._ctx.sp.products]  # (ids, op index)
    for ids, op_index in sorted(records, key=lambda r: r[1]):
        node = c.graph.ops[op_index]
        text = _describe(node, c.graph)
        first = c.res.atoms_matrix(ids.value[:1])
        for f in np.unique(c.family_of[first[first >= 0]]):
            if f >= 0:
                out.setdefault(int(f), []).append(text)
    return out


class FamilyOf:
    """Atom class -> its family (-1 for classes that are no family's atom), read like an
    array: ``family_of[atoms]``. Over intervals it is computed from the super atom of each
    class (every channel of a super atom is in its family), so nothing per channel is kept.
    """

    def __init__(self, of_unit: np.ndarray, form: IntervalForm | None, n: int) -> None:
        self._of_unit = of_unit  # family per atom class, or per super class over intervals
        self._form = form
        self._n = n

    def __getitem__(self, classes: Any) -> np.ndarray:
        if self._form is None:
            return np.asarray(self._of_unit[classes])
        owner = np.searchsorted(self._form.base, classes, side="right") - 1
        return np.asarray(self._of_unit[owner])

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int]:
        return (self._n,)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[np.arange(self._n)], dtype=dtype)


class FamilyAtoms(Sequence[np.ndarray]):
    """Family -> its atom classes in order of first appearance; over intervals each
    family's channels are listed when read (a 70B model has millions)."""

    def __init__(self, units: list[np.ndarray], form: IntervalForm | None) -> None:
        self._units = units  # per family: its atoms, or super atoms over intervals
        self._form = form

    def __len__(self) -> int:
        return len(self._units)

    @overload
    def __getitem__(self, fam: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, fam: slice) -> Sequence[np.ndarray]: ...

    def __getitem__(self, fam: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(fam, slice):
            return [self[f] for f in range(len(self))[fam]]
        units = self._units[fam]
        return units if self._form is None else self._form.elements(units)

    def size(self, fam: int) -> int:
        """How many atoms family ``fam`` has (without listing them)."""
        units = self._units[fam]
        return len(units) if self._form is None else int(self._form.width[units].sum())


def _last_reads(graph: Graph) -> dict[int, list[int]]:
    """Op index -> the values no later op reads (its inputs read for the last time, its
    outputs nobody reads); the model's outputs are read at the end."""
    last: dict[int, int] = {}
    for node in graph.ops:
        for vid in node.outputs:
            if vid is not None:
                last.setdefault(vid, node.index)
        for ref in tensor_args(node):
            last[ref.vid] = node.index
    for vid in graph.outputs:
        last.pop(vid, None)
    out: dict[int, list[int]] = {}
    for vid, index in last.items():
        out.setdefault(index, []).append(vid)
    return out


def _first_numbered(sig: np.ndarray) -> np.ndarray:
    """Family of each unit (atom or super atom, in order of first appearance): equal
    signatures are one family, numbered in order of first appearance."""
    if not len(sig):
        return np.zeros(0, np.int64)
    uniq, first, inv = np.unique(sig, return_index=True, return_inverse=True)
    remap = np.empty(len(uniq), dtype=np.int64)
    remap[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    return remap[inv.reshape(-1)]


def _class_atom_table(res: Resolution) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, flat): the atoms of composite class c are ``flat[start[c]:][:length[c]]``
    (length 0 for an atom class)."""
    n = res.num_classes  # labels are class ids below it
    keys = np.nonzero(res.is_def)[0]
    lens = res.arity[keys]
    rows = res.table[keys]
    flat = rows[np.arange(rows.shape[1])[None, :] < lens[:, None]]  # row by row, in order
    start = np.zeros(n, dtype=np.int64)
    length = np.zeros(n, dtype=np.int64)
    start[keys] = np.cumsum(lens) - lens
    length[keys] = lens
    return start, length, flat


def _noise(fams: list[int], c: Coupling) -> bool:
    """Unit dims and pure spatial/kernel axes are not channel groups worth listing."""
    for f in fams:
        if c.family_atoms.size(f) < 2:
            continue
        pin = c._family_pins.get(f)
        if pin is None or pin.kind is not PinKind.SPATIAL:
            return False
    return True


def _describe(node: OpNode, graph: Graph) -> str:
    short = node.short
    where = node.scope
    words = {
        "add": "residual/element-wise add", "sub": "element-wise sub",
        "mul": "element-wise multiply", "cat": "concat", "view": "reshape",
        "_unsafe_view": "reshape", "reshape": "reshape", "mm": "matmul", "addmm": "linear",
        "bmm": "batched matmul (attention)", "convolution": "convolution",
        "native_layer_norm": "layer norm", "native_batch_norm": "batch norm",
        "_native_batch_norm_legit_no_training": "batch norm",
        "_native_batch_norm_legit": "batch norm", "native_group_norm": "group norm",
    }
    text = f"{words.get(short, short)} in {where}"
    if short in ("view", "_unsafe_view", "reshape") and node.outputs[0] is not None:
        text += f" (to {list(graph.values[node.outputs[0]].shape)})"
    return text


def _embedding_tables(graph: Graph) -> set[str]:
    """Names of the parameters the trace looks rows up in (embedding tables)."""
    out: set[str] = set()
    for node in graph.ops:
        if node.op.overloadpacket in TOKEN_EMBEDDING_OPS:
            for ref in value_refs(node.args[:1]):
                name = graph.values[ref.vid].name
                if name:
                    out.add(name)
    return out


def _interval_form(res: Resolution) -> IntervalForm | None:
    """The interval form of a resolution computed over intervals (None: element-wise)."""
    return res.form if isinstance(res.form, IntervalForm) else None
