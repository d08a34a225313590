"""The timeline of edits to one model: what was done to it, in order, and its exact undo.

A `History` owns the model being pruned, its current analysis (traced `Graph`, `Coupling`,
and a ``version`` naming the model state) and a typed list of `Edit`s: a channel cut, a
block removal, a plan replay. Every edit goes through one path (`_commit`): the analysis,
module settings and config before it are kept, the change runs all or nothing, a
transformers config follows the new widths, and the model is analysed again. One `undo`
takes back any kind exactly (the same tensor objects, settings, config and analysis, so
caches keyed on ``version`` are valid again). Plans are made from it
(`explorer.io.plan.Plan.from_history`).

The layer inside `explorer.prune`: mechanism (`removal`, `depth`, `fixups`, `transaction`)
-> this timeline -> policy (`pruner`: what to cut). The timeline never chooses a cut.
"""
from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..coupling.analyze import Coupling
from ..coupling.groups import GroupKey
from ..graph.ir import Graph
from ..graph.tracer import trace
from .depth import BlockRemoval, remove_blocks_recorded, restore_blocks
from .fixups.configs import rejoin
from .fixups.hfconfig import ConfigUpdate, cannot_describe
from .preflight import forward_check
from .records import StepReport, said_once
from .removal import Applied, Removal, undo
from .transaction import ModelState, transaction


class EditKind(enum.Enum):
    """What one edit did to the model."""

    CUT = "cut"  # channels, heads or head dims removed (an `Applied`)
    BLOCKS = "blocks"  # residual blocks replaced by identity (a `BlockRemoval`)
    PLAN = "plan"  # a saved plan replayed (its record is the plan itself)


@dataclass
class Analysis:
    """The model's analysis at one state: what a cut is chosen and checked against.

    A cut redone from a record (`History.recut`) leaves graph and coupling None: the timeline
    traces that state when it is first read as the current one (a saved session's replay
    analyses only the state it ends in)."""

    graph: Graph | None
    coupling: Coupling | None
    version: int  # names the model state; caches of proposals and verdicts key on it


@dataclass
class Edit:
    """One change to the model, with everything its exact undo needs."""

    kind: EditKind
    what: str  # in words, for an undo list ("accepted ...", "removed block ...")
    before: Analysis  # the analysis before it (put back by undo: no re-trace)
    # module settings and config before it; None: undo re-derives the config from shapes
    state: ModelState | None
    note: str  # the config note before it
    applied: Applied  # a cut: what it changed; a plan: the tensors and attributes before it
    blocks: BlockRemoval = field(default_factory=lambda: BlockRemoval({}, {}))
    keys: list[GroupKey] = field(default_factory=list)  # the groups an accept decided
    titles: list[str] = field(default_factory=list)  # their titles (plan metadata)
    report: list[dict[str, Any]] = field(default_factory=list)  # JSON-ready, for a report


class Replayed(Protocol):
    """What a plan replay changed (`explorer.io.plan.Replay`), as its undo needs it."""

    @property
    def attributes(self) -> dict[str, dict[str, list[Any]]]: ...

    @property
    def constants(self) -> dict[tuple[str, str], list[float]]: ...

    @property
    def blocks(self) -> dict[str, nn.Module]: ...

    @property
    def configs(self) -> dict[str, Any]: ...


