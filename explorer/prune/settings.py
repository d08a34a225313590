"""The pruner's settings: one frozen, validated record (the one place the checks live).

`explorer.Pruner` builds it from its keyword arguments, the command line from its flags
(through the pruner), the app's session through `Pruner.configure`, the teaching path checks
its head mode with `head_mode`. Closed vocabularies are enums (`HeadMode`, `Target`,
`Compensation`); `Settings.key()` is the tuple the app keys its caches on and writes to its
action log (names, not enum members).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..coupling.groups import Group
from ..coupling.targets import default_targets, is_transformer, target_list, target_of
from ..coupling.vocab import AxisRole, HeadMode, Target
from ..graph.ir import Graph
from .compensate import Compensation, compensation
from .importance import CRITERIA

HEAD_MODES = tuple(m.value for m in HeadMode)  # for argparse choices and selectboxes
# what each head mode cuts, in the words the command line and the app both show
HEAD_MODE_WORDS = ("dims: the same dims in every head; whole: whole heads (whole key/value "
                   "groups with their query heads under GQA); query: query heads inside every "
                   "key/value group; keep: no attention change")
COMPENSATIONS = ("none", *(c.value for c in Compensation))  # choices, "none" first
# what each compensation does, in the words the command line and the app both show
COMPENSATION_WORDS = ("refit the layers that read removed channels on the calibration data: "
                      "bias (the mean of what was removed, FLAP) or lstsq (ridge least "
                      "squares, layer by layer on the pruned model's own inputs, kept per "
                      "layer only where it helps on held-out calibration samples)")
# how widths are shared out across layers: the same fraction of every axis; ranked across
# axes by scores normalised per axis (`counts.global_counts`); or from the change each
# layer's cut causes alone, measured on calibration data (`explorer.prune.measured`)
ALLOCATIONS = ("uniform", "global", "measured")

# (importance, ratio, heads, global_pruning, round_to, targets): what the app keys on
SettingsKey = tuple[str, float, str, bool, int, tuple[str, ...]]


def head_mode(value: str | HeadMode) -> HeadMode:
    """``value`` as a `HeadMode`.

    Raises:
        ValueError: not one of `HEAD_MODES`, naming them.
    """
    if isinstance(value, HeadMode):
        return value
    if value not in HEAD_MODES:
        raise ValueError(f"heads must be one of {HEAD_MODES}, got {value!r}")
    return HeadMode(value)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """What the pruner cuts and how (see `explorer.Pruner` for each field's meaning).

    Raises:
        ValueError: on construction, for any setting out of its range, naming it.
    """

    importance: str = "magnitude"
    ratio: float = 0.5
    heads: HeadMode = HeadMode.DIMS
    global_pruning: bool = False
    round_to: int = 1
    targets: frozenset[Target] | None = None  # as asked; None: the model's default
    iterative_steps: int = 1
    ratios: Mapping[str, float] = field(default_factory=dict)  # module prefix -> ratio
    max_ratio: float = 0.9
    target_params: float | None = None
    target_macs: float | None = None
    compensate: Compensation | None = None
    # one of ALLOCATIONS; ``global_pruning`` is the same choice for "global" (kept in step)
    allocation: str = "uniform"

    def __post_init__(self) -> None:
        _positive_int("iterative_steps", self.iterative_steps)
        _positive_int("round_to", self.round_to)
        if self.importance not in CRITERIA:
            raise ValueError(f"unknown importance '{self.importance}'; choose one of "
                             f"{sorted(CRITERIA)}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        object.__setattr__(self, "heads", head_mode(self.heads))
        for name, value in (("target_params", self.target_params),
                            ("target_macs", self.target_macs)):
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} is a fraction of the original in (0, 1], got {value}")
        object.__setattr__(self, "compensate", compensation(self.compensate))
        object.__setattr__(self, "ratios", dict(self.ratios))
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got "
                             f"{self.allocation!r}")
        if self.global_pruning and self.allocation == "measured":
            raise ValueError("global_pruning and allocation 'measured' are two allocations; "
                             "choose one (allocation='global' is global_pruning)")
        if self.global_pruning:
            object.__setattr__(self, "allocation", "global")
        object.__setattr__(self, "global_pruning", self.allocation == "global")

    def but(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (None values keep a setting), validated again."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "global_pruning" in changes and "allocation" not in changes:  # the bool's switch
            changes["allocation"] = "global" if changes["global_pruning"] else \
                "uniform" if self.allocation == "global" else self.allocation
        elif "allocation" in changes and "global_pruning" not in changes:
            changes["global_pruning"] = False
        return replace(self, **changes)

    @property
    def targeted(self) -> bool:
        """Whether a parameter or MAC budget decides the ratio."""
        return self.target_params is not None or self.target_macs is not None

    def key(self, targets: frozenset[Target]) -> SettingsKey:
        """(importance, ratio, heads, global_pruning, round_to, targets) with the targets
        in effect (``targets``: the asked ones, or the default resolved)."""
        return (self.importance, self.ratio, self.heads.value, self.global_pruning,
                self.round_to, tuple(target_list(targets)))




def resolve_targets(asked: frozenset[Target] | None, heads: HeadMode, graph: Graph,
                    groups: list[Group]) -> frozenset[Target]:
    """The targets asked, or the model's default; with heads "keep" on a transformer the
    default leaves the residual stream too, and asking for it is an error.

    Raises:
        ValueError: the residual stream asked for with heads "keep" on a transformer.
    """
    keep = heads is HeadMode.KEEP and is_transformer(groups)
    if asked is None:
        chosen = default_targets(graph)
        return chosen - {Target.RESIDUAL} if keep else chosen
    if keep and Target.RESIDUAL in asked:
        raise ValueError("heads 'keep' leaves attention unchanged, but the residual "
                         "stream is read and written by every attention projection; "
                         "drop 'residual' from the targets or choose another head mode "
                         "than 'keep'")
    return asked


def untargeted(target: Target, targets: frozenset[Target], by_default: bool, heads: HeadMode,
               graph: Graph) -> str:
    """Why groups of ``target`` are left alone (it is not among ``targets``)."""
    chosen = ", ".join(target_list(targets)) or "none"
    why = ""
    if by_default and target is Target.RESIDUAL:
        why = (" (heads 'keep': the residual stream feeds every attention projection)"
               if heads is HeadMode.KEEP and Target.RESIDUAL in default_targets(graph) else
               " (the default on a language model leaves the residual stream alone)")
    return f"{target} is not a target (targets: {chosen}){why}"


def target_axes(group: Group, targets: frozenset[Target], heads: HeadMode) -> list[int]:
    """The axes of ``group`` the targets and head mode let the pruner cut."""
    if target_of(group) not in targets:
        return []
    roles = {AxisRole.CHANNELS, AxisRole.GROUPS}
    if heads is HeadMode.DIMS:
        roles.add(AxisRole.HEAD_DIM)
    elif heads is HeadMode.WHOLE:
        roles.add(AxisRole.HEADS)
    elif heads is HeadMode.QUERY:  # query heads per kv group; without GQA, whole heads
        gqa = any(a.role is AxisRole.HEAD_REPEAT for a in group.axes)
        roles.add(AxisRole.HEAD_REPEAT if gqa else AxisRole.HEADS)
    # Inside an (outer x inner) layout only inner axes are cut, so widths shrink by the
    # ratio once (cutting a conv's groups and its channels per group would compound).
    return [i for i, a in enumerate(group.axes) if a.prunable and a.role in roles and
            (a.inner or a.role in (AxisRole.HEADS, AxisRole.HEAD_REPEAT))]


__all__ = ["ALLOCATIONS", "COMPENSATIONS", "COMPENSATION_WORDS", "HEAD_MODES",
           "HEAD_MODE_WORDS", "Settings", "SettingsKey", "head_mode",
           "resolve_targets", "target_axes", "untargeted"]
