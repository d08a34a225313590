"""Head-divisibility report: per attention module, its projections, heads and legal cuts."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from torch import nn

from .analyze import Coupling, head_counts
from .groups import Member
from .vocab import AxisRole

# attribute names attention code reads its head structure from
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")
HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size", "dim_head")
KV_HEAD_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")
HEAD_WIDTH_ATTRS = ("all_head_size", "attn_dim", "inner_dim", "split_size")
# The rotated slice of each head under partial rotary embeddings (``q[..., :rotary_ndims]``):
# a width the forward slices with, patched when rotary pairs are cut.
ROTARY_DIM_ATTRS = ("rotary_ndims", "rotary_dim", "rotary_emb_dim")


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


def attention_modules(model: nn.Module, coupling: Coupling) -> list[AttentionInfo]:
    """Every attention module found through head groups, with its divisibility facts."""
    out: list[AttentionInfo] = []
    for g in coupling.groups:
        if g.heads is None:
            continue
        by_owner: dict[str, list[tuple[Member, set[int]]]] = {}
        for member, fams in coupling.members_of(g):
            if member.buffer:
                continue
            owner = head_owner(model, member.module) or member.module.rpartition(".")[0]
            by_owner.setdefault(owner, []).append((member, fams))
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
