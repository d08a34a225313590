"""Attention heads: the one home of reading head structure.

From the trace (`traced_head_dims`) and a group's members (`head_counts`, `head_info`: how
many heads of which width, and key/value heads), per attention module (`owner_members`,
`attention_modules`: its projections, heads and legal whole-head cuts), summed over a cut
(`query_kv_heads`), the head widths a cut must keep equal (`head_dim_ties`), and before/after
tables (`head_changes`). The coupling is read through
`HeadSource` (what `explorer.coupling.analyze.Coupling` offers), so the analysis can import
this module without a cycle.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Protocol

import numpy as np
from torch import nn

from ..graph.ir import Graph
from ..graph.ops import ATTENTION_OPS
from .groups import Axis, Group, HeadInfo, Member
from .vocab import AxisRole


class HeadSource(Protocol):
    """What head reading needs of a coupling (`explorer.coupling.analyze.Coupling`)."""

    groups: list[Group]
    head_dims: dict[str, int]

    def members_of(self, group: Group) -> list[tuple[Member, set[int]]]: ...

    def pieces_of(self, group: Group) -> dict[Member, list[frozenset[int]]]: ...

# attribute names attention code reads its head structure from
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")
HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size", "dim_head")
KV_HEAD_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")
HEAD_WIDTH_ATTRS = ("all_head_size", "attn_dim", "inner_dim", "split_size")
# The rotated slice of each head under partial rotary embeddings (``q[..., :rotary_ndims]``):
# a width the forward slices with, patched when rotary pairs are cut.
ROTARY_DIM_ATTRS = ("rotary_ndims", "rotary_dim", "rotary_emb_dim")


def traced_head_dims(graph: Graph) -> dict[str, int]:
    """Module -> q's last dim at its first attention op (sdpa, or the q @ k^T bmm)."""
    return {module: graph.values[vid].shape[-1] for module, vid in traced_queries(graph).items()}


def traced_queries(graph: Graph) -> dict[str, int]:
    """Module -> the value id of q at its first attention op (sdpa, or the q @ k^T bmm), for
    that module and its parent: its last dim is the head width the forward computes with."""
    out: dict[str, int] = {}
    for node in graph.ops:
        if node.op.overloadpacket in ATTENTION_OPS and node.module not in out:
            refs = graph.tensor_ids(node.args[:1])
            if refs and graph.values[refs[0]].shape:
                out[node.module] = refs[0]
                out.setdefault(node.module.rpartition(".")[0], refs[0])
    return out


def head_counts(axes: list[Axis], members: list[tuple[Member, set[int]]],
                kept_axis: dict[int, int] | None = None,
                head_dims: dict[str, int] | None = None,
                pieces: dict[Member, list[frozenset[int]]] | None = None
                ) -> tuple[int, int, int | None] | None:
    """(heads, head_dim, kv_heads) of one attention module's members, before or after pruning.

    The query-like member is the one spanning the most head axes. ``head_dims`` gives the
    traced head width of attention modules (q's last dim at the attention op); it scales
    with the kept share of the q/k head-dim axis (a rotary pair is two dims per atom).
    Without it, the width of the query member divided by its heads and fixed copies is used.
    Key/value heads are read per piece of each member (``pieces``, see
    `Coupling.member_pieces`): in a fused ``query_key_value`` weight the key piece spans the
    kv head axis but not the query heads per kv head, while the member as a whole spans both.
    """
    size = {a.family: (kept_axis or {}).get(a.family, a.size) for a in axes}
    head_fams = {a.family for a in axes if a.role in (AxisRole.HEADS, AxisRole.HEAD_REPEAT)}
    spans = [(m, fams & head_fams) for m, fams in members if fams & head_fams]
    dim_axes = [a for a in axes if a.role is AxisRole.HEAD_DIM]
    if not spans or not dim_axes:
        return None
    q_member, q_heads = max(spans, key=lambda s: len(s[1]))
    heads = int(np.prod([size[f] for f in q_heads]))
    q_fams = next(f for m, f in members if m == q_member)
    qk = next((a for a in dim_axes if a.family in q_fams), dim_axes[0])
    traced = (head_dims or {}).get(q_member.module.rpartition(".")[0])
    if traced is not None:
        head_dim = traced * size[qk.family] // qk.size
    else:
        fixed = {a.family for a in axes if a.role is AxisRole.FIXED}
        copies = int(np.prod([size[f] for f in q_fams & fixed] or [1]))  # the q/k/v split
        head_dim = q_member.size // max(heads * copies, 1)
    rows = [(m, set(p)) for m, f in members for p in (pieces or {}).get(m, [frozenset(f)])]
    kv = [h for _m, r in rows if (h := r & head_fams) and h < q_heads]  # () < any set
    kv_heads = int(np.prod([size[f] for f in kv[0]])) if kv else None
    if kv_heads is None and any(qk.family in f and not f & head_fams and m.rank >= 2
                                and not m.buffer for m, f in rows):
        kv_heads = 1  # a key projection with a single head (multi-query attention)
    return heads, head_dim, kv_heads