class History:
    """The timeline of one model: its current analysis and the edits made to it.

    Args:
        model: the model, changed in place by the edits.
        inputs: positional inputs for one forward (a tuple).
        ignored: module names whose outputs are never cut (passed to `Coupling`).
    """

    def __init__(self, model: nn.Module, inputs: tuple[Any, ...], ignored: Sequence[str] = ()
                 ) -> None:
        self.model = model
        self.inputs = inputs
        self.ignored = list(ignored)
        self.edits: list[Edit] = []
        self.config_note = ""  # why a transformers config could not follow, if it could not
        self._versions = itertools.count(1)
        self._unsettled = False  # cuts were redone without the config following (`settle`)
        self.now = self._analysis()

    # ------------------------------------------------------------------ reading
    @property
    def graph(self) -> Graph:
        return self._analysed()[0]

    @property
    def coupling(self) -> Coupling:
        return self._analysed()[1]

    def _analysed(self) -> tuple[Graph, Coupling]:
        """The current analysis, traced now if a redone cut left it for later."""
        now = self.now
        if now.graph is None or now.coupling is None:
            graph = trace(self.model, self.inputs)
            now.graph, now.coupling = graph, Coupling(graph, ignored=self.ignored)
        return now.graph, now.coupling

    @property
    def version(self) -> int:
        return self.now.version

    @property
    def applied(self) -> list[Applied]:
        """Every cut, in order."""
        return [e.applied for e in self.edits if e.kind is EditKind.CUT]

    @property
    def replayed(self) -> bool:
        """Whether a plan was replayed: that plan is the record (no plan is made from here)."""
        return any(e.kind is EditKind.PLAN for e in self.edits)

    def live_versions(self) -> set[int]:
        """The versions an undo can bring back, and the current one."""
        return {self.version, *(e.before.version for e in self.edits)}

    # ------------------------------------------------------------------ the analysis
    def _analysis(self, graph: Graph | None = None) -> Analysis:
        graph = graph if graph is not None else trace(self.model, self.inputs)
        return Analysis(graph, Coupling(graph, ignored=self.ignored), next(self._versions))

    def analyse(self, graph: Graph | None = None) -> None:
        """Analyse the model as it is now (``graph``: a trace of it already made)."""
        self.now = self._analysis(graph)

    # ------------------------------------------------------------------ edits
    @contextmanager
    def _commit(self, kind: EditKind, what: str) -> Iterator[Edit]:
        """The one path every edit takes: the body changes the model (filling the yielded
        `Edit`) inside a transaction; on success the edit is recorded, on failure the
        model, its analysis and the config note are as they were. A cut redone before it
        is settled first (its config follows), so every state an undo puts back, and every
        record, is the one the live edits made."""
        self.settle()
        edit = Edit(kind, what, self.now, None, self.config_note, Applied({}, {}, {}))
        try:
            with transaction(self.model) as captured:
                yield edit
        except BaseException:
            self.now, self.config_note = edit.before, edit.note
            raise
        edit.state = captured
        self.edits.append(edit)

    def cut(self, removal: Removal, apply: Callable[[Removal], Applied], report: StepReport,
            *, what: str = "", graph: Graph | None = None, analyse: bool = True,
            keys: Sequence[GroupKey] = (), titles: Sequence[str] = ()) -> Applied:
        """Cut ``removal`` with ``apply`` (a plain removal or one with compensation), bring
        a transformers config in line (folding the constants it derives, noted in
        ``report``) and analyse again (from ``graph``, a trace of the result already made,
        unless constants were folded; ``analyse=False`` leaves it to the caller).

        Raises:
            PruneError: the removal does not fit the model; nothing is changed.
        """
        with self._commit(EditKind.CUT, what) as edit:
            edit.applied = apply(removal)
            self.follow_config(report, edit.applied)
            if analyse:
                self.analyse(graph if not edit.applied.constants else None)
            edit.keys, edit.titles = list(keys), list(titles)
        return edit.applied

    def recut(self, apply: Callable[[nn.Module], Applied], what: str,
              keys: Sequence[GroupKey] = (), titles: Sequence[str] = (),
              lines: Sequence[dict[str, Any]] = ()) -> Applied:
        """Redo a cut recorded earlier with ``apply`` (exact indices and attributes, e.g. a
        saved session's accept: `explorer.io.plan.redo_step`), as one edit.

        Nothing is analysed: the model is traced when its analysis is next read, so a replay
        of many recorded cuts costs one analysis. The config follows at the next edit or
        `settle` (as after each live cut: where it follows depends on the states before).
        Its undo re-derives the config.

        Raises:
            Whatever ``apply`` raises (it changes nothing then); nothing is changed.
        """
        with self._commit(EditKind.CUT, what) as edit:
            edit.applied = apply(self.model)
            edit.keys, edit.titles, edit.report = list(keys), list(titles), list(lines)
            self.now = Analysis(None, None, next(self._versions))
        edit.state = None  # the config was not in line with this cut: undo re-derives it
        self._unsettled = True
        return edit.applied

    def settle(self) -> None:
        """Bring the config in line after cuts redone by `recut` (a no-op otherwise)."""
        if self._unsettled:
            self._unsettled = False
            self.follow_config(StepReport(0))

    def remove_blocks(self, tuple_output: dict[str, bool], what: str,
                      lines: Sequence[dict[str, Any]] = ()) -> BlockRemoval:
        """Replace the named residual blocks by identity (``tuple_output``: whether each
        returns a 1-tuple); the config follows and the model is analysed again."""
        with self._commit(EditKind.BLOCKS, what) as edit:
            edit.blocks = remove_blocks_recorded(self.model, tuple_output)
            self.follow_config(StepReport(0))
            self.analyse()
            edit.report = list(lines)
        return edit.blocks

    def replay(self, run: Callable[[nn.Module], Replayed], what: str,
               lines: Sequence[dict[str, Any]] = ()) -> Replayed:
        """Record ``run`` (a plan replay, all or nothing itself) as one edit."""
        previous = _tensors(self.model)
        with self._commit(EditKind.PLAN, what) as edit:
            done = run(self.model)
            edit.applied = Applied({}, done.attributes, {}, dict(previous),
                                   constants=dict(done.constants), configs=dict(done.configs))
            edit.blocks = BlockRemoval({}, {}, dict(done.blocks))
            self.follow_config(StepReport(0))
            self.analyse()
            edit.report = list(lines)
        return done

    def undo(self) -> Edit | None:
        """Take back the last edit exactly (tensors, blocks, settings, config, analysis)."""
        if not self.edits:
            return None
        self._unsettled = False  # the undone state's config is put back or re-derived below
        last = self.edits.pop()
        restore_blocks(self.model, last.blocks)
        undo(self.model, last.applied)
        if last.state is not None:  # the config and module settings exactly as before it
            last.state.restore_settings()
            self.config_note = last.note
        else:
            self.follow_config(StepReport(0))  # widths are back: so is the config
        self.now = last.before
        return last

    # ------------------------------------------------------------------ the config
    def follow_config(self, report: StepReport, applied: Applied | None = None) -> None:
        """Keep a transformers ``config`` in line with uniform pruned widths.

        After a cut (``applied``), constants the config derives (the attention ``scaling``
        after a head-dim cut, an embedding scale after a residual cut) are set to the
        config's values and their ratios folded into the weights (`fixups.fold.fold_into`,
        checked by a forward, recorded in ``applied`` for undo and plans), so a model
        rebuilt from its config computes the same function; modules a cut gave their own
        config copy are pointed back at the model's config where it now says the same
        (`fixups.configs.rejoin`, recorded in ``applied`` for undo). Where no config can
        describe the pruned model the report says so, and ``config_note`` keeps why.
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
        if applied is not None:
            for name, held in rejoin(self.model).items():
                applied.configs.setdefault(name, held)
        if update.reason:
            report.notes = said_once([*report.notes, cannot_describe(update.reason)])
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


def _tensors(model: nn.Module) -> dict[str, torch.Tensor | None]:
    out: dict[str, torch.Tensor | None] = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


__all__ = ["Analysis", "Edit", "EditKind", "History", "Replayed"]
