"""The interactive pruning session behind the app: propose, accept, reject, undo.

Streamlit-free on purpose (the app's pages only draw it), so every transition is unit-tested
without a browser. A session owns a private copy of the model; the pristine model it was
made from is never touched.

The session is a coordinator: proposals, pre-flight, joint sets, application and exact undo
are the `Pruner`'s (`explorer.prune`), plans are `explorer.io.plan`'s and exports
`explorer.io.export`'s. It adds what a person deciding one group at a time needs: which
groups are decided, an undo stack over accepts, rejects, block removals and plan replays, a
log for the report, and one `Message` after each action.
"""
from __future__ import annotations

import enum
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import ModelGraph
from ..coupling.groups import GroupKey
from ..graph.metrics import count_macs, count_params
from ..graph.walk import to_device
from ..io.plan import Plan, PlanError
from ..io.specs import SentenceFolder
from ..prune.calibration import Calibration
from ..prune.decisions import Decision
from ..prune.depth import remove_blocks
from ..prune.joint import Solution, solve
from ..prune.preflight import Verdict, clone_model, forward_check, meta_copy
from ..prune.proposal import Counts, Proposal
from ..prune.pruner import Pruner
from ..prune.removal import Applied, PruneError, Removal
from ..prune.sensitivity import Progress, SensitivityRow, scan
from ..prune.statement import Statement, statement
from ..quality.evaluate import Quality
from ..quality.generate import DEFAULT_NEW_TOKENS, Continuation
from ..quality.task import Task
from .actions import (
    Accept,
    AcceptAll,
    Action,
    Block,
    Configure,
    PlanReplay,
    Reject,
    Undo,
    to_json,
)
from .actions import parse as parse_action
from .actions import problem as action_problem
from .measures import Measures


class MessageKind(str, enum.Enum):
    """How the app shows a `Message`."""

    SUCCESS = "success"
    ERROR = "error"
    INFO = "info"


@dataclass
class Message:
    """Feedback for the user after an action."""

    kind: MessageKind
    text: str

    @classmethod
    def success(cls, text: str) -> Message:
        return cls(MessageKind.SUCCESS, text)

    @classmethod
    def error(cls, text: str) -> Message:
        return cls(MessageKind.ERROR, text)

    @classmethod
    def info(cls, text: str) -> Message:
        return cls(MessageKind.INFO, text)