def head_dim_ties(source: HeadSource, group: Group) -> dict[int, dict[int, int]]:
    """Value/output head-dim axis -> the query/key head-dim axes it must match, each with
    the channels one of its atoms holds (empty where no rotary table is in ``group``).

    A rotary model's forward splits q, k and v into heads by one ``head_dim``, so every
    layer's kept value width must equal its kept query/key width. Under ``rotate_half``
    dims ``i`` and ``i + r/2`` of q and k move together: the q/k axis read by the rotary
    table counts *pairs* (2 channels an atom), and a partial rotary model adds the q/k dims
    it passes through unrotated (1 an atom). Value dims are those a projection without any
    rotary dim holds (``v_proj``, ``o_proj``); a value axis is tied only where the q/k widths
    add up to its own before the cut (GPT-NeoX's fused weight, whose v dims share the q/k
    atoms, has nothing to tie).
    """
    dims = {a.family: i for i, a in enumerate(group.axes) if a.role is AxisRole.HEAD_DIM}
    members = [(m, fams & dims.keys()) for m, fams in source.members_of(group)]
    rotary = {f for m, fams in members if m.buffer for f in fams}
    if not rotary:
        return {}
    held: dict[str, set[int]] = {}  # attention module -> the head-dim families of its members
    value: dict[str, set[int]] = {}  # ... of its members that hold no rotary dim
    for m, fams in members:
        if not m.buffer:
            owner = m.module.rpartition(".")[0]
            held.setdefault(owner, set()).update(fams)
            if not fams & rotary:
                value.setdefault(owner, set()).update(fams)
    out: dict[int, dict[int, int]] = {}
    for owner, values in value.items():
        qk = held[owner] - values
        if not qk & rotary:
            continue
        ties = {dims[f]: 2 if f in rotary else 1 for f in sorted(qk)}
        width = sum(n * group.axes[a].size for a, n in ties.items())
        out.update({dims[f]: ties for f in sorted(values)
                    if group.axes[dims[f]].size == width})
    return out


def head_info(axes: list[Axis], members: list[tuple[Member, set[int]]],
               head_dims: dict[str, int], pieces: dict[Member, list[frozenset[int]]]
               ) -> HeadInfo | None:
    """The head structure of a group from its members (None: not attention)."""
    counts = head_counts(axes, members, head_dims=head_dims, pieces=pieces)
    if counts is None:
        return None
    return HeadInfo(counts[0], counts[1], counts[2])


def owner_members(model: nn.Module, coupling: HeadSource, group: Group, *, buffers: bool,
                  unowned: bool) -> dict[str, list[tuple[Member, set[int]]]]:
    """A head group's members by the attention module that owns them (`head_owner`).

    Args:
        buffers: keep buffer members (e.g. rotary tables) too.
        unowned: a member without a head-owning ancestor counts under its parent module
            (else it is left out).
    """
    out: dict[str, list[tuple[Member, set[int]]]] = {}
    for member, fams in coupling.members_of(group):
        if member.buffer and not buffers:
            continue
        owner = head_owner(model, member.module)
        if owner is None and unowned:
            owner = member.module.rpartition(".")[0]
        if owner is not None:
            out.setdefault(owner, []).append((member, fams))
    return out


def query_kv_heads(coupling: HeadSource, group: Group, cut: Mapping[int, int]
                   ) -> tuple[int, int, int, int] | None:
    """(query before, query after, kv before, kv after) heads of ``group`` summed over its
    key/value head axes when ``cut`` (axis -> count) is removed; None without heads."""
    found = query_kv_heads_by_axis(coupling, group, cut)
    if not found:
        return None
    q_b, q_a, kv_b, kv_a = (sum(col) for col in zip(*found.values(), strict=True))
    return q_b, q_a, kv_b, kv_a


def query_kv_heads_by_axis(coupling: HeadSource, group: Group, cut: Mapping[int, int]
                           ) -> dict[int, tuple[int, int, int, int]]:
    """`query_kv_heads` per key/value head axis (one per layer): axis index -> (query
    before, query after, kv before, kv after)."""
    repeat = {a.family: i for i, a in enumerate(group.axes) if a.role is AxisRole.HEAD_REPEAT}
    families = [f for _m, f in coupling.members_of(group)]
    out: dict[int, tuple[int, int, int, int]] = {}
    for i, ax in enumerate(group.axes):
        if ax.role is not AxisRole.HEADS:
            continue
        r = next((repeat[f] for fams in families if ax.family in fams for f in fams
                  if f in repeat), None)
        per_b = group.axes[r].size if r is not None else 1
        per_a = per_b - cut.get(r, 0) if r is not None else 1
        kv_before, kv_after = ax.size, ax.size - cut.get(i, 0)
        out[i] = (kv_before * per_b, kv_after * per_a, kv_before, kv_after)
    return out


