"""Groups of coupled channels: the records the pruner, the reports and the app read."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .vocab import AxisRole


@dataclass(frozen=True)
class Member:
    """One parameter/buffer dimension a group touches."""

    module: str
    param: str  # qualified parameter or buffer name
    dim: int
    size: int  # width of that dim in the unpruned model
    buffer: bool = False
    rank: int = 1  # number of dims of the tensor (2+ for Linear/Conv weights)


@dataclass(frozen=True)
class Axis:
    """One independently prunable index set of a group (an atom family).

    A plain channel group has one axis. An attention group has several: key/value heads,
    query heads per key/value head, q/k dims per head, v/out dims per head.
    """

    family: int  # family id inside the `Coupling`
    size: int
    role: AxisRole
    prunable: bool
    reason: str  # why it is not prunable ("" when it is)
    inner: bool = True  # innermost in every (outer x inner) layout it is part of


@dataclass(frozen=True)
class HeadInfo:
    """Head structure recovered from the reshapes and contractions of the trace."""

    num_heads: int
    head_dim: int
    kv_heads: int | None  # None when keys/values have as many heads as queries
    v_head_dim: int | None = None  # differs from head_dim only when v/out dims are their own axis


@dataclass
class Group:
    """Channels that must be pruned together, across every member parameter."""

    id: int
    channels: int
    axes: list[Axis]
    members: list[Member]
    heads: HeadInfo | None
    prunable: bool
    reason: str
    explanation: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # owning modules in trace order
    # modules whose residual adds sum this group's channels (see `coupling.residual`);
    # empty unless it passes through two or more: then it is a residual stream
    residual: list[str] = field(default_factory=list)
    part: int = 0  # among groups whose first member is the same parameter dim (`group_key`)

    def to_dict(self) -> dict[str, object]:
        """The JSON form used by ``trace --json``, plans and the app."""
        return {
            "id": self.id,
            "channels": self.channels,
            "members": [{"module": m.module, "parameter": m.param, "dim": m.dim,
                         "size": m.size} for m in self.members],
            "heads": None if self.heads is None else {
                "num_heads": self.heads.num_heads, "head_dim": self.heads.head_dim,
                "kv_heads": self.heads.kv_heads, "v_head_dim": self.heads.v_head_dim},
            "axes": [{"size": a.size, "role": a.role.value, "prunable": a.prunable,
                      "reason": a.reason} for a in self.axes],
            "prunable": self.prunable,
            "reason": self.reason,
            "explanation": self.explanation,
        }

    @property
    def title(self) -> str:
        """Short label such as ``"384 ch: blocks.0.mlp.fc1"``, ``"6 heads x 16: ..."`` or
        ``"residual stream (4096 ch): model.layers"`` (named by the blocks its adds are in).
        A group spanning layers (attention tied by shared rotary frequencies) names them all:
        ``"8 heads x 64: model.layers.*.self_attn.q_proj (layers 0-29)"``."""
        where = layer_span(self.modules) if self.modules else (
            self.members[0].module if self.members else "?")
        if self.heads:
            return f"{self.heads.num_heads} heads x {self.heads.head_dim}: {where}"
        if self.residual or not where:  # summed across blocks, or owned by the root module
            blocks = common_prefix(self.residual)
            return f"residual stream ({self.channels} ch)" + (f": {blocks}" if blocks else "")
        return f"{self.channels} ch: {where}"

    @property
    def key(self) -> GroupKey:
        """A name for the group that survives re-tracing (ids change after every cut)."""
        return group_key(self)


GroupKey = tuple[str, int, int]


def common_prefix(modules: Sequence[str]) -> str:
    """The dotted module path every name in ``modules`` starts with ("" when none)."""
    if not modules:
        return ""
    parts = [m.split(".") if m else [] for m in modules]
    shared: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        shared.append(level[0])
    return ".".join(shared)


def layer_span(modules: Sequence[str]) -> str:
    """The first of ``modules``, or, where the same module sits in several numbered layers
    among them, its path with the layer number starred and the layers listed:
    ``model.layers.*.self_attn.q_proj (layers 0-3)``."""
    first = modules[0].split(".")
    at = next((k for k, p in enumerate(first) if p.isdigit()), None)
    if at is None:
        return modules[0]
    rest = first[:at] + first[at + 1:]
    layers = {int(parts[at]) for m in modules if len(parts := m.split(".")) == len(first)
              and parts[at].isdigit() and parts[:at] + parts[at + 1:] == rest}
    if len(layers) < 2:
        return modules[0]
    return ".".join([*first[:at], "*", *first[at + 1:]]) + f" (layers {number_ranges(layers)})"


def number_ranges(numbers: Iterable[int]) -> str:
    """``0-3``, ``0, 2`` or ``0-2, 5``: sorted numbers, runs of three or more as a range."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def group_key(group: Group) -> GroupKey:
    """The group's first member parameter and dim, and which part of that dim it is (groups
    carved out of one split tensor share both): stable across re-traces, unlike ids."""
    m = group.members[0]
    return (m.param, m.dim, group.part)


def number_parts(groups: list[Group]) -> None:
    """Set `Group.part`: 0, 1, ... over the groups (in order) whose first member is the same
    parameter dim, such as the q, k and v groups of a fused ``qkv`` weight."""
    seen: dict[tuple[str, int], int] = {}
    for g in groups:
        if g.members:
            first = (g.members[0].param, g.members[0].dim)
            g.part = seen.get(first, 0)
            seen[first] = g.part + 1
