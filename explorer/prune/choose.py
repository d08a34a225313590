"""What to cut, read only: the pruner's settings, scores, targets, counts and budgets.

`Chooser` is the policy half of `explorer.prune.pruner.Pruner` that changes nothing: it reads
the model and its analysis from the timeline (`history.History`), scores the groups its
targets and head mode leave, and says which indices a cut at a ratio removes (`propose`),
what that leaves (`predict_params`), and how a failing cut can shrink (`common_fraction`,
`outer.outer_cut`). The pruner adds the steps, proposals and decisions that edit the model.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Generic, TypeVar, cast

import numpy as np
from torch import nn

from ..coupling.analyze import Coupling
from ..coupling.groups import Group
from ..coupling.heads import head_dim_ties
from ..coupling.places import axis_layers
from ..coupling.targets import parse_targets, target_of
from ..coupling.vocab import Target
from ..graph.ir import Graph
from ..graph.metrics import count_macs, count_params
from .calibration import Calibration, load_calibration
from .compensate import Compensation
from .counts import global_counts, kept, local_counts, tie_head_dims
from .history import History
from .importance import Criterion, lowest, make
from .measured import Measured, measured
from .outer import outer_cut
from .preflight import Preflight, Verdict
from .reconstruct import in_order
from .records import Candidate, GroupChange, Skip
from .removal import Removal, removed_atoms
from .settings import Settings, SettingsKey, resolve_targets, target_axes, untargeted
from .trajectory import Trajectory

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

class Chooser:
    """Chooses what to cut on the model a timeline holds (see `explorer.prune.pruner.Pruner`
    for the settings; ``config`` holds them).

    Args:
        history: the timeline of the model (its analysis is read, never changed here).
        config: the settings.
        scores: a criterion prepared elsewhere on the original weights (used instead of
            preparing the one ``config.importance`` names).
        calibration: data for data-aware criteria, or where to read it (random when None).
    """

    def __init__(self, history: History, config: Settings, scores: Criterion | None,
                 calibration: Calibration | str | None) -> None:
        self.history = history
        self.config = config
        self.criterion: Criterion = make(config.importance) if scores is None else scores
        self._given_scores = scores is not None
        self.current_step = 0
        self.notes: list[str] = []  # caveats found while scoring (copied into step reports)
        self._calib_source = calibration
        self._calibration: Calibration | None = None
        self._prepared_at: int | None = None  # the version the criterion was prepared on
        # False: after a cut, a criterion that can carries its statistics through it
        # (`Criterion.follow`: no calibration pass); the app's sessions set it
        self.remeasure = True
        self._flight: tuple[int, Preflight] | None = None
        self._scored: tuple[tuple[Any, ...], list[Candidate], list[Skip]] | None = None
        self._ties: tuple[int, dict[int, dict[int, dict[int, int]]]] | None = None
        self._measured: tuple[tuple[Any, ...], Measured] | None = None
        # the scoring pass's block outputs, when a refit will run the same batches
        # (`explorer.prune.trajectory`; dropped at the next cut or scoring)
        self.trajectory: Trajectory | None = None
        self.targets = resolve_targets(config.targets, config.heads, self.graph, self.groups)
        self._original = {self._key(g, i): a.size for g in self.groups
                          for i, a in enumerate(g.axes)}
        self.params_original = count_params(self.model)
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
    allocation = _Read[str]("config", "allocation")
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
    def _prepared(self) -> bool:
        return self._prepared_at == self.version

    @_prepared.setter
    def _prepared(self, value: bool) -> None:
        self._prepared_at = self.version if value else None

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
            if self.history.applied:
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
        if self.criterion.needs_data and not self.remeasure and self._prepared_at is not None \
                and self.criterion.follow(self.model, self.history.applied):
            self._prepared = True
            return
        if self.criterion.needs_data:
            calib = self._calib()
        self.drop_trajectory()
        trajectory: Trajectory | None = None
        if calib is not None and self.compensate is Compensation.LSTSQ and \
                self.criterion.one_pass:  # the refit will run these batches again: keep them
            calib, trajectory = in_order(calib), Trajectory(self.model)
        try:
            with trajectory.recording(calib) if trajectory is not None and calib is not None \
                    else contextlib.nullcontext():
                self.criterion.prepare(self.model, self.coupling, calib)
        except (RuntimeError, IndexError, TypeError) as e:  # a batch the forward rejects
            if trajectory is not None:
                trajectory.close()
            detail = " ".join(str(e).split())[:200]
            raise ValueError(f"importance '{self.importance}': the model failed on the "
                             f"calibration data ({type(e).__name__}: {detail}); give batches "
                             f"shaped like the example inputs") from e
        except BaseException:
            if trajectory is not None:
                trajectory.close()
            raise
        if trajectory is not None and trajectory.complete:
            self.trajectory = trajectory
        self._prepared = True

    def drop_trajectory(self) -> None:
        """Forget the recorded original stream (`explorer.prune.trajectory`): its files go."""
        if self.trajectory is not None:
            self.trajectory.close()
        self.trajectory = None

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
        """Every prunable axis with its scores, and why the other groups are skipped (scored
        once per model version, settings and criterion: proposals, the statement of what the
        settings cut and a joint set's common fraction read the same scores)."""
        key = (self.version, self.settings(), id(self.criterion))
        if self._scored is None or self._scored[0] != key:
            self._scored = (key, *self._score())
        return list(self._scored[1]), list(self._scored[2])

    def _score(self) -> tuple[list[Candidate], list[Skip]]:
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
    def propose(self, ratio: float | None = None, measure: bool = True
                ) -> tuple[Removal, list[GroupChange], list[Skip]]:
        """Indices the next step would remove (lowest importance first); ``measure=False``:
        the uniform counts where the allocation is measured (no trial cuts)."""
        if ratio is None:
            ratio = self._step_ratio()
        cands, skipped = self.candidates()
        return self._propose(cands, skipped, ratio, measure)

    def _propose(self, cands: list[Candidate], skipped: list[Skip], ratio: float,
                 measure: bool = True) -> tuple[Removal, list[GroupChange], list[Skip]]:
        """`propose` over candidates already scored (``skipped`` is extended)."""
        c = self.config
        counts = (global_counts(cands, ratio, c.max_ratio, c.round_to) if c.global_pruning
                  else local_counts(cands, ratio, c.ratios, c.max_ratio, c.round_to))
        counts = tie_head_dims(cands, counts, self._head_dim_ties())
        if c.allocation == "measured" and measure and any(counts):
            counts = self._measured_counts(cands, counts, ratio)
            counts = tie_head_dims(cands, counts, self._head_dim_ties())
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

    def _head_dim_ties(self) -> dict[int, dict[int, dict[int, int]]]:
        """Group id -> `head_dim_ties` of its head groups (read once per model version)."""
        if self._ties is None or self._ties[0] != self.version:
            self._ties = (self.version, {g.id: t for g in self.groups if g.heads is not None
                                         and (t := head_dim_ties(self.coupling, g))})
        return self._ties[1]

    def _measured_counts(self, cands: list[Candidate], uniform: list[int], ratio: float
                         ) -> list[int]:
        """The measured allocation's counts (`explorer.prune.measured`), once per model
        version, settings, criterion and ratio: trial cuts, each undone exactly."""
        key = (self.version, self.settings(), id(self.criterion), ratio)
        if any(p.device.type == "meta" for p in self.model.parameters()):
            raise ValueError("allocation 'measured' cuts each layer and measures the outputs, "
                             "but the model is on the meta device (no weights); load the "
                             "model on cpu, or choose allocation 'uniform' or 'global'")
        if self._measured is None or self._measured[0] != key:
            found = measured(self.model, self.coupling, cands, uniform, self._calib(),
                             self.max_ratio)
            self._measured = (key, found)
        counts = list(self._measured[1].counts)
        if self.round_to > 1:  # each kept width rounded up to a multiple
            for k, cand in enumerate(cands):
                size = cand.group.axes[cand.axis].size
                counts[k] = size - min(size, int(math.ceil((size - counts[k]) / self.round_to)
                                                 * self.round_to))
        return counts

    def measured_result(self) -> Measured | None:
        """The last measured allocation (its curves and counts, in `candidates` order), or
        None when none was measured."""
        return self._measured[1] if self._measured is not None else None

    def measured_note(self) -> str:
        """What the last measured allocation chose and what uniform widths would cost ("" if
        none was measured)."""
        return self._measured[1].note() if self._measured is not None else ""

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
            removal, _c, _s = self.propose(mid, measure=False)  # a measured cut: same params
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

    def _outer_cut(self, flight: Preflight, group: Group, picked: dict[int, list[int]],
                   verdict: Verdict, base: Removal) -> tuple[Removal, GroupChange] | None:
        """`outer.outer_cut` with this pruner's scores and rounding."""
        return outer_cut(flight, self.coupling, group,
                         lambda: self.criterion.scores(self.model, self.coupling, group),
                         picked, verdict, base, self.round_to)


__all__ = ["Chooser"]
