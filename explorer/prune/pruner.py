"""The pruner: choose indices per group, pre-flight them, apply, and report each step."""
from __future__ import annotations

import itertools
import linecache
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from ..coupling.analyze import Coupling
from ..coupling.groups import Group, GroupKey
from ..coupling.places import axis_layers
from ..coupling.targets import (
    default_targets,
    is_transformer,
    parse_targets,
    target_list,
    target_of,
)
from ..coupling.vocab import AxisRole, HeadMode, Target
from ..graph.ir import Graph
from ..graph.metrics import count_macs, count_params
from ..graph.tracer import trace
from .calibration import Calibration, load_calibration
from .compensate import compensation, prune_and_compensate
from .fixups.hfconfig import ConfigUpdate
from .importance import CRITERIA, Criterion, make
from .joint import Solution, merge, solve
from .preflight import Preflight, Verdict, forward_check
from .proposal import Proposal, lowest
from .records import Candidate, GroupChange, Skip, StepReport, Unsafe
from .removal import Applied, PruneError, Removal, apply_removal, removed_atoms, undo
from .transaction import ModelState, transaction
from .validate import check_module_names, nonfinite_text, nonfinite_weights

HEAD_MODES = tuple(m.value for m in HeadMode)  # for argparse choices and selectboxes


