"""The pruner: choose indices per group, pre-flight them, apply, and report each step.

The policy layer of `explorer.prune`, on top of the timeline: `choose.Chooser` (its base)
says what to cut and changes nothing; the pruner adds steps, one-group-at-a-time proposals
and the one accept path. The model, its analysis and every edit with its undo are the
timeline's (`history.History`); what was decided is `decisions.Decisions`'; the settings are
one `settings.Settings`.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from ..coupling.groups import GroupKey
from ..coupling.targets import parse_targets
from ..graph.ir import Graph
from ..graph.metrics import count_macs, count_params
from .calibration import Calibration
from .choose import Chooser
from .compensate import compensation, prune_and_compensate
from .counts import allocation_note
from .decisions import Decisions
from .history import Edit, History
from .importance import Criterion
from .joint import Solution, merge, solve
from .outer import advice, joint_reason
from .preflight import Preflight, Verdict, forward_check
from .proposal import Counts, Proposal
from .records import Candidate, GroupChange, Skip, StepReport, Unsafe, said_once
from .removal import Applied, PruneError, Removal, apply_removal
from .settings import HEAD_MODES, Settings, SettingsKey, head_mode
from .validate import check_module_names, nonfinite_text, nonfinite_weights


class Pruner(Chooser):
    """Structural pruner over the exact coupling groups of a traced model.

    Args:
        model: the model to prune in place.
        example_inputs: positional inputs for one forward.
        importance: criterion name (see `explorer.importance.CRITERIA`).
        ratio: fraction of each group's channels to remove by the last step.
        iterative_steps: number of `step()` calls to reach ``ratio``.
        global_pruning: rank channels of all groups together (scores normalised per axis)
            instead of cutting every group by ``ratio`` (``allocation="global"``).
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
        allocation: how widths are shared out across layers (`settings.ALLOCATIONS`):
            "uniform" (every axis loses ``ratio``: a transformers config describes the
            result), "global" (``global_pruning``), or "measured": per-axis depths from the
            change each axis' cut causes alone on the calibration data, with the parameter
            count of the uniform cut (`explorer.prune.measured`; about 3 forwards of 8
            samples per axis more).
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
                 targets: str | Sequence[str] | None = None, allocation: str = "uniform"
                 ) -> None:
        config = Settings(importance, ratio, head_mode(heads), global_pruning, round_to,
                          None if targets is None else parse_targets(targets),
                          iterative_steps, dict(ratios or {}), max_ratio, target_params,
                          target_macs, compensation(compensate), allocation)
        check_module_names(model, ignored, "ignored")
        if scores is not None and iterative_steps != 1:
            raise ValueError("scores given for the original weights rank one cut only; use "
                             "iterative_steps=1")
        self.ignored = list(ignored)
        # NaN/Inf weights: tracing and proposals still work, `step` and `apply` refuse
        self.nonfinite = nonfinite_weights(model)
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        super().__init__(History(model, inputs, ignored), config, scores, calibration)
        self.decisions = Decisions(self.history)
        # version -> (settings, proposals): kept for every state an undo can bring back
        self._pending: dict[int, tuple[SettingsKey, list[Proposal]]] = {}
        self._checked: tuple[tuple[Any, ...], Removal, StepReport] | None = None  # `checked`

    @property
    def applied(self) -> list[Applied]:
        """Every cut, in order (for plans)."""
        return self.history.applied

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

    def recut(self, apply: Callable[[nn.Module], Applied], what: str,
              keys: Sequence[GroupKey] = (), titles: Sequence[str] = (),
              lines: Sequence[dict[str, Any]] = ()) -> Applied:
        """Redo a recorded cut exactly (`history.History.recut`: no scoring, no pre-flight,
        the analysis when next read), deciding the groups ``keys`` as an accept does.

        Raises:
            PruneError: the weights are not finite. What ``apply`` raises: nothing changed.
        """
        self._check_finite()
        applied = self.history.recut(apply, what, keys, titles, lines)
        self._forget()
        return applied

    def _cut(self, removal: Removal) -> Applied:
        if self.compensate is None:
            self.drop_trajectory()  # recorded on the model before this cut: of no use after
            return apply_removal(self.model, self.coupling, removal)
        notes: list[str] = []
        try:
            applied = prune_and_compensate(self.model, self.coupling, removal, self._calib(),
                                           self.compensate, notes=notes,
                                           trajectory=self.trajectory)
        finally:  # recorded on the model before this cut: of no use after it
            self.drop_trajectory()
        self.notes[:] = said_once([*self.notes, *notes])
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
        flight = self.preflight()
        removal, checked = self.checked(ratio)
        report.skipped, report.changes, report.unsafe = (checked.skipped, checked.changes,
                                                         checked.unsafe)
        allocated = [allocation_note(report.changes, self.measured_note())] \
            if self.allocation != "uniform" and report.changes else []
        report.notes = said_once([*self.notes, *checked.notes, *allocated])
        if removal:
            applied = self.history.cut(removal, self._cut, report, analyse=False,
                                       what=f"step {report.step}")
            report.attributes = dict(applied.attributes)
        self.current_step += 1
        report.notes = said_once([*report.notes, *self.notes, *flight.notes])
        verdict = forward_check(self.model, self.inputs, flight.expected, flight.dynamic)
        report.forward_ok = verdict.graph is not None
        report.output_shape_ok = verdict.ok
        if verdict.graph is not None:
            self.history.analyse(verdict.graph)
        report.params_after = count_params(self.model)
        report.macs_after = count_macs(self.graph)
        self._forget()
        return report

    def checked(self, ratio: float | None = None) -> tuple[Removal, StepReport]:
        """What a step at ``ratio`` (None: the next step's) really cuts, nothing changed: the
        proposal once the pre-flight ran it on a weightless copy, without the groups that
        break the forward (the report's ``unsafe``, with module and line), joint sets at
        their common fraction, fallbacks to an outer axis (``notes``). Kept per model
        version, settings and ratio, so the statement said before a step and the step agree
        and the copies run once."""
        ratio = self._step_ratio() if ratio is None else ratio
        key = (self.version, self.settings(), self.allocation, id(self.criterion), ratio)
        if self._checked is None or self._checked[0] != key:
            removal, changes, skipped = self.propose(ratio)
            report = StepReport(self.current_step + 1, skipped=skipped)
            removal, report.changes = self._drop_unsafe(self.preflight(), removal, changes,
                                                        report)
            self._checked = (key, removal, report)
        return copy.deepcopy(self._checked[1]), copy.deepcopy(self._checked[2])

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
        report.unsafe += [Unsafe(g, v.module, v.location, v.error, advice(
            self.groups[g], {a: idx for (_g, a), idx in parts[g].picks.items()}))
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


__all__ = ["HEAD_MODES", "Candidate", "GroupChange", "Pruner", "Skip", "StepReport", "Unsafe"]
