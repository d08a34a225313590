"""The pruner: choose indices per group, pre-flight them, apply, and report each step."""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from ..coupling.analyze import Coupling
from ..coupling.groups import Group
from ..graph.metrics import count_macs, count_params
from ..graph.tracer import trace
from .calibration import Calibration, load_calibration
from .importance import Criterion, make
from .preflight import Preflight, Verdict
from .removal import Applied, Removal, apply_removal, removed_atoms, undo
from .transaction import transaction
from .validate import check_module_names

if TYPE_CHECKING:
    from .proposal import Proposal

HEAD_MODES = ("dims", "whole", "keep")


@dataclass
class GroupChange:
    """One group's share of a step."""

    group: int
    title: str
    axis: str  # role of the pruned axis
    removed: list[int]
    width_before: int
    width_after: int


@dataclass
class Skip:
    group: int
    title: str
    reason: str


@dataclass
class Unsafe:
    group: int
    module: str
    location: str
    error: str


@dataclass
class StepReport:
    """What a step really removed; truthy iff it removed anything."""

    step: int
    changes: list[GroupChange] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    unsafe: list[Unsafe] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    forward_ok: bool = True
    output_shape_ok: bool = True
    attributes: dict[str, dict[str, list[object]]] = field(default_factory=dict)
    config: dict[str, list[object]] = field(default_factory=dict)  # transformers config changes
    notes: list[str] = field(default_factory=list)  # caveats the user should read

    def __bool__(self) -> bool:
        return any(c.removed for c in self.changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidate:
    """One axis of one group the pruner may cut, with its scores."""

    group: Group
    axis: int
    scores: np.ndarray
    original: int  # width of this axis in the unpruned model
    limit: float  # ratio of ``original`` this axis may lose at this step


def _kept(original: int, ratio: float, round_to: int, minimum: int = 1) -> int:
    keep = max(int(round(original * (1.0 - ratio))), minimum)
    if round_to > 1 and original >= round_to:
        keep = max(round_to, int(math.ceil(keep / round_to) * round_to))
    return min(keep, original)


class Pruner:
    """Structural pruner over the exact coupling groups of a traced model.

    Args:
        model: the model to prune in place.
        example_inputs: positional inputs for one forward.
        importance: criterion name (see `explorer.importance.CRITERIA`).
        ratio: fraction of each group's channels to remove by the last step.
        iterative_steps: number of `step()` calls to reach ``ratio``.
        global_pruning: rank channels of all groups together (scores normalised per axis)
            instead of cutting every group by ``ratio``.
        heads: "dims" (same dims removed in every head), "whole" (remove whole heads; with
            GQA, whole key/value groups, so query heads stay divisible by kv heads), or "keep".
        round_to: keep every remaining width a multiple of this.
        ignored: module names whose outputs are never pruned.
        calibration: data for data-aware criteria (see `explorer.calibration`).
        ratios: per-module ratios (module name prefix -> ratio) overriding ``ratio``.
        max_ratio: the most any axis may lose, also under global pruning.
        target_params: stop at this fraction of the original parameter count (overrides
            ``ratio`` by searching the uniform ratio that meets it).
        target_macs: the same for multiply-accumulates.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, importance: str = "magnitude",
                 ratio: float = 0.5, iterative_steps: int = 1, global_pruning: bool = False,
                 heads: str = "dims", round_to: int = 1, ignored: Sequence[str] = (),
                 calibration: Calibration | str | None = None,
                 ratios: Mapping[str, float] | None = None, max_ratio: float = 0.9,
                 target_params: float | None = None, target_macs: float | None = None) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        for name, value in (("iterative_steps", iterative_steps), ("round_to", round_to)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_module_names(model, ignored, "ignored")
        if heads not in HEAD_MODES:
            raise ValueError(f"heads must be one of {HEAD_MODES}, got {heads!r}")
        for name, value in (("target_params", target_params), ("target_macs", target_macs)):
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} is a fraction of the original in (0, 1], got {value}")
        self.model = model
        self.inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        self.criterion: Criterion = make(importance)
        self.importance = importance
        self.ratio = ratio
        self.steps = max(1, int(iterative_steps))
        self.global_pruning = global_pruning
        self.heads = heads
        self.round_to = max(1, int(round_to))
        self.ignored = list(ignored)
        self.ratios = dict(ratios or {})
        self.max_ratio = max_ratio
        self.target_params = target_params
        self.target_macs = target_macs
        self.current_step = 0
        self.notes: list[str] = []  # caveats found while scoring (copied into step reports)
        self.config_note = ""  # why a transformers config could not follow, if it could not
        self.applied: list[Applied] = []  # every application, in order (for plans and undo)
        self._calib_source = calibration
        self._calibration: Calibration | None = None
        self._analyse()
        self._original = {self._key(g, i): a.size for g in self.groups
                          for i, a in enumerate(g.axes)}
        self.params_original = count_params(model)
        self.macs_original = count_macs(self.graph)

    # -- analysis -------------------------------------------------------------------------
    def _analyse(self) -> None:
        self.graph = trace(self.model, self.inputs)
        self.coupling = Coupling(self.graph, ignored=self.ignored)
        self.groups: list[Group] = self.coupling.groups
        self._prepared = False

    def _prepare(self) -> None:
        if self._prepared:
            return
        calib = None
        on_meta = any(p.device.type == "meta" for p in self.model.parameters())
        if on_meta and self.importance != "random":
            if self.criterion.needs_data:
                raise ValueError(f"importance '{self.importance}' needs real weights and data, "
                                 f"but the model is on the meta device; use 'random' (or "
                                 f"plan structure only) and replay the plan on real weights")
            self.notes.append(f"the weights are on the meta device, so '{self.importance}' "
                              f"has no values: the lowest indices of each group are chosen")
        if self.criterion.needs_data:
            if self._calibration is None:
                self._calibration = load_calibration(self._calib_source, self.inputs)
            calib = self._calibration
        try:
            self.criterion.prepare(self.model, self.coupling, calib)
        except (RuntimeError, IndexError, TypeError) as e:  # a batch the forward rejects
            detail = " ".join(str(e).split())[:200]
            raise ValueError(f"importance '{self.importance}': the model failed on the "
                             f"calibration data ({type(e).__name__}: {detail}); give batches "
                             f"shaped like the example inputs") from e
        self._prepared = True

    @staticmethod
    def _key(group: Group, axis: int) -> tuple[str, int, int, str]:
        m = group.members[0]
        return (m.param, m.dim, axis, group.axes[axis].role)

    def _target_axes(self, group: Group) -> list[int]:
        roles = {"channels", "groups"}
        if self.heads == "dims":
            roles.add("head-dim")
        elif self.heads == "whole":
            roles.add("heads")
        # Inside an (outer x inner) layout only inner axes are cut, so widths shrink by the
        # ratio once (cutting a conv's groups and its channels per group would compound).
        return [i for i, a in enumerate(group.axes) if a.prunable and a.role in roles and
                (a.inner or a.role == "heads")]

    def _group_ratio(self, group: Group, base: float) -> float:
        best = None
        for prefix, r in self.ratios.items():
            inside = any(m == prefix or m.startswith(prefix + ".") for m in group.modules)
            if inside and (best is None or len(prefix) > len(best[0])):
                best = (prefix, r)
        return best[1] if best else base

    def candidates(self) -> tuple[list[Candidate], list[Skip]]:
        """Every prunable axis with its scores, and why the other groups are skipped."""
        self._prepare()
        cands: list[Candidate] = []
        skipped: list[Skip] = []
        for g in self.groups:
            if not g.prunable:
                skipped.append(Skip(g.id, g.title, g.reason))
                continue
            axes = self._target_axes(g)
            if not axes:
                skipped.append(Skip(g.id, g.title, f"no axis prunable in head mode "
                                                   f"'{self.heads}'"))
                continue
            s = self.criterion.scores(self.model, self.coupling, g)
            for i in axes:
                original = self._original.get(self._key(g, i), g.axes[i].size)
                cands.append(Candidate(g, i, s[i], original, 0.0))
        return cands, skipped

    # -- proposals ------------------------------------------------------------------------
    def propose(self, ratio: float | None = None) -> tuple[Removal, list[GroupChange], list[Skip]]:
        """Indices the next step would remove (lowest importance first)."""
        if ratio is None:
            ratio = self._step_ratio()
        cands, skipped = self.candidates()
        counts = (self._global_counts(cands, ratio) if self.global_pruning
                  else self._local_counts(cands, ratio))
        removal, changes = Removal(), []
        for c, n in zip(cands, counts, strict=False):
            ax = c.group.axes[c.axis]
            if n <= 0:
                why = "at its minimum width" if ax.size <= 1 else "already at the target width"
                skipped.append(Skip(c.group.id, c.group.title, f"{ax.role}: {why}"))
                continue
            idx = sorted(int(x) for x in np.argsort(c.scores, kind="stable")[:n])
            removal.add(c.group.id, c.axis, idx)
            changes.append(GroupChange(c.group.id, c.group.title, ax.role, idx, ax.size,
                                       ax.size - n))
        return removal, changes, skipped

    def _step_ratio(self) -> float:
        return self.ratio * min(self.current_step + 1, self.steps) / self.steps

    def _local_counts(self, cands: list[Candidate], ratio: float) -> list[int]:
        out = []
        for c in cands:
            r = min(self._group_ratio(c.group, ratio), self.max_ratio)
            out.append(c.group.axes[c.axis].size - _kept(c.original, r, self.round_to))
        return out

    def _global_counts(self, cands: list[Candidate], ratio: float) -> list[int]:
        """Rank all indices together; every axis keeps at least (1 - max_ratio)."""
        total = sum(c.original for c in cands)
        budget = int(round(total * ratio)) - sum(c.original - c.group.axes[c.axis].size
                                                 for c in cands)
        pool = []
        for k, c in enumerate(cands):
            norm = c.scores / (np.mean(np.abs(c.scores)) + 1e-12)
            for s in np.sort(norm):
                pool.append((float(s), k))
        pool.sort()
        counts = [0] * len(cands)
        floor = [max(_kept(c.original, self.max_ratio, self.round_to), 1) for c in cands]
        for _s, k in pool:
            if budget <= 0:
                break
            size = cands[k].group.axes[cands[k].axis].size
            if size - counts[k] - 1 >= floor[k]:
                counts[k] += 1
                budget -= 1
        if self.round_to > 1:  # round each kept width up to a multiple
            for k, c in enumerate(cands):
                size = c.group.axes[c.axis].size
                keep = size - counts[k]
                keep = min(size, int(math.ceil(keep / self.round_to) * self.round_to))
                counts[k] = size - keep
        return counts

    def _ratio_for_target(self) -> float:
        """Smallest uniform ratio whose predicted params (or MACs) meet the target."""
        lo, hi = 0.0, self.max_ratio
        flight = Preflight(self.model, self.inputs, self.coupling) if self.target_macs else None
        for _ in range(14):
            mid = (lo + hi) / 2
            removal, _c, _s = self.propose(mid)
            if self._meets_target(removal, flight):
                hi = mid
            else:
                lo = mid
        return hi

    def _meets_target(self, removal: Removal, flight: Preflight | None) -> bool:
        if self.target_params is not None and \
                self.predict_params(removal) > self.target_params * self.params_original:
            return False
        if self.target_macs is not None and flight is not None:
            verdict = flight.check(removal)
            if verdict.graph is None or count_macs(verdict.graph) > \
                    self.target_macs * self.macs_original:
                return False
        return True

    def predict_params(self, removal: Removal) -> int:
        """Parameter count after applying ``removal`` (computed from kept indices)."""
        keeps = self.coupling.keep_indices(removed_atoms(self.coupling, removal))
        total = 0
        for name, p in self.model.named_parameters():
            shape = list(p.shape)
            for d in range(len(shape)):
                if (name, d) in keeps:
                    shape[d] = len(keeps[(name, d)])
            total += math.prod(shape)
        return total

    # -- steps ----------------------------------------------------------------------------
    def step(self, interactive: bool = False) -> StepReport | Iterator[Proposal]:
        """Prune one step; the report says what was removed and why groups were skipped.

        With ``interactive=True`` returns an iterator of `Proposal` objects instead, one
        group at a time; each is accepted (as proposed or resized) or rejected by the caller.
        """
        if interactive:
            from .proposal import proposals
            return proposals(self)
        report = StepReport(self.current_step + 1, params_before=count_params(self.model),
                            macs_before=count_macs(self.graph))
        if self.current_step >= self.steps:
            report.skipped.append(Skip(-1, "all", f"the schedule has {self.steps} step(s) "
                                                  f"and they are done"))
            report.params_after, report.macs_after = report.params_before, report.macs_before
            return report
        if self.target_params is not None or self.target_macs is not None:
            removal, changes, skipped = self.propose(self._ratio_for_target())
        else:
            removal, changes, skipped = self.propose()
        report.skipped = skipped
        report.notes = list(dict.fromkeys(self.notes))
        flight = Preflight(self.model, self.inputs, self.coupling)
        removal, changes = self._drop_unsafe(flight, removal, changes, report)
        report.changes = changes
        if removal:
            with transaction(self.model):  # the config update too: all or nothing
                applied = apply_removal(self.model, self.coupling, removal)
                self._update_config(report)
            self.applied.append(applied)
            report.attributes = dict(applied.attributes)
        self.current_step += 1
        report.notes += flight.notes
        self._finish(report, flight)
        return report

    def _finish(self, report: StepReport, flight: Preflight) -> None:
        try:
            self._analyse()
            report.forward_ok = True
            report.output_shape_ok = flight.same_shapes(
                [tuple(self.graph.values[o].shape) for o in self.graph.outputs])
        except Exception:  # noqa: BLE001 - reported, not hidden: the flag says it failed
            report.forward_ok = report.output_shape_ok = False
        report.params_after = count_params(self.model)
        report.macs_after = count_macs(self.graph)

    def _update_config(self, report: StepReport) -> None:
        """Keep a transformers ``config`` in line with uniform pruned widths."""
        if not hasattr(getattr(self.model, "config", None), "to_dict"):
            return
        from .fixups.hfconfig import update_config
        update = update_config(self.model)
        self.config_note = update.reason
        report.config = {k: list(v) for k, v in update.changed.items()}

    def undo(self) -> Applied | None:
        """Revert the last application exactly (same tensors, same attributes)."""
        if not self.applied:
            return None
        last = self.applied.pop()
        undo(self.model, last)
        self._update_config(StepReport(self.current_step))  # widths are back: so is config
        self._analyse()
        return last

    def _drop_unsafe(self, flight: Preflight, removal: Removal, changes: list[GroupChange],
                     report: StepReport) -> tuple[Removal, list[GroupChange]]:
        """Keep the groups whose pruning runs; name the others with module and line.

        Bisection finds the failing groups in about log2(n) checks when few fail. Groups
        that fail alone at the same source line are then retried together, since model code
        such as ``reshape(B, C, -1)`` often ties two groups that are only safe as a pair.
        """
        by_group: dict[int, dict[int, list[int]]] = {}
        for (g, a), idx in removal.picks.items():
            by_group.setdefault(g, {})[a] = idx
        safe: list[int] = []
        verdicts: dict[int, Verdict] = {}

        def trial(extra: list[int]) -> Removal:
            r = Removal()
            for g in safe + extra:
                for a, idx in by_group[g].items():
                    r.add(g, a, idx)
            return r

        def split(ids: list[int]) -> list[int]:
            verdict = flight.check(trial(ids))
            if verdict.ok:
                safe.extend(ids)
                return []
            if len(ids) == 1:
                verdicts[ids[0]] = verdict
                return ids
            half = len(ids) // 2
            return split(ids[:half]) + split(ids[half:])

        unsafe = split(sorted(by_group))
        clusters: dict[str, list[int]] = {}
        for g in unsafe:
            clusters.setdefault(verdicts[g].location or verdicts[g].error, []).append(g)
        for ids in clusters.values():
            if len(ids) > 1 and flight.check(trial(ids)).ok:
                safe.extend(ids)
        for g in unsafe:
            if g not in safe:
                v = verdicts[g]
                report.unsafe.append(Unsafe(g, v.module, v.location, v.error))
        return trial([]), [c for c in changes if c.group in safe]