def head_owner(model: nn.Module, member_module: str) -> str | None:
    """Nearest ancestor (or self) of a member's module that has head attributes."""
    parts = member_module.split(".") if member_module else []
    for k in range(len(parts), -1, -1):
        name = ".".join(parts[:k])
        module = model.get_submodule(name)
        attrs = HEAD_COUNT_ATTRS + HEAD_DIM_ATTRS
        if any(isinstance(getattr(module, a, None), int) for a in attrs):
            return name
    return None


@dataclass
class AttentionInfo:
    """One attention module as recovered from the trace."""

    module: str
    q: str
    k: str
    v: str
    out: str
    num_heads: int
    head_dim: int
    kv_heads: int | None
    widths: dict[str, int] = field(default_factory=dict)  # projection -> width
    divisible: dict[str, bool] = field(default_factory=dict)  # width % num_heads == 0
    legal_head_ratios: list[str] = field(default_factory=list)  # whole-head ratios allowed
    group: int = -1

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _is_output_side(model: nn.Module, module: str, param: str, dim: int) -> bool:
    """True when ``dim`` of ``param`` indexes the layer's outputs (rows of a Linear)."""
    m = model.get_submodule(module) if module else model
    if not param.endswith("weight"):
        return dim == 0
    if hasattr(m, "nf"):  # transformers Conv1D stores (in, out)
        return dim == 1
    return dim == 0


def attention_modules(model: nn.Module, coupling: HeadSource) -> list[AttentionInfo]:
    """Every attention module found through head groups, with its divisibility facts."""
    out: list[AttentionInfo] = []
    for g in coupling.groups:
        if g.heads is None:
            continue
        by_owner = owner_members(model, coupling, g, buffers=False, unowned=True)
        head_fams = {a.family for a in g.axes if a.role in (AxisRole.HEADS, AxisRole.HEAD_REPEAT)}
        qk_dim = next((a.family for a in g.axes if a.role is AxisRole.HEAD_DIM), None)
        pieces = coupling.pieces_of(g)
        for owner, members in sorted(by_owner.items()):
            counts = head_counts(g.axes, members, head_dims=coupling.head_dims,
                                 pieces=pieces)
            if counts is None:
                continue
            outs = [(m, f) for m, f in members if _is_output_side(model, m.module, m.param, m.dim)
                    and m.param.endswith("weight")]
            ins = [m for m, f in members if not _is_output_side(model, m.module, m.param, m.dim)
                   and m.param.endswith("weight")]
            if not outs:
                continue
            q = max(outs, key=lambda mf: len(mf[1] & head_fams))
            k = next((m for m, f in outs if m is not q[0] and qk_dim in f), q[0])
            v = next((m for m, f in outs if m is not q[0] and m is not k and qk_dim not in f),
                     q[0] if len(outs) == 1 else k)
            info = AttentionInfo(owner, q[0].module, k.module, v.module,
                                 ins[0].module if ins else "", counts[0], counts[1], counts[2],
                                 group=g.id)
            for m in [q[0], k, v] + list(ins[:1]):
                info.widths[m.module] = m.size
                heads = counts[2] if m in (k, v) and counts[2] and m is not q[0] else counts[0]
                info.divisible[m.module] = m.size % max(heads, 1) == 0
            info.legal_head_ratios = legal_head_ratios(counts[2] or counts[0])
            out.append(info)
    return out


def legal_head_ratios(unit: int) -> list[str]:
    """Ratios that remove whole heads (whole key/value groups under GQA): k/unit, 0 < k < unit."""
    return [str(Fraction(k, unit)) for k in range(1, unit)]


@dataclass(frozen=True)
class HeadChange:
    """One attention module's head structure before and after pruning."""

    module: str
    group: int
    heads_before: int
    head_dim_before: int
    kv_heads_before: int | None
    heads_after: int | None  # None: the module is not found in the pruned model's trace
    head_dim_after: int | None
    kv_heads_after: int | None

    def to_dict(self) -> dict[str, object]:
        """``{"module", "before": {...}, "after": {...} | None}`` for JSON output."""
        after = None if self.heads_after is None else {
            "num_heads": self.heads_after, "head_dim": self.head_dim_after,
            "kv_heads": self.kv_heads_after}
        return {"module": self.module,
                "before": {"num_heads": self.heads_before, "head_dim": self.head_dim_before,
                           "kv_heads": self.kv_heads_before},
                "after": after}


def head_changes(before: Sequence[AttentionInfo],
                 after: Sequence[AttentionInfo]) -> list[HeadChange]:
    """Pair attention modules of an original and a pruned model by module name."""
    now = {a.module: a for a in after}
    rows = []
    for b in before:
        a = now.get(b.module)
        rows.append(HeadChange(b.module, b.group, b.num_heads, b.head_dim, b.kv_heads,
                               a.num_heads if a else None, a.head_dim if a else None,
                               a.kv_heads if a else None))
    return rows