class Session:
    """One user's interactive pruning of one model copy.

    Args:
        model: the model to prune; the session deep-copies it.
        example_inputs: positional inputs for one forward.
        spec: the spec string the model came from (for the report).
        importance, ratio, heads, global_pruning, round_to, targets: the `Pruner` settings
            (targets None: the pruner's default, see `explorer.coupling.targets`).
    """

    def __init__(self, model: nn.Module, example_inputs: Sequence[Any], spec: str = "",
                 importance: str = "magnitude", ratio: float = 0.5, heads: str = "dims",
                 global_pruning: bool = False, round_to: int = 1,
                 targets: tuple[str, ...] | None = None,
                 calibration: Calibration | None = None, heldout: Calibration | None = None,
                 task: Task | None = None, tokenizer: Any | None = None,
                 sentence: SentenceFolder | None = None) -> None:
        self.model = clone_model(model)
        self.example_inputs = tuple(example_inputs)
        self.spec = spec
        self.calibration = calibration  # data for data-aware criteria (random if None)
        self.heldout = heldout  # held-out data for quality (random inputs if None)
        self.task = task  # what the model does (inferred when None)
        self.tokenizer = tokenizer  # the checkpoint's tokenizer: an hf export, continuations
        self.sentence = sentence  # a sentence-transformers pipeline, saved likewise
        self.message: Message | None = None
        self.original = clone_model(self.model)  # unpruned, for reports and plan replays
        self.pruner = Pruner(self.model, self.example_inputs, importance=importance,
                             ratio=ratio, heads=heads, global_pruning=global_pruning,
                             round_to=round_to, calibration=calibration, targets=targets)
        self._verdicts: dict[tuple[Any, ...], Verdict] = {}
        self._solution: tuple[tuple[Any, ...], Solution[GroupKey]] | None = None
        self._statement: tuple[tuple[Any, ...], Statement] | None = None
        self._actions: list[Action] = []  # what the user did, replayable (`replay`)
        self.measures = Measures(self.original, self.example_inputs, heldout, task, tokenizer)
        self.on_action: Callable[[Session], None] | None = None  # e.g. save the log to disk
        self.graph = self._model_graph()
        self.params_start = self.params
        self.macs_start = self.macs
        self.widths_start = layer_widths(self.model)
        self.output_shapes = self.pruner.preflight().expected

    # ------------------------------------------------------------------ state read by pages
    @property
    def version(self) -> int:
        """Changes whenever the model changes (pages key their caches on it)."""
        return self.pruner.version

    @property
    def applied(self) -> list[Applied]:
        """Every accepted application, in order (the plan)."""
        return self.pruner.applied

    @property
    def params(self) -> int:
        return count_params(self.model)

    @property
    def macs(self) -> int:
        return count_macs(self.pruner.graph)

    @property
    def can_undo(self) -> bool:
        return self.pruner.decisions.can_undo

    @property
    def history(self) -> list[str]:
        """The decisions that undo would revert, oldest first."""
        return self.pruner.decisions.titles()

    @property
    def decided(self) -> dict[GroupKey, Decision]:
        """Every group accepted or rejected so far (the pruner's `decisions`)."""
        return self.pruner.decisions.by_key()

    @property
    def log(self) -> list[dict[str, Any]]:
        """What each edit did, oldest first, JSON-ready (for the report)."""
        return [line for edit in self.pruner.history.edits for line in edit.report]

    # the settings are the pruner's (one home; `configure` changes them)
    @property
    def importance(self) -> str:
        return self.pruner.importance

    @property
    def ratio(self) -> float:
        return self.pruner.ratio

    @property
    def heads(self) -> str:
        return self.pruner.heads

    @property
    def global_pruning(self) -> bool:
        return self.pruner.global_pruning

    @property
    def round_to(self) -> int:
        return self.pruner.round_to

    @property
    def targets(self) -> tuple[str, ...]:
        return self.settings()[5]

    @property
    def on_meta(self) -> bool:
        return any(p.device.type == "meta" for p in self.model.parameters())

    def settings(self) -> tuple[str, float, str, bool, int, tuple[str, ...]]:
        return self.pruner.settings()

    def configure(self, importance: str, ratio: float, heads: str,
                  global_pruning: bool | None = None, round_to: int | None = None,
                  targets: tuple[str, ...] | list[str] | None = None) -> bool:
        """Change the pruning settings and recompute the proposals.

        On a bad setting (or a criterion that cannot run on this model) the previous
        settings are kept, an error message is set and False is returned.
        """
        old = self.settings()
        try:
            self.pruner.configure(importance, ratio, heads, global_pruning, round_to,
                                  None if targets is None else tuple(targets))
        except ValueError as exc:
            return self._fail(str(exc))
        if self.settings() == old:
            return True
        try:
            self.pruner.pending()
        except Exception as exc:  # noqa: BLE001 - a criterion may need weights or data
            self.pruner.configure(*old)
            return self._fail(f"cannot use {importance!r} here: {exc}")
        *rest, targets_now = self.settings()
        self._record(Configure([*rest, list(targets_now)]))
        return True

    def statement(self) -> Statement:
        """What the current settings would cut, per target (cached until the model or the
        settings change)."""
        key = (self.version, self.settings())
        if self._statement is None or self._statement[0] != key:
            self._statement = (key, statement(self.pruner))
        return self._statement[1]

    def proposals(self) -> list[Proposal]:
        """Proposals for every prunable group not yet accepted or rejected."""
        decided = self.decided
        if all(g.key in decided for g in self.pruner.groups if self.pruner.could_propose(g)):
            return []  # every group a proposal could be for is decided (after Accept all)
        return [p for p in self.pruner.pending() if p.key not in decided]

    def current(self) -> Proposal | None:
        """The next proposal to decide on, or None when every group is decided."""
        pending = self.proposals()
        return pending[0] if pending else None

    def preflight(self, proposal: Proposal, count: int | Counts | None = None) -> Verdict:
        """The pre-flight verdict of accepting ``proposal`` (with ``count``; cached)."""
        counts = {proposal.axes[0]: count} if isinstance(count, int) else dict(count or {})
        key = (self.version, tuple(proposal.keys), tuple(proposal.axes), self.settings(),
               tuple(sorted(counts.items())))
        if key not in self._verdicts:
            self._verdicts[key] = self.pruner.preflight().check(proposal.removal(counts))
        return self._verdicts[key]

    def verdicts(self, progress: Progress | None = None) -> Solution[GroupKey]:
        """Every pending proposal's pre-flight alone, and the joint sets (cached until the
        model, the settings or the decisions change)."""
        pending = self.proposals()
        key = (self.version, self.settings(), tuple(p.key for p in pending))
        if self._solution is None or self._solution[0] != key:
            self._solution = (key, self.pruner.verdicts(pending, progress))
        return self._solution[1]

    def verdict_labels(self, progress: Progress | None = None) -> dict[int, str]:
        """Group id -> its one-line pre-flight verdict at the current settings (pending
        groups only)."""
        from ..render.proposal_view import verdict_labels
        pending = self.proposals()
        labels = verdict_labels(self.verdicts(progress), {p.key: p.group.title for p in pending})
        return {p.group.id: labels.get(p.key, "") for p in pending}

    def joint(self, proposal: Proposal) -> Proposal | None:
        """The proposal that makes an unsafe ``proposal`` safe (a joint set, or its outer
        axis: `Pruner.joint`), or None."""
        return self.pruner.joint(proposal, self.proposals(), self.verdicts())

    # ------------------------------------------------------------------ transitions
    def accept(self, proposal: Proposal, count: int | Counts | None = None) -> bool:
        """Pre-flight and apply one proposal (``count`` resizes its axes, see `removal`)."""
        try:
            removal = proposal.removal(count)
        except (TypeError, ValueError) as exc:
            return self._fail(f"invalid count: {exc}")
        if not removal:
            return self._fail("nothing to remove: the count is 0")
        ok = self._apply(removal, [proposal], count, self.preflight(proposal, count))
        if ok:
            counts = {proposal.axes[0]: count} if isinstance(count, int) else count
            self._record(Accept(list(proposal.key), proposal.joint or proposal.fallback,
                                None if counts is None else
                                [[int(a), int(n)] for a, n in counts.items()]))
        return ok

    def accept_all(self, progress: Progress | None = None) -> bool:
        """Accept every pending proposal at once (joint sets included, as `Pruner.step`
        does); the ones that stay unsafe are left pending and reported."""
        pending = self.proposals()
        if not pending:
            return self._fail("no pending proposals")
        parts = {p.key: p.removal() for p in pending}
        sol = solve(self.pruner.preflight(), parts, progress=progress,
                    rescale=self.pruner.common_fraction)
        unsafe = [f"{p.group.title} ({sol.unsafe[p.key].module} {sol.unsafe[p.key].location})"
                  for p in pending if p.key in sol.unsafe]
        if not sol.safe:
            return self._fail("no proposal passed the pre-flight: " + "; ".join(unsafe))
        if progress:
            progress(0.95, f"applying {len(sol.safe)} groups and analysing the result")
        safe = [p for p in pending if p.key in set(sol.safe)]
        ok = self._apply(sol.removal(parts), safe, None, self._traced_here(sol.verdict))
        if ok:
            self._record(AcceptAll())
        if ok and unsafe:
            self.message = Message.info(f"accepted {len(safe)} groups; left unsafe: "
                                           + "; ".join(unsafe))
        return ok

    def reject(self, proposal: Proposal) -> None:
        """Keep the group(s) as they are; not proposed again (until undo)."""
        self.pruner.reject(proposal)
        self.message = Message.info(f"rejected {proposal.title}")
        self._record(Reject([list(k) for k in proposal.keys]))

    def undo(self) -> bool:
        """Revert the last accept, reject, block removal or plan replay exactly."""
        version = self.version
        what = self.pruner.undo_decision()
        if what is None:
            self.message = Message.error("nothing to undo")
            return False
        if self.version != version:
            self.graph = self._model_graph()
        self.message = Message.info(f"undone: {what}")
        self._record(Undo())
        return True

    def remove_block(self, name: str) -> bool:
        """Replace residual block ``name`` by identity, after a pre-flight on a copy."""
        blocks = {b.module: b for b in self.graph.blocks()}
        if name not in blocks:
            return self._fail(f"'{name}' is not a removable residual block")
        verdict, tuple_output = Verdict(False, error="not checked"), False
        for tuple_output in (False, True):
            verdict = self._check_blocks([name], tuple_output)
            if verdict.ok:
                break
        if not verdict.ok:
            return self._fail_preflight(verdict)
        before = self.params
        self.pruner.history.remove_blocks({name: tuple_output}, f"removed block {name}",
                                          [{"block": name, "params": blocks[name].params}])
        self.graph = self._model_graph()
        self.message = Message.success(f"removed block {name}: params {before:,} -> "
                                          f"{self.params:,}")
        self._record(Block(name))
        return True

    def sensitivity(self, ratios: tuple[float, ...] = (0.25, 0.5, 0.75),
                    progress: Progress | None = None) -> list[SensitivityRow]:
        """Output change when each group alone is pruned at each ratio (restored exactly)."""
        if self.on_meta:
            raise ValueError("sensitivity needs weights: load the model on cpu, not meta")
        return scan(self.pruner, ratios, progress=progress)

    # ------------------------------------------------------------------ quality
    def quality(self) -> Quality | None:
        """Quality of the current model against the original on a small held-out batch
        (cached per model version); None on meta, which has no weights to measure."""
        return self.measures.quality(self.model, self.version)

    def proposal_cost(self, proposal: Proposal, count: int | Counts | None = None
                      ) -> Quality | None:
        """Quality after accepting ``proposal`` (with ``count``, the counts on screen),
        measured on a CPU copy with weights (the pre-flight copy is weightless); cached;
        None on meta."""
        counts = {proposal.axes[0]: count} if isinstance(count, int) else dict(count or {})
        key = (self.version, tuple(proposal.keys), self.settings(),
               tuple(sorted(counts.items())))
        return self.measures.cost(self.model, self.graph.coupling,
                                  lambda: proposal.removal(counts), key)

    def continuations(self, prompts: Sequence[str], new_tokens: int = DEFAULT_NEW_TOKENS
                      ) -> list[Continuation]:
        """Greedy continuations of ``prompts`` by the original and the current model (cached
        per model version); [] on meta, which has no weights.

        Raises:
            GenerateError: if the model has no tokenizer or cannot generate text.
        """
        return self.measures.continuations(self.model, self.version, prompts, new_tokens)

    @property
    def quality_source(self) -> str:
        """What the quality is measured on, in words."""
        return self.measures.source

    # ------------------------------------------------------------------ plans
    def plan(self) -> Plan:
        """The accepted prunings and block removals as a replayable `explorer.Plan`.

        Raises:
            ValueError: after a plan replay (the replayed plan is the record; export it).
        """
        shapes = [list(x.shape) if isinstance(x, torch.Tensor) else None
                  for x in self.example_inputs]
        return Plan.from_history(self.pruner.history, self.spec, shapes, head_mode=self.heads)

    def apply_plan(self, text: str | bytes) -> bool:
        """Replay a plan (JSON text) on the loaded, unpruned model; on error nothing changes."""
        if self.pruner.history.edits:
            return self._fail("a plan replays on the unpruned model: undo every accepted "
                              "change (or reload the model) first")
        try:
            plan = Plan.loads(text, where="uploaded plan")
        except PlanError as exc:  # the plan is checked completely: this is every user error
            return self._fail(f"cannot apply the plan: {exc}")
        before = self.params
        what = f"replayed a plan of {len(plan.steps)} step(s)"
        lines = [{"plan": plan.model, "steps": len(plan.steps), "removed": plan.removed_count}]
        try:  # all or nothing
            self.pruner.history.replay(
                lambda model: plan.apply(model, example_inputs=self.example_inputs), what, lines)
        except PlanError as exc:
            return self._fail(f"cannot apply the plan: {exc}")
        except Exception as exc:  # noqa: BLE001 - never a traceback in the browser
            return self._fail(f"cannot apply the plan: {exc}")

        self.graph = self._model_graph()
        self.message = Message.success(f"replayed a plan of {len(plan.steps)} step(s): "
                                          f"params {before:,} -> {self.params:,}")
        self._record(PlanReplay(text if isinstance(text, str) else text.decode()))
        return True

    # ------------------------------------------------------------------ export
    @property
    def config_note(self) -> str:
        """Why no transformers config describes the pruned model ('' when one does): a
        ``save_pretrained`` of it would not reload it, and an ``hf`` export falls back to
        safetensors + plan."""
        return self.pruner.config_note if self.pruner.applied else ""

    def forward_check(self) -> Message:
        """Run the current model and compare its output shapes with the original's."""
        verdict = forward_check(self.model, self.example_inputs, self.output_shapes)
        if verdict.ok:
            return Message.success(f"forward ok, output shapes {verdict.output_shapes}")
        if verdict.graph is None:
            where = " ".join(x for x in (verdict.module, verdict.location) if x)
            return Message.error(f"forward failed{' in ' + where if where else ''}: "
                                    f"{verdict.error}")
        return Message.error(verdict.error)

    def export_files(self, formats: tuple[str, ...], dest: str | Path
                     ) -> tuple[dict[str, Path], list[str]]:
        """Downloads for ``formats`` (see `explorer.io.export.FORMATS`), written under
        ``dest``: file name -> path.

        ``safetensors`` comes as a zip with ``plan.json``; ``hf`` as a zip of the
        transformers folder; ``report`` as Markdown and HTML (latency measured before and
        after). Returns the files and the exporter's notes (skips, fall-backs).
        """
        from ..io.export import export_downloads
        replayed = self.pruner.history.replayed
        plan = None if replayed and not ("safetensors" in formats or "hf" in formats) \
            else self.plan()
        return export_downloads(clone_model(self.model), formats, dest, plan=plan,
                                original=self.original, example_inputs=self.example_inputs,
                                tokenizer=self.tokenizer, sentence=self.sentence)

    def model_bytes(self) -> bytes:
        """The pruned module, ``torch.save``-d (load with ``torch.load(weights_only=False)``)."""
        buf = io.BytesIO()
        torch.save(self.model, buf)
        return buf.getvalue()

    def report(self) -> dict[str, Any]:
        """A JSON-ready record of the session: spec, settings, accepted changes, totals."""
        return {"spec": self.spec, "importance": self.importance, "ratio": self.ratio,
                "heads": self.heads, "global_pruning": self.global_pruning,
                "round_to": self.round_to, "targets": list(self.targets or ()),
                "params_before": self.params_start,
                "params_after": self.params, "macs_before": self.macs_start,
                "macs_after": self.macs, "accepted": self.log,
                "rejected": [list(k) for k, v in self.decided.items()
                             if v is Decision.REJECTED]}

    # ------------------------------------------------------------------ replay
    def replay(self, actions: list[Any], progress: Progress | None = None) -> int:
        """Redo recorded ``actions`` (from `actions` of an earlier session on the same model).

        An entry that is not an action the session records (a hand-edited log) is skipped
        and named in `message`. Replay stops at the first action that no longer applies
        (the model or code changed) and says so in `message`. Returns how many actions were
        replayed.
        """
        skipped: list[str] = []
        done = 0
        for i, act in enumerate(actions):
            if progress:
                progress(i / max(len(actions), 1), f"replaying decision {i + 1} of "
                                                   f"{len(actions)}")
            problem = action_problem(act)
            if problem is None:
                try:
                    ok = parse_action(act).redo(self)
                except (KeyError, TypeError, ValueError, IndexError) as exc:  # bad field values
                    problem = f"action {act['do']!r} with a malformed field: {exc}"
            if problem is not None:
                skipped.append(f"skipped decision {i + 1} ({problem})")
                continue
            if not ok:
                self.message = Message.error("; ".join([
                    f"replayed {done} of {len(actions)} decisions", *skipped,
                    f"decision {i + 1} ({act.get('do')}) no longer applies: "
                    f"{self.message.text if self.message else ''}"]))
                return done
            done += 1
        if skipped:
            self.message = Message.error("; ".join([f"restored {done} of {len(actions)} "
                                                    "decisions", *skipped]))
        elif actions:
            self.message = Message.info(f"restored {len(actions)} decisions")
        return done

    def redo_accept(self, key: tuple[Any, ...], joint: bool, counts: dict[int, int] | None
                    ) -> bool:
        """Accept the pending proposal of group ``key`` again (its joint or outer-axis
        proposal when ``joint``), resized by ``counts`` (a replayed `actions.Accept`)."""
        p = self._pending_by_key(key)
        if p is not None and joint:
            p = self.joint(p)
        if p is None:
            return self._fail("its group is not pending")
        return self.accept(p, counts)

    def redo_reject(self, key: tuple[Any, ...]) -> bool:
        """Reject the pending proposal of group ``key`` again (a replayed `actions.Reject`)."""
        p = self._pending_by_key(key)
        if p is None:
            return self._fail("its group is not pending")
        self.reject(p)
        return True

    def _pending_by_key(self, key: tuple[Any, ...]) -> Proposal | None:
        want = (str(key[0]), int(key[1]), int(key[2]) if len(key) > 2 else 0)  # old logs: 2
        return next((p for p in self.proposals() if p.key == want), None)

    @property
    def actions(self) -> list[dict[str, Any]]:
        """What the user did, oldest first, as JSON log entries (`replay` redoes them)."""
        return [to_json(a) for a in self._actions]

    def _record(self, action: Action | dict[str, Any]) -> None:
        self._actions.append(parse_action(action) if isinstance(action, dict) else action)
        if self.on_action is not None:
            self.on_action(self)

    # ------------------------------------------------------------------ internals
    def _model_graph(self) -> ModelGraph:
        return ModelGraph(self.model, self.pruner.graph, self.pruner.coupling)

    def _check_blocks(self, names: list[str], tuple_output: bool) -> Verdict:
        """Run a copy with ``names`` skipped (on meta when the model runs there)."""
        device = self.pruner.preflight().device
        trial = meta_copy(self.model) if device == "meta" else clone_model(self.model)
        remove_blocks(trial, names, dict.fromkeys(names, tuple_output))
        return forward_check(trial, to_device(self.example_inputs, device), self.output_shapes)

    def _fail_preflight(self, verdict: Verdict) -> bool:
        where = " ".join(x for x in (verdict.module, verdict.location) if x)
        return self._fail(f"pre-flight failed{' in ' + where if where else ''}: {verdict.error}")

    def _fail(self, text: str) -> bool:
        self.message = Message.error(text)
        return False

    def _apply(self, removal: Removal, accepted: list[Proposal],
               count: int | Counts | None, verdict: Verdict) -> bool:
        """Apply ``removal`` as the accept of ``accepted`` (`Pruner.apply`: the one path)."""
        if not verdict.ok:
            return self._fail_preflight(verdict)
        before = self.params
        try:
            self.pruner.apply(removal, verdict.graph, accepted, count)
        except PruneError as exc:
            return self._fail(str(exc))
        self.graph = self._model_graph()
        self.message = Message.success(f"accepted {len(accepted)} group(s): params "
                                       f"{before:,} -> {self.params:,}")
        return True

    def _traced_here(self, verdict: Verdict | None) -> Verdict:
        """The solver's passing pre-flight of the removal about to be applied, when its trace
        of the pruned copy ran where the model runs (a model on meta: the trace applying
        would make again); else a verdict without a graph, so applying traces the model."""
        if verdict is None or verdict.graph is None:
            return Verdict(True)
        first = next(iter(self.model.parameters()), None)
        here = str(first.device) if first is not None else "cpu"
        return verdict if verdict.graph.device == here else Verdict(True)

def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width (dim 0 of the weight) of every module that has a weight of rank >= 2."""
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            out[name] = int(w.shape[0])
    return out


__all__ = ["Decision", "Message", "MessageKind", "Proposal", "Session", "action_problem",
           "layer_widths"]
