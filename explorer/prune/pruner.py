"""The pruner: choose indices per group, pre-flight them, apply, and report each step.

The policy layer of `explorer.prune`: it chooses what to cut (scores, counts, targets, head
mode, safety). The model, its analysis and every edit with its undo are the timeline's
(`history.History`); what was decided is `decisions.Decisions`'; settings are one
`settings.Settings`.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Generic, TypeVar, cast

import numpy as np
from torch import nn

from ..coupling.analyze import Coupling
from ..coupling.groups import Group, GroupKey
from ..coupling.places import axis_layers
from ..coupling.targets import parse_targets, target_of
from ..coupling.vocab import Target
from ..graph.ir import Graph
from ..graph.metrics import count_macs, count_params
from .calibration import Calibration, load_calibration
from .compensate import Compensation, compensation, prune_and_compensate
from .counts import allocation_note, global_counts, kept, local_counts
from .decisions import Decisions
from .history import Edit, History
from .importance import Criterion, lowest, make
from .joint import Solution, merge, solve
from .outer import joint_reason, outer_cut
from .preflight import Preflight, Verdict, forward_check
from .proposal import Counts, Proposal
from .records import Candidate, GroupChange, Skip, StepReport, Unsafe
from .removal import Applied, PruneError, Removal, apply_removal, removed_atoms
from .settings import (
    HEAD_MODES,
    Settings,
    SettingsKey,
    head_mode,
    resolve_targets,
    target_axes,
    untargeted,
)
from .validate import check_module_names, nonfinite_text, nonfinite_weights

T = TypeVar("T")


class _Read(Generic[T]):
    """An attribute of the pruner read from its timeline or settings (``owner.name``);
    setting it on a pruner replaces that one setting (validated again)."""

    def __init__(self, owner: str, name: str) -> None:
        self.owner, self.name = owner, name

    def __get__(self, obj: object, objtype: type | None = None) -> T:
        return cast(T, getattr(getattr(obj, self.owner), self.name))

    def __set__(self, obj: Any, value: T) -> None:
        if self.owner != "config":
            raise AttributeError(f"{self.name} is the timeline's; it changes by edits only")
        obj.config = obj.config.but(**{self.name: value})


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

    The keyword arguments build one `settings.Settings` (``self.config``), validated there.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, importance: str = "magnitude",
                 ratio: float = 0.5, iterative_steps: int = 1, global_pruning: bool = False,
                 heads: str = "dims", round_to: int = 1, ignored: Sequence[str] = (),
                 calibration: Calibration | str | None = None,
                 ratios: Mapping[str, float] | None = None, max_ratio: float = 0.9,
                 target_params: float | None = None, target_macs: float | None = None,
                 compensate: str | None = None, scores: Criterion | None = None,
                 targets: str | Sequence[str] | None = None) -> None:
        self.config = Settings(importance, ratio, head_mode(heads), global_pruning, round_to,
                               None if targets is None else parse_targets(targets),
                               iterative_steps, dict(ratios or {}), max_ratio, target_params,
                               target_macs, compensation(compensate))
        check_module_names(model, ignored, "ignored")
        if scores is not None and iterative_steps != 1:
            raise ValueError("scores given for the original weights rank one cut only; use "
                             "iterative_steps=1")
        self.ignored = list(ignored)
        self.criterion: Criterion = make(importance) if scores is None else scores
        self._given_scores = scores is not None
        self.current_step = 0
        self.notes: list[str] = []  # caveats found while scoring (copied into step reports)
        self._calib_source = calibration
        self._calibration: Calibration | None = None
        self._prepared_at: int | None = None  # the version the criterion was prepared on
        self._flight: tuple[int, Preflight] | None = None
        # version -> (settings, proposals): kept for every state an undo can bring back
        self._pending: dict[int, tuple[SettingsKey, list[Proposal]]] = {}
        # NaN/Inf weights: tracing and proposals still work, `step` and `apply` refuse
        self.nonfinite = nonfinite_weights(model)
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        self.history = History(model, inputs, ignored)
        self.decisions = Decisions(self.history)
        self.targets = resolve_targets(self.config.targets, self.config.heads, self.graph,
                                       self.groups)
        self._original = {self._key(g, i): a.size for g in self.groups
                          for i, a in enumerate(g.axes)}
        self.params_original = count_params(model)
        self.macs_original = count_macs(self.graph)

    # -- the timeline and the settings, as attributes ----------------------------------------
    model = _Read[nn.Module]("history", "model")
    inputs = _Read[tuple[Any, ...]]("history", "inputs")
    graph = _Read[Graph]("history", "graph")
    coupling = _Read[Coupling]("history", "coupling")
    version = _Read[int]("history", "version")
    config_note = _Read[str]("history", "config_note")
    importance = _Read[str]("config", "importance")
    ratio = _Read[float]("config", "ratio")
    global_pruning = _Read[bool]("config", "global_pruning")
    round_to = _Read[int]("config", "round_to")
    steps = _Read[int]("config", "iterative_steps")
    ratios = _Read[dict[str, float]]("config", "ratios")
    max_ratio = _Read[float]("config", "max_ratio")
    target_params = _Read[float | None]("config", "target_params")
    target_macs = _Read[float | None]("config", "target_macs")
    compensate = _Read[Compensation | None]("config", "compensate")

    @property
    def heads(self) -> str:
        return self.config.heads.value

    @property
    def groups(self) -> list[Group]:
        return self.history.coupling.groups

    @property
    def applied(self) -> list[Applied]:
        """Every cut, in order (for plans)."""
        return self.history.applied

    @property
    def _prepared(self) -> bool:
        return self._prepared_at == self.version

    @_prepared.setter
    def _prepared(self, value: bool) -> None:
        self._prepared_at = self.version if value else None

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

    def configure(self, importance: str | None = None, ratio: float | None = None,
                  heads: str | None = None, global_pruning: bool | None = None,
                  round_to: int | None = None,
                  targets: str | Sequence[str] | None = None) -> None:
        """Change settings on the same traced model (None keeps a setting as it is).

        Raises:
            ValueError: a bad setting; the pruner is unchanged.
        """
        new = self.config.but(importance=importance,
                              ratio=None if ratio is None else float(ratio), heads=heads,
                              round_to=None if round_to is None else int(round_to),
                              global_pruning=global_pruning)
        asked = self.config.targets if targets is None else parse_targets(targets)
        if asked == self.targets and self.config.targets is None:
            asked = None  # the targets as they are (a page passes them back): still default
        self.targets = resolve_targets(asked, new.heads, self.graph, self.groups)
        if new.importance != self.importance or (self._given_scores and importance):
            self._given_scores = False
            self.criterion, self._prepared = make(new.importance), False
        self.config = replace(new, targets=asked)

    def settings(self) -> SettingsKey:
        """(importance, ratio, heads, global_pruning, round_to, targets)."""
        return self.config.key(self.targets)

    def preflight(self) -> Preflight:
        """The pre-flight runner for the model as it is now (kept until the next cut)."""
        if self._flight is None or self._flight[0] != self.version:
            self._flight = (self.version, Preflight(self.model, self.inputs, self.coupling))
        return self._flight[1]

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
            calib = self._calib()
        try:
            self.criterion.prepare(self.model, self.coupling, calib)
        except (RuntimeError, IndexError, TypeError) as e:  # a batch the forward rejects
            detail = " ".join(str(e).split())[:200]
            raise ValueError(f"importance '{self.importance}': the model failed on the "
                             f"calibration data ({type(e).__name__}: {detail}); give batches "
                             f"shaped like the example inputs") from e
        self._prepared = True

    def _calib(self) -> Calibration:
        if self._calibration is None:
            self._calibration = load_calibration(self._calib_source, self.inputs)
        return self._calibration

    @staticmethod
    def _key(group: Group, axis: int) -> tuple[str, int, int, int, str]:
        return (*group.key, axis, group.axes[axis].role)

    # -- targets -------------------------------------------------------------------------
    def target_axes(self, group: Group) -> list[int]:
        """The axes of ``group`` the targets and head mode let the pruner cut."""
        return target_axes(group, self.targets, self.config.heads)

    @property
    def targets_default(self) -> bool:
        """Whether the targets are the model's default (none were asked for)."""
        return self.config.targets is None

    def untargeted(self, target: Target) -> str:
        """Why groups of ``target`` are left alone (it is not among the targets)."""
        return untargeted(target, self.targets, self.targets_default, self.config.heads,
                          self.graph)

    def could_propose(self, group: Group) -> bool:
        """Whether `pending` may hold a proposal for ``group``: it is prunable and the head
        mode leaves it an axis to cut (`candidates` skips the others)."""
        return group.prunable and bool(self.target_axes(group))

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
        c = self.config
        counts = (global_counts(cands, ratio, c.max_ratio, c.round_to) if c.global_pruning
                  else local_counts(cands, ratio, c.ratios, c.max_ratio, c.round_to))
        removal, changes = Removal(), []
        places: dict[int, dict[int, str]] = {}
        for cand, n in zip(cands, counts, strict=False):
            ax = cand.group.axes[cand.axis]
            if n <= 0:
                why = "at its minimum width" if ax.size <= 1 else "already at the target width"
                skipped.append(Skip(cand.group.id, cand.group.title, f"{ax.role}: {why}"))
                continue
            idx = lowest(cand.scores, n)
            removal.add(cand.group.id, cand.axis, idx)
            if cand.group.id not in places:
                places[cand.group.id] = axis_layers(self.coupling, cand.group)
            changes.append(GroupChange(cand.group.id, cand.group.title, ax.role, idx, ax.size,
                                       ax.size - n, where=places[cand.group.id][cand.axis]))
        return removal, changes, skipped

    def _step_ratio(self) -> float:
        return self.ratio * min(self.current_step + 1, self.steps) / self.steps

    def plan_ratio(self) -> float:
        """The ratio a full prune uses: ``ratio``, or the one searched to meet
        ``target_params`` / ``target_macs``."""
        return self._ratio_for_target() if self.config.targeted else self.ratio

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
        cached = self._pending.get(self.version)
        if cached is None or cached[0] != self.settings():
            cands, skipped = self.candidates()  # scored once: the picks and the charts
            removal, changes, _skipped = self._propose(cands, skipped, self._step_ratio())
            scores = {(c.group.id, c.axis): c.scores for c in cands}
            by_group: dict[int, list[tuple[int, GroupChange]]] = {}
            for (gid, axis), change in zip(removal.picks, changes, strict=True):
                by_group.setdefault(gid, []).append((axis, change))
            out = [Proposal(self.groups[gid], [c for _a, c in picks], [a for a, _c in picks],
                            {a: np.asarray(scores[(gid, a)]) for a, _c in picks}, pruner=self,
                            version=self.version)
                   for gid, picks in by_group.items()]
            cached = self._pending[self.version] = (self.settings(), out)
        return list(cached[1])

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
                n = size - kept(size, fraction, self.round_to)
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
                joint = replace(proposal, partners=others,
                                reason=joint_reason(js.location, props, js.parts))
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
                        reason=change.fallback, pruner=self, version=self.version)

    def _snapped(self, joint: Proposal) -> Proposal:
        """``joint`` with its primary counts moved to the common fraction of its parts."""
        parts = [joint.removal(), *(p.removal() for p in joint.partners)]
        first = self.common_fraction([merge(parts)])[0]
        changes = [replace(c, removed=first.picks.get((joint.group.id, a), c.removed),
                           width_after=c.width_before - len(first.picks.get(
                               (joint.group.id, a), c.removed)))
                   for a, c in zip(joint.axes, joint.changes, strict=True)]
        return replace(joint, changes=changes)

    # -- deciding and applying: the one path ----------------------------------------------
    def accept(self, proposal: Proposal,
               indices: dict[int, list[int]] | list[int] | None = None,
               count: int | Counts | None = None, verdict: Verdict | None = None) -> Verdict:
        """Accept ``proposal`` as proposed, with other indices, or with other counts.

        Args:
            verdict: a passing pre-flight of this removal already made (its trace of the
                pruned copy is then reused); None: pre-flight it here.

        Returns the pre-flight verdict; when it is not ok nothing is changed.

        Raises:
            RuntimeError: the proposal was already accepted or rejected.
            PruneError: the removal does not fit the model; nothing is changed.
        """
        if proposal.decided:
            raise RuntimeError("this proposal was already accepted or rejected")
        removal = proposal.chosen(indices, count)
        graph = verdict.graph if verdict is not None else None
        verdict = verdict if verdict is not None else self.preflight().check(removal)
        if verdict.ok:
            self.apply(removal, graph, [proposal], count)
        return verdict

    def reject(self, proposal: Proposal) -> None:
        """Leave ``proposal``'s groups as they are (not proposed again until undone)."""
        self.decisions.reject(self.version if proposal.pruner is None else proposal.version,
                              proposal.keys, f"rejected {proposal.title}")

    def apply(self, removal: Removal, graph: Graph | None = None,
              accepted: Sequence[Proposal] = (), count: int | Counts | None = None
              ) -> Applied:
        """Apply ``removal`` now (no pre-flight: the caller ran one) and re-analyse.

        Args:
            removal: what to remove.
            graph: the pre-flight's trace of the pruned copy (`Verdict.graph`); when given
                the model is not traced again, only its coupling is recomputed.
            accepted: the proposals it accepts (decided by this edit, with ``count``).

        Raises:
            PruneError: the removal does not fit the model; nothing is changed.
        """
        self._check_finite()
        title = "; ".join(p.title for p in accepted)
        applied = self.history.cut(removal, self._cut, StepReport(self.current_step),
                                   what=f"accepted {title}", graph=graph,
                                   keys=[k for p in accepted for k in p.keys],
                                   titles=[q.group.title for p in accepted
                                           for q in [p, *p.partners]])
        lines = [line for p in accepted for line in p.lines(removal, count, applied.attributes)]
        self.history.edits[-1].report.extend(lines)
        self._forget()
        return applied

    def _cut(self, removal: Removal) -> Applied:
        if self.compensate is None:
            return apply_removal(self.model, self.coupling, removal)
        notes: list[str] = []
        applied = prune_and_compensate(self.model, self.coupling, removal, self._calib(),
                                       self.compensate, notes=notes)
        self.notes.extend(n for n in notes if n not in self.notes)
        return applied

    def undo(self) -> Applied | None:
        """Revert the last edit exactly (same tensors, same attributes, same analysis)."""
        edit: Edit | None = self.history.undo()
        self.decisions.trim()
        self._forget()
        return None if edit is None else edit.applied

    def undo_decision(self) -> str | None:
        """Take back the last decision, a reject or an edit (`decisions.Decisions.undo`);
        what it was, or None when there is none."""
        what = self.decisions.undo()
        self._forget()
        return what

    def _forget(self) -> None:
        """Drop proposals of model states no undo can bring back."""
        live = self.history.live_versions()
        self._pending = {v: p for v, p in self._pending.items() if v in live}

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
        ratio = self._ratio_for_target() if self.config.targeted else None
        removal, changes, skipped = self.propose(ratio)
        report.skipped = skipped
        report.notes = list(dict.fromkeys(self.notes))
        flight = Preflight(self.model, self.inputs, self.coupling)
        removal, changes = self._drop_unsafe(flight, removal, changes, report)
        report.changes = changes
        if self.global_pruning and changes:
            report.notes.append(allocation_note(changes))
        if removal:
            applied = self.history.cut(removal, self._cut, report, analyse=False,
                                       what=f"step {report.step}")
            report.attributes = dict(applied.attributes)
        self.current_step += 1
        report.notes += [n for n in [*self.notes, *flight.notes] if n not in report.notes]
        verdict = forward_check(self.model, self.inputs, flight.expected, flight.dynamic)
        report.forward_ok = verdict.graph is not None
        report.output_shape_ok = verdict.ok
        if verdict.graph is not None:
            self.history.analyse(verdict.graph)
        report.params_after = count_params(self.model)
        report.macs_after = count_macs(self.graph)
        self._forget()
        return report

    def _drop_unsafe(self, flight: Preflight, removal: Removal, changes: list[GroupChange],
                     report: StepReport) -> tuple[Removal, list[GroupChange]]:
        """Keep the groups whose pruning runs (alone or as a joint set, `joint.solve`);
        name the others with module and line."""
        parts: dict[int, Removal] = {}
        for (g, a), idx in removal.picks.items():
            parts.setdefault(g, Removal()).add(g, a, idx)
        sol = solve(flight, dict(sorted(parts.items())), rescale=self.common_fraction)
        outer: dict[int, tuple[Removal, GroupChange]] = {}
        for gid, verdict in sorted(sol.unsafe.items()):  # re-cut on an outer axis that runs
            picked = {a: idx for (g, a), idx in parts[gid].picks.items() if idx}
            base = merge([sol.removal(parts), *(p for p, _c in outer.values())])
            cut = self._outer_cut(flight, self.groups[gid], picked, verdict, base)
            if cut is not None:
                outer[gid] = cut
        report.unsafe += [Unsafe(g, v.module, v.location, v.error)
                          for g, v in sol.unsafe.items() if g not in outer]
        safe = set(sol.safe)
        kept_changes = [c for c in changes if c.group in safe]
        for g, (part, change) in sorted(outer.items()):
            parts[g] = part
            safe.add(g)
            kept_changes.append(change)
            report.notes.append(f"{change.title}: {change.fallback}")
        for c in kept_changes:  # a joint set cut at a common fraction: what is really removed
            if c.group in sol.rescaled:
                axis = next(a for (g, a) in removal.picks if g == c.group and
                            self.groups[g].axes[a].role == c.axis)
                c.removed = sol.rescaled[c.group].picks.get((c.group, axis), c.removed)
                c.width_after = c.width_before - len(c.removed)
        return merge(sol.rescaled.get(g, parts[g]) for g in sorted(safe)), kept_changes

    def _outer_cut(self, flight: Preflight, group: Group, picked: dict[int, list[int]],
                   verdict: Verdict, base: Removal) -> tuple[Removal, GroupChange] | None:
        """`outer.outer_cut` with this pruner's scores and rounding."""
        return outer_cut(flight, self.coupling, group,
                         lambda: self.criterion.scores(self.model, self.coupling, group),
                         picked, verdict, base, self.round_to)


__all__ = ["HEAD_MODES", "Candidate", "GroupChange", "Pruner", "Skip", "StepReport", "Unsafe"]