def _validate(importance: str, ratio: float, heads: str, round_to: int,
              target_params: float | None = None, target_macs: float | None = None) -> None:
    """The pruner's settings checks (the one place they live; the app relies on them)."""
    if importance not in CRITERIA:
        raise ValueError(f"unknown importance '{importance}'; choose one of {sorted(CRITERIA)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if heads not in HEAD_MODES:
        raise ValueError(f"heads must be one of {HEAD_MODES}, got {heads!r}")
    if int(round_to) < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    for name, value in (("target_params", target_params), ("target_macs", target_macs)):
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"{name} is a fraction of the original in (0, 1], got {value}")


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
            GQA, whole key/value groups with their query heads), "query" (with GQA, the same
            number of query heads inside every key/value group, keys and values kept;
            without GQA, whole heads), or "keep" (no attention parameter changes).
        round_to: keep every remaining width a multiple of this.
        ignored: module names whose outputs are never pruned.
        targets: what may be cut (names of `explorer.coupling.vocab.Target`: "mlp",
            "heads", "residual", "channels", or "all"); None: every target but the residual
            stream on a language model (token ids index an embedding), every target otherwise
            (`explorer.coupling.targets.default_targets`).
            With ``heads="keep"`` a transformer's residual stream cannot be a target (it
            feeds every attention projection).
        calibration: data for data-aware criteria (see `explorer.calibration`).
        ratios: per-module ratios (module name prefix -> ratio) overriding ``ratio``.
        max_ratio: the most any axis may lose, also under global pruning.
        target_params: stop at this fraction of the original parameter count (overrides
            ``ratio`` by searching the uniform ratio that meets it).
        target_macs: the same for multiply-accumulates.
        compensate: refit the consumers of removed channels on the calibration data after
            each step: "bias", "lstsq" or None (see `explorer.prune.compensate`).
        scores: a criterion prepared elsewhere on this model's original weights, used instead
            of preparing ``importance`` here; e.g. `explorer.prune.sequential.
            sequential_criterion` on the checkpoint that a ``meta`` model describes. Its
            statistics index the original channels, so it ranks the first cut only.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, importance: str = "magnitude",
                 ratio: float = 0.5, iterative_steps: int = 1, global_pruning: bool = False,
                 heads: str = "dims", round_to: int = 1, ignored: Sequence[str] = (),
                 calibration: Calibration | str | None = None,
                 ratios: Mapping[str, float] | None = None, max_ratio: float = 0.9,
                 target_params: float | None = None, target_macs: float | None = None,
                 compensate: str | None = None, scores: Criterion | None = None,
                 targets: str | Sequence[str] | None = None) -> None:
        for name, value in (("iterative_steps", iterative_steps), ("round_to", round_to)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_module_names(model, ignored, "ignored")
        if scores is not None and iterative_steps != 1:
            raise ValueError("scores given for the original weights rank one cut only; use "
                             "iterative_steps=1")
        _validate(importance, ratio, heads, round_to, target_params, target_macs)
        chosen = None if targets is None else parse_targets(targets)
        self.compensate = compensation(compensate)
        self.model = model
        self.inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        self.criterion: Criterion = make(importance) if scores is None else scores
        self.importance = importance
        self._given_scores = scores is not None
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
        self.version = 0  # names the model state: new at every re-trace, an undo takes back
        self._versions = itertools.count(1)  # the old one (caches of proposals key on it)
        self._flight: Preflight | None = None
        # the analysis before each `apply` (for an undo without re-tracing)
        # id(Applied) -> the analysis before it (graph, coupling, version, proposals)
        self._before: dict[int, tuple[Graph, Coupling, int, Any]] = {}
        # id(Applied) -> the model's settings and config before it (for an exact undo)
        self._settings: dict[int, ModelState] = {}
        self._notes: dict[int, str] = {}  # id(Applied) -> config_note before it (for undo)
        self._pending: tuple[int, tuple[Any, ...], list[Proposal]] | None = None
        # NaN/Inf weights: tracing and proposals still work, `step` and `apply` refuse
        self.nonfinite = nonfinite_weights(model)
        self._analyse()
        self._asked_targets = chosen  # None: the default decides (`_resolve_targets`)
        self.targets = self._resolve_targets(chosen, heads)
        self._original = {self._key(g, i): a.size for g in self.groups
                          for i, a in enumerate(g.axes)}
        self.params_original = count_params(model)
        self.macs_original = count_macs(self.graph)

    def _check_finite(self) -> None:
        """Refuse to prune on weights with NaN/Inf values (their scores and cuts mean nothing).

        Raises:
            PruneError: naming the first such tensor; nothing is changed.
        """
        if self.nonfinite:
            raise PruneError(f"the model's weights are not finite: "
                             f"{nonfinite_text(self.nonfinite)}; scores on them mean nothing, "
                             "so nothing is pruned. Load weights without NaN/Inf (tracing and "
                             "inspecting still work)")

    # -- analysis -------------------------------------------------------------------------
    def _analyse(self, graph: Graph | None = None) -> None:
        self.graph = graph if graph is not None else trace(self.model, self.inputs)
        self.coupling = Coupling(self.graph, ignored=self.ignored)
        self.groups: list[Group] = self.coupling.groups
        self._prepared = False
        self._flight = None
        self._pending = None
        self.version = next(self._versions)

    def retrace(self) -> None:
        """Trace the model again after a change made outside the pruner (a block removal,
        a plan replay or its undo); a transformers config follows the widths."""
        self._update_config(StepReport(self.current_step))
        self._before.clear()  # the model changed outside the pruner: old analyses are stale
        self._settings.clear()  # and so are the settings recorded before each application
        self._notes.clear()
        self._analyse()

    def configure(self, importance: str | None = None, ratio: float | None = None,
                  heads: str | None = None, global_pruning: bool | None = None,
                  round_to: int | None = None,
                  targets: str | Sequence[str] | None = None) -> None:
        """Change settings on the same traced model (None keeps a setting as it is).

        Raises:
            ValueError: a bad setting; the pruner is unchanged.
        """
        new_importance = self.importance if importance is None else importance
        new_ratio = self.ratio if ratio is None else float(ratio)
        new_heads = self.heads if heads is None else heads
        new_round = self.round_to if round_to is None else int(round_to)
        _validate(new_importance, new_ratio, new_heads, new_round)
        asked = self._asked_targets if targets is None else parse_targets(targets)
        if asked == self.targets and self._asked_targets is None:
            asked = None  # the targets as they are (a page passes them back): still default
        new_targets = self._resolve_targets(asked, new_heads)
        self._asked_targets, self.targets = asked, new_targets
        if new_importance != self.importance or (self._given_scores and importance):
            self._given_scores = False
            self.criterion, self.importance, self._prepared = make(new_importance), \
                new_importance, False
        self.ratio, self.heads, self.round_to = new_ratio, new_heads, new_round
        if global_pruning is not None:
            self.global_pruning = bool(global_pruning)
        self._pending = None

    def settings(self) -> tuple[str, float, str, bool, int, tuple[str, ...]]:
        """(importance, ratio, heads, global_pruning, round_to, targets)."""
        return (self.importance, self.ratio, self.heads, self.global_pruning, self.round_to,
                tuple(target_list(self.targets)))

    def preflight(self) -> Preflight:
        """The pre-flight runner for the model as it is now (kept until the next cut)."""
        if self._flight is None:
            self._flight = Preflight(self.model, self.inputs, self.coupling)
        return self._flight

    def _prepare(self) -> None:
        if self._prepared:
            return
        if self._given_scores:
            if self.applied:
                raise ValueError("the given scores rank the original channels and this model "
                                 "was cut since; prune in one step (iterative_steps=1) or "
                                 "compute the scores again on the pruned weights")
            self._prepared = True
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
    def _key(group: Group, axis: int) -> tuple[str, int, int, int, str]:
        return (*group.key, axis, group.axes[axis].role)

    def target_axes(self, group: Group) -> list[int]:
        """The axes of ``group`` the targets and head mode let the pruner cut."""
        if target_of(group) not in self.targets:
            return []
        roles = {AxisRole.CHANNELS, AxisRole.GROUPS}
        mode = HeadMode(self.heads)
        if mode is HeadMode.DIMS:
            roles.add(AxisRole.HEAD_DIM)
        elif mode is HeadMode.WHOLE:
            roles.add(AxisRole.HEADS)
        elif mode is HeadMode.QUERY:  # query heads per kv group; without GQA, whole heads
            gqa = any(a.role is AxisRole.HEAD_REPEAT for a in group.axes)
            roles.add(AxisRole.HEAD_REPEAT if gqa else AxisRole.HEADS)
        # Inside an (outer x inner) layout only inner axes are cut, so widths shrink by the
        # ratio once (cutting a conv's groups and its channels per group would compound).
        return [i for i, a in enumerate(group.axes) if a.prunable and a.role in roles and
                (a.inner or a.role in (AxisRole.HEADS, AxisRole.HEAD_REPEAT))]

    @property
    def targets_default(self) -> bool:
        """Whether the targets are the model's default (none were asked for)."""
        return self._asked_targets is None

    def _resolve_targets(self, asked: frozenset[Target] | None, heads: str
                         ) -> frozenset[Target]:
        """The targets asked, or the default; with ``heads="keep"`` on a transformer the
        default leaves the residual stream too, and asking for it is an error.

        Raises:
            ValueError: the residual stream asked for with heads "keep" on a transformer.
        """
        keep = HeadMode(heads) is HeadMode.KEEP and is_transformer(self.groups)
        if asked is None:
            chosen = default_targets(self.graph)
            return chosen - {Target.RESIDUAL} if keep else chosen
        if keep and Target.RESIDUAL in asked:
            raise ValueError("heads 'keep' leaves attention unchanged, but the residual "
                             "stream is read and written by every attention projection; "
                             "drop 'residual' from the targets or choose another head mode "
                             "than 'keep'")
        return asked

    def untargeted(self, target: Target) -> str:
        """Why groups of ``target`` are left alone (it is not among the targets)."""
        chosen = ", ".join(target_list(self.targets)) or "none"
        why = ""
        if self.targets_default and target is Target.RESIDUAL:
            why = (" (heads 'keep': the residual stream feeds every attention projection)"
                   if HeadMode(self.heads) is HeadMode.KEEP and Target.RESIDUAL in
                   default_targets(self.graph) else
                   " (the default on a language model leaves the residual stream alone)")
        return f"{target} is not a target (targets: {chosen}){why}"

    def could_propose(self, group: Group) -> bool:
        """Whether `pending` may hold a proposal for ``group``: it is prunable and the head
        mode leaves it an axis to cut (`candidates` skips the others)."""
        return group.prunable and bool(self.target_axes(group))

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
            axes = self.target_axes(g)
            if target_of(g) not in self.targets:
                skipped.append(Skip(g.id, g.title, self.untargeted(target_of(g))))
                continue
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
        return self._propose(cands, skipped, ratio)

    def _propose(self, cands: list[Candidate], skipped: list[Skip], ratio: float
                 ) -> tuple[Removal, list[GroupChange], list[Skip]]:
        """`propose` over candidates already scored (``skipped`` is extended)."""
        counts = (self._global_counts(cands, ratio) if self.global_pruning
                  else self._local_counts(cands, ratio))
        removal, changes = Removal(), []
        places: dict[int, dict[int, str]] = {}
        for c, n in zip(cands, counts, strict=False):
            ax = c.group.axes[c.axis]
            if n <= 0:
                why = "at its minimum width" if ax.size <= 1 else "already at the target width"
                skipped.append(Skip(c.group.id, c.group.title, f"{ax.role}: {why}"))
                continue
            idx = sorted(int(x) for x in np.argsort(c.scores, kind="stable")[:n])
            removal.add(c.group.id, c.axis, idx)
            if c.group.id not in places:
                places[c.group.id] = axis_layers(self.coupling, c.group)
            changes.append(GroupChange(c.group.id, c.group.title, ax.role, idx, ax.size,
                                       ax.size - n, where=places[c.group.id][c.axis]))
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

    def plan_ratio(self) -> float:
        """The ratio a full prune uses: ``ratio``, or the one searched to meet
        ``target_params`` / ``target_macs``."""
        if self.target_params is not None or self.target_macs is not None:
            return self._ratio_for_target()
        return self.ratio

    def params_now(self) -> int:
        """The model's parameter count as it is now."""
        return count_params(self.model)

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

    # -- proposals, one group at a time ---------------------------------------------------
    def pending(self) -> list[Proposal]:
        """This step's proposal for every group it would cut, bound to this pruner (cached
        until the next cut or settings change)."""
        if self._pending is None or self._pending[:2] != (self.version, self.settings()):
            cands, skipped = self.candidates()  # scored once: the picks and the charts
            removal, changes, _skipped = self._propose(cands, skipped, self._step_ratio())
            scores = {(c.group.id, c.axis): c.scores for c in cands}
            by_group: dict[int, list[tuple[int, GroupChange]]] = {}
            for (gid, axis), change in zip(removal.picks, changes, strict=True):
                by_group.setdefault(gid, []).append((axis, change))
            out = [Proposal(self.groups[gid], [c for _a, c in picks], [a for a, _c in picks],
                            {a: np.asarray(scores[(gid, a)]) for a, _c in picks}, pruner=self)
                   for gid, picks in by_group.items()]
            self._pending = (self.version, self.settings(), out)
        return list(self._pending[2])

    def proposals(self) -> Iterator[Proposal]:
        """One proposal per group, re-planned after each accepted one; the caller accepts
        (as proposed or resized) or rejects each. Ends the step when every group is seen."""
        done: set[GroupKey] = set()
        while True:
            nxt = next((p for p in self.pending() if p.key not in done), None)
            if nxt is None:
                self.current_step = min(self.current_step + 1, self.steps)
                return
            done.add(nxt.key)
            yield nxt

    def verdicts(self, pending: list[Proposal] | None = None,
                 progress: Callable[[float, str], None] | None = None
                 ) -> Solution[GroupKey]:
        """Each proposal's pre-flight alone, and the joint sets that run when cut together."""
        props = self.pending() if pending is None else pending
        return solve(self.preflight(), {p.key: p.removal() for p in props}, alone=True,
                     progress=progress, rescale=self.common_fraction)

    def common_fraction(self, parts: list[Removal]) -> list[Removal]:
        """``parts`` re-cut so every axis loses the same fraction (their mean), lowest
        scores first: what groups tied by ``C // num_heads`` need to shrink together."""
        picks = [(g, a, len(idx)) for r in parts for (g, a), idx in r.picks.items() if idx]
        if not picks:
            return parts
        fraction = float(np.mean([n / self.groups[g].axes[a].size for g, a, n in picks]))
        smallest = min(self.groups[g].axes[a].size for g, a, _n in picks)
        # a multiple of 1/smallest: then every wider axis (usually a multiple of the smallest,
        # such as C = num_heads * head_dim) keeps a width that rounds the same way
        fraction = max(1, round(fraction * smallest)) / smallest
        cands, _ = self.candidates()
        scores = {(c.group.id, c.axis): c.scores for c in cands}
        out = []
        for r in parts:
            new = Removal()
            for (g, a), idx in r.picks.items():
                size = self.groups[g].axes[a].size
                n = size - _kept(size, fraction, self.round_to)
                new.add(g, a, lowest(scores[(g, a)], n) if (g, a) in scores and n > 0 else idx)
            out.append(new)
        return out

    def joint(self, proposal: Proposal, pending: list[Proposal] | None = None,
              solution: Solution[GroupKey] | None = None) -> Proposal | None:
        """The proposal that makes an unsafe ``proposal`` safe, or None.

        Groups that fail alone at the same model line are cut together by the same fraction
        (the proposal's, a joint proposal); else, when the group's innermost axis is what
        fails, its outer axis at that fraction (``fallback`` says why, as `Pruner.step`
        does). None when ``proposal`` is safe alone or nothing runs.
        """
        props = {p.key: p for p in (self.pending() if pending is None else pending)}
        props.setdefault(proposal.key, proposal)
        sol = solution or self.verdicts(list(props.values()))
        for js in sol.joint:
            if proposal.key in js.parts:
                others = [props[k] for k in js.parts if k != proposal.key]
                reason = _joint_reason(js.location, props, js.parts)
                joint = Proposal(proposal.group, proposal.changes, proposal.axes,
                                 proposal.scores, others, reason, pruner=self)
                if self.preflight().check(joint.removal()).ok:
                    return joint
                joint = self._snapped(joint)  # the same fraction everywhere, snapped
                if self.preflight().check(joint.removal()).ok:
                    return joint
        verdict = sol.unsafe.get(proposal.key)
        if verdict is None or proposal.joint or proposal.fallback:
            return None
        cut = self._outer_cut(self.preflight(), proposal.group, proposal.picks, verdict,
                              Removal())
        if cut is None:
            return None
        part, change = cut
        axis = next(a for (_g, a) in part.picks)
        scores = self.criterion.scores(self.model, self.coupling, proposal.group)[axis]
        return Proposal(proposal.group, [change], [axis], {axis: np.asarray(scores)},
                        reason=change.fallback, pruner=self)

    def _snapped(self, joint: Proposal) -> Proposal:
        """``joint`` with its primary counts moved to the common fraction of its parts."""
        parts = [joint.removal(), *(p.removal() for p in joint.partners)]
        first = self.common_fraction([merge(parts)])[0]
        changes = [replace(c, removed=first.picks.get((joint.group.id, a), c.removed),
                           width_after=c.width_before - len(first.picks.get(
                               (joint.group.id, a), c.removed)))
                   for a, c in zip(joint.axes, joint.changes, strict=True)]
        return replace(joint, changes=changes)

    def apply(self, removal: Removal, graph: Graph | None = None) -> Applied:
        """Apply ``removal`` now (no pre-flight: the caller ran one) and re-analyse.

        Args:
            removal: what to remove.
            graph: the pre-flight's trace of the pruned copy (`Verdict.graph`); when given
                the model is not traced again, only its coupling is recomputed.

        Raises:
            PruneError: the removal does not fit the model; nothing is changed.
        """
        self._check_finite()
        before = (self.graph, self.coupling, self.version, self._pending)
        note = self.config_note
        with transaction(self.model) as state:  # the config update and re-analysis too
            applied = self._apply(removal)
            self._update_config(StepReport(self.current_step), applied)
            self._analyse(graph if not applied.constants else None)
        self.applied.append(applied)
        self._before[id(applied)] = before
        self._settings[id(applied)] = state
        self._notes[id(applied)] = note
        return applied

    # -- steps ----------------------------------------------------------------------------
    def step(self, interactive: bool = False) -> StepReport:
        """Prune one step; the report says what was removed and why groups were skipped.

        ``interactive=True`` is a deprecated alias of `proposals()` (kept for old callers;
        it returns that iterator, not a report).
        """
        if interactive:
            warnings.warn("Pruner.step(interactive=True) is deprecated; use "
                          "Pruner.proposals()", DeprecationWarning, stacklevel=2)
            return self.proposals()  # type: ignore[return-value]
        self._check_finite()
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
        if self.global_pruning and changes:
            report.notes.append(_allocation_note(changes))
        if removal:
            note = self.config_note
            with transaction(self.model) as state:  # the config update too: all or nothing
                applied = self._apply(removal)
                self._update_config(report, applied)
            self.applied.append(applied)
            self._before[id(applied)] = (self.graph, self.coupling, self.version, self._pending)
            self._settings[id(applied)] = state
            self._notes[id(applied)] = note
            report.attributes = dict(applied.attributes)
        self.current_step += 1
        report.notes += [n for n in [*self.notes, *flight.notes] if n not in report.notes]
        self._finish(report, flight)
        return report

    def _apply(self, removal: Removal) -> Applied:
        if self.compensate is None:
            return apply_removal(self.model, self.coupling, removal)
        if self._calibration is None:
            self._calibration = load_calibration(self._calib_source, self.inputs)
        notes: list[str] = []
        applied = prune_and_compensate(self.model, self.coupling, removal, self._calibration,
                                       self.compensate, notes=notes)
        self.notes.extend(n for n in notes if n not in self.notes)
        return applied

    def _finish(self, report: StepReport, flight: Preflight) -> None:
        verdict = forward_check(self.model, self.inputs, flight.expected, flight.dynamic)
        report.forward_ok = verdict.graph is not None
        report.output_shape_ok = verdict.ok
        if verdict.graph is not None:
            self._analyse(verdict.graph)
        report.params_after = count_params(self.model)
        report.macs_after = count_macs(self.graph)

    def _update_config(self, report: StepReport, applied: Applied | None = None) -> None:
        """Keep a transformers ``config`` in line with uniform pruned widths.

        After a cut (``applied``), constants the config derives (the attention ``scaling``
        after a head-dim cut, an embedding scale after a residual cut) are set to the
        config's values and their ratios folded into the weights (`fixups.fold.fold_into`,
        checked by a forward, recorded in ``applied`` for undo and plans), so a model
        rebuilt from its config computes the same function. Where no config can describe
        the pruned model the report says so, and ``config_note`` keeps why.
        """
        if not hasattr(getattr(self.model, "config", None), "to_dict"):
            return
        from .fixups.hfconfig import update_config
        state = ModelState.capture(self.model)
        update = update_config(self.model)
        if not update.ok and applied is not None:
            update = self._fold_constants(update, applied, report)
        if state.settings_changed() and not forward_check(self.model, self.inputs, None).ok:
            state.restore_settings()  # module settings it followed broke the forward: undo
            self.config_note = ("the config was left as it was: the module settings it "
                                "would bring in line break the forward")
            return
        self.config_note = update.reason
        if update.reason:
            note = f"the transformers config cannot describe the pruned model: {update.reason}"
            if note not in report.notes:
                report.notes.append(note)
        report.config = {k: list(v) for k, v in update.changed.items()}

    def _fold_constants(self, update: ConfigUpdate, applied: Applied, report: StepReport
                        ) -> ConfigUpdate:
        """Fold the constants that alone keep the config from describing the model."""
        from .fixups.fold import fold_into, unfold
        from .fixups.hfconfig import differing_constants, update_config
        if any(p.device.type == "meta" for p in self.model.parameters()):
            return update  # no values to fold: its export or streamed replay folds them
        constants = differing_constants(self.model)
        if not constants:
            return update
        trial = ModelState.capture(self.model)  # would the constants alone do? (no trace)
        for (mod, attr), value in constants.items():
            setattr(self.model.get_submodule(mod), attr, value)
        enough = update_config(self.model)
        trial.restore_settings()
        if not enough.ok:
            return update
        fold, previous = fold_into(self.model, constants, self.inputs)
        if fold.reason:
            update.reason += f"; its constants were not folded into the weights: {fold.reason}"
            return update
        again = update_config(self.model)
        if not again.ok:
            unfold(self.model, fold, previous)
            update.reason = (f"{again.reason} (even with {', '.join(fold.constants)} folded "
                             f"into the weights)")
            return update
        for name, tensor in previous.items():
            applied.previous.setdefault(name, tensor)
        for key, pair in fold.constants.items():
            mod, _, attr = key.rpartition(".")
            applied.constants[(mod, attr)] = list(pair)
        report.notes.append(", ".join(f"{k} {v[0]:.6g} -> {v[1]:.6g}"
                                      for k, v in fold.constants.items())
                            + f" as the config derives them; the ratios are folded into "
                              f"{len(fold.scaled)} weights (same outputs)")
        return ConfigUpdate({**update.changed, **again.changed}, ok=True)

    def undo(self) -> Applied | None:
        """Revert the last application exactly (same tensors, same attributes)."""
        if not self.applied:
            return None
        last = self.applied.pop()
        undo(self.model, last)
        settings = self._settings.pop(id(last), None)
        if settings is not None:  # the config and module settings exactly as before it
            settings.restore_settings()
            self.config_note = self._notes.pop(id(last), self.config_note)
        else:
            self._update_config(StepReport(self.current_step))  # widths are back: so is config
        before = self._before.pop(id(last), None)
        if before is not None:  # the model is exactly as it was then
            self._restore(*before)
        else:
            self._analyse()
        return last

    def _restore(self, graph: Graph, coupling: Coupling, version: int,
                 pending: tuple[int, tuple[Any, ...], list[Proposal]] | None) -> None:
        """Take back the analysis of an earlier, identical model state (no re-trace): its
        version too, so caches keyed on it (proposals, verdicts) are valid again."""
        self.graph, self.coupling, self.groups = graph, coupling, coupling.groups
        self._prepared = False
        self._flight = None
        self.version = version
        self._pending = pending
        for p in pending[2] if pending else []:  # undecided again
            p.decided, p.applied, p.verdict = False, None, None

    def _drop_unsafe(self, flight: Preflight, removal: Removal, changes: list[GroupChange],
                     report: StepReport) -> tuple[Removal, list[GroupChange]]:
        """Keep the groups whose pruning runs (alone or as a joint set, `joint.solve`);
        name the others with module and line."""
        parts: dict[int, Removal] = {}
        for (g, a), idx in removal.picks.items():
            parts.setdefault(g, Removal()).add(g, a, idx)
        sol = solve(flight, dict(sorted(parts.items())), rescale=self.common_fraction)
        outer = self._outer_fallbacks(flight, sol, parts)
        for g, v in sol.unsafe.items():
            if g not in outer:
                report.unsafe.append(Unsafe(g, v.module, v.location, v.error))
        safe = set(sol.safe)
        kept = [c for c in changes if c.group in safe]
        for g, (part, change) in sorted(outer.items()):
            parts[g] = part
            safe.add(g)
            kept.append(change)
            report.notes.append(f"{change.title}: {change.fallback}")
        for c in kept:  # a joint set cut at a common fraction: report what is really removed
            if c.group in sol.rescaled:
                axis = next(a for (g, a) in removal.picks if g == c.group and
                            self.groups[g].axes[a].role == c.axis)
                c.removed = sol.rescaled[c.group].picks.get((c.group, axis), c.removed)
                c.width_after = c.width_before - len(c.removed)
        return merge(sol.rescaled.get(g, parts[g]) for g in sorted(safe)), kept

    def _outer_fallbacks(self, flight: Preflight, sol: Solution[int], parts: dict[int, Removal]
                         ) -> dict[int, tuple[Removal, GroupChange]]:
        """Groups whose innermost axis is unsafe, re-cut on an outer axis that runs
        (`_outer_cut`), each on top of the safe cuts so far."""
        found: dict[int, tuple[Removal, GroupChange]] = {}
        for gid, verdict in sorted(sol.unsafe.items()):
            picked = {a: idx for (g, a), idx in parts[gid].picks.items() if idx}
            base = merge([sol.removal(parts), *(p for p, _c in found.values())])
            cut = self._outer_cut(flight, self.groups[gid], picked, verdict, base)
            if cut is not None:
                found[gid] = cut
        return found

    def _outer_cut(self, flight: Preflight, group: Group, picked: dict[int, list[int]],
                   verdict: Verdict, base: Removal) -> tuple[Removal, GroupChange] | None:
        """``group`` re-cut on an outer channel axis that runs, when its inner cut does not.

        In an (outer x inner) layout the pruner cuts the inner axis (so widths shrink once).
        When model code fixes that inner width (``view(-1, self.conv.in_channels, 4, 4)``
        after a linear layer keeps the 4 x 4 block), whole blocks of ``inner`` channels may
        still go: the outer axes are tried, outermost first, on top of ``base``, at the
        fraction the inner cut had. Only channel and group axes are tried (heads stay the
        head mode's choice). None when no outer axis runs.
        """
        outer = [i for i, a in enumerate(group.axes) if a.prunable and not a.inner and
                 a.role in (AxisRole.CHANNELS, AxisRole.GROUPS) and i not in picked]
        if not picked or not outer:
            return None
        fraction = max(len(idx) / group.axes[a].size for a, idx in picked.items())
        scores = self.criterion.scores(self.model, self.coupling, group)
        for i in outer:
            ax = group.axes[i]
            n = ax.size - _kept(ax.size, fraction, self.round_to)
            if n <= 0:
                continue
            part = Removal()
            part.add(group.id, i, lowest(np.asarray(scores[i]), n))
            if not flight.check(merge([base, part])).ok:
                continue
            inner = ", ".join(f"{group.axes[a].size}" for a in picked)
            block = int(np.prod([a.size for a in group.axes[i + 1:]] or [1]))
            where = f"{verdict.location}: " if verdict.location else ""
            why = (f"its innermost axis ({inner}) fails when cut ({where}{verdict.error}); "
                   f"cut the outer {ax.role} axis of {ax.size} instead, whole blocks of "
                   f"{block} channels")
            idx = part.picks[(group.id, i)]
            return part, GroupChange(group.id, group.title, ax.role, idx, ax.size,
                                     ax.size - n, why, axis_layers(self.coupling, group)[i])
        return None


def _allocation_note(changes: list[GroupChange]) -> str:
    """What the global ranking gave each width: the spread of kept widths per original width
    (uniform widths are what a transformers config can describe)."""
    spans: dict[int, tuple[int, int, int]] = {}
    for c in changes:
        lo, hi, n = spans.get(c.width_before, (c.width_after, c.width_after, 0))
        spans[c.width_before] = (min(lo, c.width_after), max(hi, c.width_after), n + 1)
    parts = [f"{lo}-{hi} of {w} kept across {n} groups" if lo != hi else
             f"{lo} of {w} kept in all {n} groups" for w, (lo, hi, n) in sorted(spans.items())]
    uneven = any(lo != hi for lo, hi, _n in spans.values())
    return (f"global allocation: per-layer widths from scores normalised per group ("
            f"{'; '.join(parts)})" + ("; layers of one kind now differ in width, which a "
                                      "transformers config cannot describe (export pt or "
                                      "safetensors + plan; without --global every layer "
                                      "keeps the same width)" if uneven else ""))


def _joint_reason(location: str, props: dict[GroupKey, Proposal], keys: list[GroupKey]
                  ) -> str:
    """Why these groups must shrink together, quoting the model line when it is readable."""
    code = _source_line(location)
    names = " and ".join(props[k].group.title for k in keys)
    where = f"`{location}`" + (f" (`{code}`)" if code else "")
    return (f"{where} fails when any one of {names} is cut alone; cut together by the same "
            f"fraction the model runs, so they must shrink together")


def _source_line(location: str) -> str:
    """The text of ``file:line`` when the file is readable, else ""."""
    path, _, line = location.rpartition(":")
    if not path or not line.isdigit():
        return ""
    return linecache.getline(path, int(line)).strip()


__all__ = ["HEAD_MODES", "Candidate", "GroupChange", "Pruner", "Skip", "StepReport", "Unsafe"]
