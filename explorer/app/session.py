"""The interactive pruning session behind the app: propose, accept, reject, undo.

Streamlit-free on purpose (the app's pages only draw it), so every transition is unit-tested
without a browser. A session owns a private copy of the model; the pristine model it was
made from is never touched.

A group is known across re-traces by its `group_key` (first member parameter and dim), since
group ids change whenever a prune changes the graph.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..api import ModelGraph
from ..coupling.groups import Group
from ..graph.metrics import count_macs, count_params
from ..graph.tracer import TraceError, trace, traceback_location
from ..graph.walk import to_device
from ..io.plan import Plan, PlanError
from ..prune.calibration import Calibration, random_like
from ..prune.depth import remove_blocks
from ..prune.importance import CRITERIA, make
from ..prune.preflight import Preflight, Verdict, clone_model, meta_copy
from ..prune.pruner import HEAD_MODES, GroupChange, Pruner
from ..prune.removal import Applied, PruneError, Removal, apply_removal
from ..prune.sensitivity import SensitivityRow, scan
from ..quality.evaluate import Quality
from ..quality.probe import QualityProbe
from ..quality.task import Task

GroupKey = tuple[str, int]


def group_key(group: Group) -> GroupKey:
    """A name for a group that survives re-tracing (ids do not)."""
    m = group.members[0]
    return (m.param, m.dim)


@dataclass
class Proposal:
    """What the pruner suggests removing from one group."""

    group: Group
    key: GroupKey
    changes: list[GroupChange]  # one per pruned axis; the first is the "primary" axis
    axes: list[int]  # axis index of each change
    scores: dict[int, np.ndarray]  # axis index -> scores (lower = less important)

    def removal(self, count: int | dict[int, int] | None = None) -> Removal:
        """The proposal as a `Removal`.

        ``count`` resizes axes (the k lowest scores are removed): an int resizes the primary
        axis, a dict maps axis index -> count for any of the proposal's axes.
        """
        counts = {self.axes[0]: count} if isinstance(count, int) else dict(count or {})
        unknown = set(counts) - set(self.axes)
        if unknown:
            raise ValueError(f"axes {sorted(unknown)} are not pruned by this proposal")
        out = Removal()
        for axis, change in zip(self.axes, self.changes, strict=False):
            idx = change.removed
            if axis in counts:
                n = int(counts[axis])
                if not 0 <= n < change.width_before:
                    raise ValueError(f"count for '{change.axis}' must be in "
                                     f"[0, {change.width_before - 1}], got {n}")
                order = np.argsort(self.scores[axis], kind="stable")[:n]
                idx = sorted(int(i) for i in order)
            if idx:
                out.add(self.group.id, axis, idx)
        return out


@dataclass
class Message:
    """Feedback for the user after an action: kind is "success", "error" or "info"."""

    kind: str
    text: str


@dataclass
class _Snapshot:
    model: nn.Module | None  # None when the action did not change the model (a reject)
    decided: dict[GroupKey, str]
    log: list[dict[str, Any]]
    applied: list[Any] = field(default_factory=list)
    blocks_removed: int = 0


@dataclass
class Session:
    """One user's interactive pruning of one model copy.

    Args:
        model: the model to prune; the session deep-copies it.
        example_inputs: positional inputs for one forward.
        spec: the spec string the model came from (for the report).
    """

    model: nn.Module
    example_inputs: tuple[Any, ...]
    spec: str = ""
    importance: str = "magnitude"
    ratio: float = 0.5
    heads: str = "dims"
    global_pruning: bool = False
    round_to: int = 1
    decided: dict[GroupKey, str] = field(default_factory=dict)  # key -> "accepted"/"rejected"
    log: list[dict[str, Any]] = field(default_factory=list)  # accepted changes, for the report
    message: Message | None = None
    calibration: Calibration | None = None  # data for data-aware criteria (random if None)
    heldout: Calibration | None = None  # held-out data for quality (random inputs if None)
    task: Task | None = None  # what the model does (inferred when None)
    _probe: QualityProbe | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.model = clone_model(self.model)
        self.example_inputs = tuple(self.example_inputs)
        self._history: list[_Snapshot] = []
        self._proposals: list[Proposal] | None = None
        self._verdicts: dict[tuple[Any, ...], Verdict] = {}
        self.original = clone_model(self.model)  # unpruned, for reports and plan replays
        self.applied: list[Applied] = []  # every accepted application, in order (the plan)
        self.blocks_removed = 0
        self.version = 0  # bumped whenever the model changes (pages key caches on it)
        self._retrace()
        self.params_start = self.params
        self.macs_start = self.macs
        self.widths_start = layer_widths(self.model)
        self.output_shapes = [tuple(self.graph.graph.values[o].shape)
                              for o in self.graph.graph.outputs]

    # ------------------------------------------------------------------ state read by pages
    @property
    def params(self) -> int:
        return count_params(self.model)

    @property
    def macs(self) -> int:
        return count_macs(self.graph.graph)

    @property
    def can_undo(self) -> bool:
        return bool(self._history)

    @property
    def on_meta(self) -> bool:
        return any(p.device.type == "meta" for p in self.model.parameters())

    def settings(self) -> tuple[str, float, str, bool, int]:
        return (self.importance, self.ratio, self.heads, self.global_pruning, self.round_to)

    def configure(self, importance: str, ratio: float, heads: str,
                  global_pruning: bool | None = None, round_to: int | None = None) -> bool:
        """Change the pruning settings and recompute the proposals.

        On a bad setting (or a criterion that cannot run on this model) the previous
        settings are kept, an error message is set and False is returned.
        """
        new = (importance, float(ratio), heads,
               self.global_pruning if global_pruning is None else bool(global_pruning),
               self.round_to if round_to is None else int(round_to))
        if new == self.settings():
            return True
        try:
            if importance not in CRITERIA:
                raise ValueError(f"unknown importance '{importance}'; choose one of "
                                 f"{sorted(CRITERIA)}")
            if heads not in HEAD_MODES:
                raise ValueError(f"heads must be one of {HEAD_MODES}, got {heads!r}")
            if not 0.0 <= new[1] < 1.0:
                raise ValueError(f"ratio must be in [0, 1), got {new[1]}")
            if new[4] < 1:
                raise ValueError(f"round_to must be >= 1, got {new[4]}")
        except ValueError as exc:
            return self._fail(str(exc))
        old = self.settings()
        (self.importance, self.ratio, self.heads, self.global_pruning, self.round_to) = new
        self._pruner = self._make_pruner(reuse=self._pruner)
        self._proposals = None
        try:
            self.proposals()
        except Exception as exc:  # noqa: BLE001 - a criterion may need weights or data
            (self.importance, self.ratio, self.heads, self.global_pruning, self.round_to) = old
            self._pruner = self._make_pruner(reuse=self._pruner)
            self._proposals = None
            return self._fail(f"cannot use {importance!r} here: {type(exc).__name__}: {exc}")
        return True

    def proposals(self) -> list[Proposal]:
        """Proposals for every prunable group not yet accepted or rejected."""
        if self._proposals is None:
            self._proposals = self._propose()
        return [p for p in self._proposals if p.key not in self.decided]

    def current(self) -> Proposal | None:
        """The next proposal to decide on, or None when every group is decided."""
        pending = self.proposals()
        return pending[0] if pending else None

    def preflight(self, proposal: Proposal) -> Verdict:
        """The pre-flight verdict of accepting ``proposal`` as proposed (cached)."""
        key = (self.version, proposal.key, self.settings())
        if key not in self._verdicts:
            flight = Preflight(self.model, self.example_inputs, self.graph.coupling)
            self._verdicts[key] = flight.check(proposal.removal())
        return self._verdicts[key]

    # ------------------------------------------------------------------ transitions
    def accept(self, proposal: Proposal, count: int | dict[int, int] | None = None) -> bool:
        """Pre-flight and apply one proposal (``count`` resizes its axes, see `removal`)."""
        try:
            removal = proposal.removal(count)
        except (TypeError, ValueError) as exc:
            return self._fail(f"invalid count: {exc}")
        if not removal:
            return self._fail("nothing to remove: the count is 0")
        # As proposed: the verdict shown before the click is the one that decides.
        verdict = self.preflight(proposal) if count is None else None
        return self._apply(removal, [proposal], count, verdict=verdict)

    def accept_all(self) -> bool:
        """Accept every pending proposal at once; unsafe ones are left pending and reported."""
        pending = self.proposals()
        if not pending:
            return self._fail("no pending proposals")
        flight = Preflight(self.model, self.example_inputs, self.graph.coupling)
        safe, removal, unsafe = [], Removal(), []
        for p in pending:
            trial = Removal({k: list(v) for k, v in removal.picks.items()})
            for (g, a), idx in p.removal().picks.items():
                trial.add(g, a, idx)
            verdict = flight.check(trial)
            if verdict.ok:
                removal, safe = trial, safe + [p]
            else:
                unsafe.append(f"{p.group.title} ({verdict.module} {verdict.location})")
        if not safe:
            return self._fail("no proposal passed the pre-flight: " + "; ".join(unsafe))
        ok = self._apply(removal, safe, None, flight=flight)
        if ok and unsafe:
            self.message = Message("info", f"accepted {len(safe)} groups; left unsafe: "
                                           + "; ".join(unsafe))
        return ok

    def reject(self, proposal: Proposal) -> None:
        """Keep the group as it is; it is not proposed again (until undo)."""
        self._push(with_model=False)
        self.decided[proposal.key] = "rejected"
        self.message = Message("info", f"rejected {proposal.group.title}")

    def undo(self) -> bool:
        """Restore the state before the last accept, reject or block removal."""
        if not self._history:
            self.message = Message("error", "nothing to undo")
            return False
        snap = self._history.pop()
        self.decided, self.log = snap.decided, snap.log
        self.applied, self.blocks_removed = snap.applied, snap.blocks_removed
        if snap.model is not None:
            self.model = snap.model
            self._retrace()
        self.message = Message("info", "undone")
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
        self._push(with_model=True)
        remove_blocks(self.model, [name], {name: tuple_output})
        self.blocks_removed += 1
        self.log.append({"block": name, "params": blocks[name].params})
        self._retrace()
        self.message = Message("success", f"removed block {name}: params {before:,} -> "
                                          f"{self.params:,}")
        return True

    def sensitivity(self, ratios: tuple[float, ...] = (0.25, 0.5, 0.75)) -> list[SensitivityRow]:
        """Output change when each group alone is pruned at each ratio (on a copy)."""
        if self.on_meta:
            raise ValueError("sensitivity needs weights: load the model on cpu, not meta")
        pruner = Pruner(clone_model(self.model), self.example_inputs,
                        importance=self.importance, heads=self.heads,
                        calibration=self.calibration)
        return scan(pruner, ratios)

    # ------------------------------------------------------------------ quality
    def quality(self) -> Quality | None:
        """Quality of the current model against the original on a small held-out batch
        (cached per model version); None on meta, which has no weights to measure."""
        probe = self._quality_probe()
        return None if probe is None else probe.current(self.model, self.version)

    def proposal_cost(self, proposal: Proposal) -> Quality | None:
        """Quality after accepting ``proposal`` as proposed, measured on a CPU copy with
        weights (the pre-flight copy is weightless); cached; None on meta."""
        probe = self._quality_probe()
        if probe is None:
            return None
        key = (self.version, proposal.key, self.settings())
        return probe.cost(self.model, self.graph.coupling, proposal.removal, key)

    @property
    def quality_source(self) -> str:
        """What the quality is measured on, in words."""
        if self.heldout is None:
            return "random inputs (no held-out data given)"
        return f"{_batch_rows(self.heldout.batches[0])} held-out samples"

    def _quality_probe(self) -> QualityProbe | None:
        if self.on_meta:
            return None
        if self._probe is None:
            data = (Calibration(self.heldout.batches[:1], mask_index=self.heldout.mask_index)
                    if self.heldout is not None else
                    Calibration(random_like(self.example_inputs, 1, 4, seed=1)))
            self._probe = QualityProbe(self.original, data, self.task)
        return self._probe

    # ------------------------------------------------------------------ plans
    def plan(self) -> Plan:
        """The accepted prunings as a replayable `explorer.Plan`.

        Raises:
            ValueError: when a residual block was removed (plans record tensor cuts only).
        """
        if self.blocks_removed:
            raise ValueError("plans record channel cuts only; undo the block removal to "
                             "export a plan")
        shapes = [list(x.shape) if isinstance(x, torch.Tensor) else None
                  for x in self.example_inputs]
        titles = [e.get("group") for e in self.log if "group" in e]
        return Plan.from_applied(self.applied, self.model, self.spec, shapes,
                                 head_mode=self.heads,
                                 titles=titles if len(titles) == len(self.applied) else None)

    def apply_plan(self, text: str | bytes) -> bool:
        """Replay a plan (JSON text) on the loaded, unpruned model; on error nothing changes."""
        if self.applied or self.blocks_removed:
            return self._fail("a plan replays on the unpruned model: undo every accepted "
                              "change (or reload the model) first")
        try:
            plan = Plan.loads(text, where="uploaded plan")
            trial = clone_model(self.model)
            plan.apply(trial, example_inputs=self.example_inputs)
        except PlanError as exc:  # the plan is checked completely: this is every user error
            return self._fail(f"cannot apply the plan: {exc}")
        except Exception as exc:  # noqa: BLE001 - never a traceback in the browser
            return self._fail(f"cannot apply the plan: {type(exc).__name__}: {exc}")
        before = self.params
        self._push(with_model=True)
        self.model = trial
        self.log.append({"plan": plan.model, "steps": len(plan.steps),
                         "removed": plan.removed_count})
        self.blocks_removed += 1  # the replay is not an `Applied` record: no re-export
        self._retrace()
        self.message = Message("success", f"replayed a plan of {len(plan.steps)} step(s): "
                                          f"params {before:,} -> {self.params:,}")
        return True

    # ------------------------------------------------------------------ export
    def forward_check(self) -> Message:
        """Trace the current model and compare its output shapes with the original's."""
        try:
            mg = self._trace()
        except Exception as exc:  # noqa: BLE001 - shown to the user as one error line
            return Message("error", f"forward failed: {type(exc).__name__}: {exc}")
        shapes = [tuple(mg.graph.values[o].shape) for o in mg.graph.outputs]
        if shapes != self.output_shapes:
            return Message("error", f"output shapes changed: {self.output_shapes} -> {shapes}")
        return Message("success", f"forward ok, output shapes {shapes}")

    def export_files(self, formats: tuple[str, ...]) -> tuple[dict[str, bytes], list[str]]:
        """Downloads for ``formats`` (see `explorer.io.export.FORMATS`): file name -> bytes.

        ``safetensors`` comes as a zip with ``plan.json``; ``hf`` as a zip of the
        transformers folder; ``report`` as Markdown and HTML (latency measured before and
        after). Returns the files and the exporter's notes (skips, fall-backs).
        """
        import tempfile
        import zipfile
        from pathlib import Path

        from ..io.export import export
        plan = self.plan() if ("safetensors" in formats or "hf" in formats) else None
        if plan is None and not self.blocks_removed:
            plan = self.plan()
        with tempfile.TemporaryDirectory() as tmp:
            result = export(clone_model(self.model), tmp, formats=formats, plan=plan,
                            original=self.original, example_inputs=self.example_inputs)
            out: dict[str, bytes] = {}
            for fmt, paths in result.files.items():
                if fmt in ("pt", "report"):
                    for path in paths:
                        out[Path(path).name] = Path(path).read_bytes()
                    continue
                buf = io.BytesIO()
                with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                    for path in map(Path, paths):
                        files = sorted(path.rglob("*")) if path.is_dir() else [path]
                        for f in files:
                            if f.is_file():
                                zf.write(f, f.relative_to(Path(tmp)))
                out[f"pruned_{fmt}.zip"] = buf.getvalue()
        return out, list(result.messages)

    def model_bytes(self) -> bytes:
        """The pruned module, ``torch.save``-d (load with ``torch.load(weights_only=False)``)."""
        buf = io.BytesIO()
        torch.save(self.model, buf)
        return buf.getvalue()

    def report(self) -> dict[str, Any]:
        """A JSON-ready record of the session: spec, settings, accepted changes, totals."""
        return {"spec": self.spec, "importance": self.importance, "ratio": self.ratio,
                "heads": self.heads, "global_pruning": self.global_pruning,
                "round_to": self.round_to, "params_before": self.params_start,
                "params_after": self.params, "macs_before": self.macs_start,
                "macs_after": self.macs, "accepted": self.log,
                "rejected": [list(k) for k, v in self.decided.items() if v == "rejected"]}

    # ------------------------------------------------------------------ internals
    def _trace(self) -> ModelGraph:
        return ModelGraph(self.model, *self._trace_parts(self.model))

    def _trace_parts(self, model: nn.Module) -> tuple[Any, Any]:
        pruner = Pruner(model, self.example_inputs)
        return pruner.graph, pruner.coupling

    def _make_pruner(self, reuse: Pruner | None = None) -> Pruner:
        if reuse is not None:  # same model: keep its trace, only the settings change
            if reuse.importance != self.importance:
                reuse.criterion, reuse._prepared = make(self.importance), False
            reuse.importance, reuse.ratio, reuse.heads = self.importance, self.ratio, self.heads
            reuse.global_pruning, reuse.round_to = self.global_pruning, self.round_to
            return reuse
        return Pruner(self.model, self.example_inputs, importance=self.importance,
                      ratio=self.ratio, heads=self.heads, global_pruning=self.global_pruning,
                      round_to=self.round_to, calibration=self.calibration)

    def _retrace(self) -> None:
        self._pruner = self._make_pruner()
        self.graph = ModelGraph(self.model, self._pruner.graph, self._pruner.coupling)
        self._proposals = None
        self.version += 1

    def _propose(self) -> list[Proposal]:
        removal, changes, _ = self._pruner.propose()
        cands, _ = self._pruner.candidates()
        scores = {(c.group.id, c.axis): c.scores for c in cands}
        by_group: dict[int, list[tuple[int, GroupChange]]] = {}
        for (gid, axis), change in zip(removal.picks, changes, strict=False):  # appended in step
            by_group.setdefault(gid, []).append((axis, change))
        out = []
        for gid, picks in by_group.items():
            group = self.graph.coupling.groups[gid]
            out.append(Proposal(group, group_key(group), [c for _, c in picks],
                                [a for a, _ in picks],
                                {a: np.asarray(scores[(gid, a)]) for a, _ in picks}))
        return out

    def _check_blocks(self, names: list[str], tuple_output: bool) -> Verdict:
        """Run a copy with ``names`` skipped (on meta when the model runs there)."""
        device = Preflight(self.model, self.example_inputs, self.graph.coupling).device
        trial = meta_copy(self.model) if device == "meta" else clone_model(self.model)
        remove_blocks(trial, names, dict.fromkeys(names, tuple_output))
        try:
            graph = trace(trial, to_device(self.example_inputs, device))
        except TraceError as exc:
            cause = exc.__cause__ or exc
            return Verdict(False, location=traceback_location(cause),
                           error=f"{type(cause).__name__}: {cause}")
        shapes = [tuple(graph.values[o].shape) for o in graph.outputs]
        if shapes != self.output_shapes:
            return Verdict(False, error=f"output shapes changed: {self.output_shapes} -> "
                                        f"{shapes}", output_shapes=shapes)
        return Verdict(True, output_shapes=shapes)

    def _push(self, with_model: bool) -> None:
        self._history.append(_Snapshot(clone_model(self.model) if with_model else None,
                                       dict(self.decided), list(self.log), list(self.applied),
                                       self.blocks_removed))

    def _fail_preflight(self, verdict: Verdict) -> bool:
        where = " ".join(x for x in (verdict.module, verdict.location) if x)
        return self._fail(f"pre-flight failed{' in ' + where if where else ''}: {verdict.error}")

    def _fail(self, text: str) -> bool:
        self.message = Message("error", text)
        return False

    def _apply(self, removal: Removal, accepted: list[Proposal],
               count: int | dict[int, int] | None, flight: Preflight | None = None,
               verdict: Verdict | None = None) -> bool:
        if verdict is None:
            flight = flight or Preflight(self.model, self.example_inputs, self.graph.coupling)
            verdict = flight.check(removal)
        if not verdict.ok:
            return self._fail_preflight(verdict)
        before = self.params
        self._push(with_model=True)
        try:
            applied = apply_removal(self.model, self.graph.coupling, removal)
        except PruneError as exc:
            self._history.pop()
            return self._fail(str(exc))
        self.applied.append(applied)
        for p in accepted:
            self.decided[p.key] = "accepted"
            removed = {a: removal.picks.get((p.group.id, a), []) for a in p.axes}
            self.log.append({"group": p.group.title, "key": list(p.key),
                             "axes": [{"role": p.group.axes[a].role, "size": p.group.axes[a].size,
                                       "removed": idx} for a, idx in removed.items()],
                             "count": count if not isinstance(count, dict) else
                             {str(k): v for k, v in count.items()},
                             "attributes": applied.attributes})
        self._retrace()
        self.message = Message("success", f"accepted {len(accepted)} group(s): params "
                                          f"{before:,} -> {self.params:,}")
        return True


def _batch_rows(batch: tuple[Any, ...]) -> int:
    first = next((a for a in batch if isinstance(a, torch.Tensor) and a.dim()), None)
    return int(first.shape[0]) if first is not None else 1


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width (dim 0 of the weight) of every module that has a weight of rank >= 2."""
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            out[name] = int(w.shape[0])
    return out


def message_dict(message: Message | None) -> dict[str, str] | None:
    return None if message is None else asdict(message)
