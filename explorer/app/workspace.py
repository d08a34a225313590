"""The model a session prunes, and everything read from it: state, settings, checks,
quality, plans and exports. Streamlit-free; `explorer.app.session.Session` adds the
transitions (accept, reject, undo, ...) and the action log on top.
"""
from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import ModelGraph
from ..coupling.groups import GroupKey
from ..graph.metrics import count_macs, count_params
from ..io.plan import Plan
from ..io.specs import SentenceFolder
from ..prune.calibration import Calibration
from ..prune.decisions import Decision
from ..prune.fixups.hfconfig import cannot_describe
from ..prune.joint import Solution
from ..prune.preflight import Verdict, forward_check, shared_clone
from ..prune.proposal import Counts, Proposal
from ..prune.pruner import Pruner
from ..prune.records import said_once
from ..prune.removal import Applied
from ..prune.sensitivity import Progress, SensitivityRow, scan
from ..prune.statement import Statement, statement
from ..quality.evaluate import Quality
from ..quality.generate import DEFAULT_NEW_TOKENS, Continuation
from ..quality.original import Original
from ..quality.task import Task
from .measures import Measures
from .messages import Message, failure


class Workspace:
    """One model copy under pruning, its pruner and what the pages read of it.

    Args:
        model: the model to prune; never changed: the session works on a copy of its modules
            that shares its parameters (`working_copy`), so a session costs the tensors its
            cuts make, not a second model.
        example_inputs: positional inputs for one forward.
        spec: the spec string the model came from (for the report).
        importance, ratio, heads, global_pruning, round_to, targets: the `Pruner` settings
            (targets None: the pruner's default, see `explorer.coupling.targets`).
        calibration, heldout, task, tokenizer, sentence: data for data-aware criteria, for
            quality, what the model does, its tokenizer and sentence-transformers pipeline.
    """

    def __init__(self, model: nn.Module, example_inputs: Sequence[Any], spec: str = "",
                 importance: str = "magnitude", ratio: float = 0.5, heads: str = "dims",
                 global_pruning: bool = False, round_to: int = 1,
                 targets: tuple[str, ...] | None = None,
                 calibration: Calibration | None = None, heldout: Calibration | None = None,
                 task: Task | None = None, tokenizer: Any | None = None,
                 sentence: SentenceFolder | None = None) -> None:
        self.model = working_copy(model)
        self.example_inputs = tuple(example_inputs)
        self.spec = spec
        self.calibration = calibration  # data for data-aware criteria (random if None)
        self.heldout = heldout  # held-out data for quality (random inputs if None)
        self.task = task  # what the model does (inferred when None)
        self.tokenizer = tokenizer  # the checkpoint's tokenizer: an hf export, continuations
        self.sentence = sentence  # a sentence-transformers pipeline, saved likewise
        # unpruned, for quality, reports and plan replays: shares the working copy's tensors
        # (and so ``model``'s), which cuts, undo and replays replace and never write into
        # (digest-checked on export)
        self._kept = Original(self.model)
        self.original = self._kept.get()
        self.pruner = Pruner(self.model, self.example_inputs, importance=importance,
                             ratio=ratio, heads=heads, global_pruning=global_pruning,
                             round_to=round_to, calibration=calibration, targets=targets)
        # an accept carries data-aware statistics through the cut instead of a new pass
        # over the calibration data (seconds on a real LLM; the CLI's steps measure again)
        self.pruner.remeasure = False
        self._verdicts: dict[tuple[Any, ...], Verdict] = {}
        self._solution: tuple[tuple[Any, ...], Solution[GroupKey]] | None = None
        self._statement: tuple[tuple[Any, ...], Statement] | None = None
        self.measures = Measures(self.original, self.example_inputs, heldout, task, tokenizer)
        self._graph: tuple[int, ModelGraph] | None = None
        self.params_start = self.params
        self.macs_start = self.macs
        self.widths_start = layer_widths(self.model)
        self.output_shapes = self.pruner.preflight().expected
        # two tabs share one live session (the registry): every change holds this lock
        # (`session.transition`), and so does a page for all it reads (`reading`)
        self.lock = threading.RLock()
        self._started()

    def _started(self) -> None:
        """Called at the end of ``__init__``: a subclass sets up its own state here (so it
        does not repeat the constructor's arguments)."""

    # ------------------------------------------------------------------ state read by pages
    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the model still while a page reads it: a transition another tab starts
        meanwhile waits until the page is drawn, so every value the page shows (params,
        proposals, quality, history) comes from one state of the model, never half of an
        accept. Re-entrant: the page's own clicks run their transitions inside it."""
        with self.lock:
            yield

    @property
    def graph(self) -> ModelGraph:
        """The model's graph, groups and views as it is now (made once per version)."""
        if self._graph is None or self._graph[0] != self.version:
            self._graph = (self.version, self._model_graph())
        return self._graph[1]

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

    def undecided(self) -> int:
        """How many groups a proposal could be for and are not decided, without scoring (a
        data-aware criterion's calibration pass waits until proposals are asked for)."""
        decided = self.decided
        return sum(1 for g in self.pruner.groups
                   if self.pruner.could_propose(g) and g.key not in decided)

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
        return self.measures.cost(self.model, self.graph.coupling,
                                  lambda: proposal.removal(counts), self._cost_key(proposal,
                                                                                   counts))

    def cost_if_measured(self, proposal: Proposal, count: int | Counts | None = None
                         ) -> Quality | None:
        """`proposal_cost` when it is already measured, else None (measures nothing)."""
        counts = {proposal.axes[0]: count} if isinstance(count, int) else dict(count or {})
        return self.measures.cached_cost(self._cost_key(proposal, counts))

    def _cost_key(self, proposal: Proposal, counts: Counts) -> tuple[Any, ...]:
        return (self.version, tuple(proposal.keys), self.settings(),
                tuple(sorted(counts.items())))

    @property
    def compensation(self) -> str:
        """How accepts refit the consumers of removed channels: "none", "bias" or "lstsq"."""
        mode = self.pruner.compensate
        return "none" if mode is None else mode.value

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
    # ------------------------------------------------------------------ export
    @property
    def config_note(self) -> str:
        """Why no transformers config describes the pruned model ('' when one does): a
        ``save_pretrained`` of it would not reload it, and an ``hf`` export falls back to
        safetensors + plan."""
        return self.pruner.config_note if self.pruner.applied else ""

    def config_line(self, said: Sequence[str] = ()) -> str:
        """The Export page's line on why no transformers config describes the pruned model:
        '' when one does, or when the export notes ``said`` already carry it (an hf
        export's fall-back message says it once)."""
        if not self.config_note:
            return ""
        line = cannot_describe(self.config_note)
        if line not in said_once([line, *said]):
            return ""
        return (f"{line[0].upper()}{line[1:]}. `save_pretrained` would not reload it, so "
                f"the hf format falls back to safetensors + plan.")

    def forward_check(self) -> Message:
        """Run the current model and compare its output shapes with the original's."""
        verdict = forward_check(self.model, self.example_inputs, self.output_shapes)
        if verdict.ok:
            return Message.success(f"forward ok, output shapes {verdict.output_shapes}")
        return Message.error(failure(verdict, "forward failed") if verdict.graph is None
                             else verdict.error)

    def export_files(self, formats: tuple[str, ...], dest: str | Path,
                     prompts: Sequence[str] = ()) -> tuple[dict[str, Path], list[str]]:
        """Downloads for ``formats`` (see `explorer.io.export.FORMATS`), written under
        ``dest``: file name -> path.

        ``safetensors`` comes as a zip with ``plan.json``; ``hf`` as a zip of the
        transformers folder; ``report`` as Markdown and HTML (latency measured before and
        after, the quality measured here, and greedy continuations of ``prompts``). Returns
        the files and the exporter's notes (skips, fall-backs).
        """
        from ..io.export import export_downloads
        replayed = self.pruner.history.replayed
        plan = None if replayed and not ("safetensors" in formats or "hf" in formats) \
            else self.plan()
        report = "report" in formats
        return export_downloads(shared_clone(self.model), formats, dest, plan=plan,
                                original=self._kept.get(), example_inputs=self.example_inputs,
                                tokenizer=self.tokenizer, sentence=self.sentence,
                                quality=self.quality() if report else None,
                                generations=self.continuations(prompts) if report and
                                self.tokenizer is not None else ())

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
                "compensate": self.compensation,
                "params_before": self.params_start,
                "params_after": self.params, "macs_before": self.macs_start,
                "macs_after": self.macs, "accepted": self.log,
                "rejected": [list(k) for k, v in self.decided.items()
                             if v is Decision.REJECTED]}

    # ------------------------------------------------------------------ internals
    def _model_graph(self) -> ModelGraph:
        return ModelGraph(self.model, self.pruner.graph, self.pruner.coupling)

    def _traced_here(self, verdict: Verdict | None) -> Verdict:
        """The solver's passing pre-flight of the removal about to be applied, when its trace
        of the pruned copy ran where the model runs (a model on meta: the trace applying
        would make again); else a verdict without a graph, so applying traces the model."""
        if verdict is None or verdict.graph is None:
            return Verdict(True)
        first = next(iter(self.model.parameters()), None)
        here = str(first.device) if first is not None else "cpu"
        return verdict if verdict.graph.device == here else Verdict(True)


def working_copy(model: nn.Module) -> nn.Module:
    """The copy of ``model`` a session prunes: its own modules and buffers, ``model``'s
    parameter tensors.

    Every change the library makes to a model replaces parameters (cuts, refits, undo,
    replays), never writes into them (`explorer.quality.original` checks this before an
    export), so the app's pristine model, cached once for every session of a server, is the
    weights of each session's copy too: a session on SmolLM2 holds what its cuts made, not
    another 540 MB. Buffers are copied (small): a forward may update one in place (batch-norm
    statistics in training mode), which must not reach the model other sessions share.
    """
    copy = shared_clone(model)
    fresh: dict[int, torch.Tensor] = {}
    for module in copy.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                if id(buf) not in fresh:  # a buffer two modules hold stays one
                    fresh[id(buf)] = buf.clone()
                module._buffers[name] = fresh[id(buf)]
    return copy


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width (dim 0 of the weight) of every module that has a weight of rank >= 2."""
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            out[name] = int(w.shape[0])
    return out
