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
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import ModelGraph
from ..coupling.groups import GroupKey
from ..graph.metrics import count_macs, count_params
from ..graph.walk import to_device
from ..io.plan import Plan, PlanError
from ..prune.depth import remove_blocks
from ..prune.preflight import Verdict, clone_model, forward_check, meta_copy
from ..prune.proposal import Counts, Proposal
from ..prune.pruner import Pruner
from ..prune.removal import Applied, PruneError, Removal, undo
from ..prune.sensitivity import Progress, SensitivityRow, scan


@dataclass
class Message:
    """Feedback for the user after an action."""

    kind: str  # "success", "error" or "info"
    text: str


class Decision(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass
class _Undo:
    """How to revert one action: the session state before it, and what to do to the model."""

    what: str  # shown in the decision history
    decided: dict[GroupKey, str]
    log_len: int
    revert: Callable[[], None] | None = None  # None: the action did not touch the model
    blocks: int = 0


@dataclass
class Session:
    """One user's interactive pruning of one model copy.

    Args:
        model: the model to prune; the session deep-copies it.
        example_inputs: positional inputs for one forward.
        spec: the spec string the model came from (for the report).
        importance, ratio, heads, global_pruning, round_to: the `Pruner` settings.
    """

    model: nn.Module
    example_inputs: tuple[Any, ...]
    spec: str = ""
    importance: str = "magnitude"
    ratio: float = 0.5
    heads: str = "dims"
    global_pruning: bool = False
    round_to: int = 1
    decided: dict[GroupKey, str] = field(default_factory=dict)  # key -> a `Decision` value
    log: list[dict[str, Any]] = field(default_factory=list)  # accepted changes, for the report
    message: Message | None = None

    def __post_init__(self) -> None:
        self.model = clone_model(self.model)
        self.example_inputs = tuple(self.example_inputs)
        self.original = clone_model(self.model)  # unpruned, for reports and plan replays
        self.pruner = Pruner(self.model, self.example_inputs, importance=self.importance,
                             ratio=self.ratio, heads=self.heads,
                             global_pruning=self.global_pruning, round_to=self.round_to)
        self._history: list[_Undo] = []
        self._verdicts: dict[tuple[Any, ...], Verdict] = {}
        self.blocks_removed = 0
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
        return bool(self._history)

    @property
    def history(self) -> list[str]:
        """The decisions that undo would revert, oldest first."""
        return [h.what for h in self._history]

    @property
    def on_meta(self) -> bool:
        return any(p.device.type == "meta" for p in self.model.parameters())

    def settings(self) -> tuple[str, float, str, bool, int]:
        return self.pruner.settings()

    def configure(self, importance: str, ratio: float, heads: str,
                  global_pruning: bool | None = None, round_to: int | None = None) -> bool:
        """Change the pruning settings and recompute the proposals.

        On a bad setting (or a criterion that cannot run on this model) the previous
        settings are kept, an error message is set and False is returned.
        """
        old = self.settings()
        try:
            self.pruner.configure(importance, ratio, heads, global_pruning, round_to)
        except ValueError as exc:
            return self._fail(str(exc))
        if self.settings() == old:
            return True
        try:
            self.proposals()
        except Exception as exc:  # noqa: BLE001 - a criterion may need weights or data
            self.pruner.configure(*old)
            return self._fail(f"cannot use {importance!r} here: {exc}")
        self._sync_settings()
        return True

    def proposals(self) -> list[Proposal]:
        """Proposals for every prunable group not yet accepted or rejected."""
        return [p for p in self.pruner.pending() if p.key not in self.decided]

    def current(self) -> Proposal | None:
        """The next proposal to decide on, or None when every group is decided."""
        pending = self.proposals()
        return pending[0] if pending else None

    def preflight(self, proposal: Proposal, count: int | Counts | None = None) -> Verdict:
        """The pre-flight verdict of accepting ``proposal`` (with ``count``; cached)."""
        counts = {proposal.axes[0]: count} if isinstance(count, int) else dict(count or {})
        key = (self.version, tuple(proposal.keys), self.settings(), tuple(sorted(counts.items())))
        if key not in self._verdicts:
            self._verdicts[key] = self.pruner.preflight().check(proposal.removal(counts))
        return self._verdicts[key]

    # ------------------------------------------------------------------ transitions
    def accept(self, proposal: Proposal, count: int | Counts | None = None) -> bool:
        """Pre-flight and apply one proposal (``count`` resizes its axes, see `removal`)."""
        try:
            removal = proposal.removal(count)
        except (TypeError, ValueError) as exc:
            return self._fail(f"invalid count: {exc}")
        if not removal:
            return self._fail("nothing to remove: the count is 0")
        verdict = self.preflight(proposal, count)
        return self._apply(removal, [proposal], count, verdict)

    def accept_all(self, progress: Progress | None = None) -> bool:
        """Accept every pending proposal at once (joint sets included, as `Pruner.step`
        does); the ones that stay unsafe are left pending and reported."""
        pending = self.proposals()
        if not pending:
            return self._fail("no pending proposals")
        parts = {p.key: p.removal() for p in pending}
        if progress:
            progress(0.0, f"pre-flight of {len(parts)} groups")
        from ..prune.joint import solve
        sol = solve(self.pruner.preflight(), parts)
        unsafe = [f"{p.group.title} ({sol.unsafe[p.key].module} {sol.unsafe[p.key].location})"
                  for p in pending if p.key in sol.unsafe]
        if not sol.safe:
            return self._fail("no proposal passed the pre-flight: " + "; ".join(unsafe))
        if progress:
            progress(0.5, f"applying {len(sol.safe)} groups")
        safe = [p for p in pending if p.key in set(sol.safe)]
        ok = self._apply(sol.removal(parts), safe, None, Verdict(True))
        if ok and unsafe:
            self.message = Message("info", f"accepted {len(safe)} groups; left unsafe: "
                                           + "; ".join(unsafe))
        return ok

    def reject(self, proposal: Proposal) -> None:
        """Keep the group(s) as they are; not proposed again (until undo)."""
        self._push(f"rejected {proposal.title}")
        for k in proposal.keys:
            self.decided[k] = Decision.REJECTED.value
        self.message = Message("info", f"rejected {proposal.title}")

    def undo(self) -> bool:
        """Revert the last accept, reject, block removal or plan replay exactly."""
        if not self._history:
            self.message = Message("error", "nothing to undo")
            return False
        last = self._history.pop()
        if last.revert is not None:
            last.revert()
            self.graph = self._model_graph()
        self.decided = last.decided
        del self.log[last.log_len:]
        self.blocks_removed = last.blocks
        self.message = Message("info", f"undone: {last.what}")
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
        removed = remove_blocks(self.model, [name], {name: tuple_output})

        def revert() -> None:
            parent, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(parent), attr, removed[name])
            self.pruner.retrace()

        self._push(f"removed block {name}", revert)
        self.blocks_removed += 1
        self.log.append({"block": name, "params": blocks[name].params})
        self.pruner.retrace()
        self.graph = self._model_graph()
        self.message = Message("success", f"removed block {name}: params {before:,} -> "
                                          f"{self.params:,}")
        return True

    def sensitivity(self, ratios: tuple[float, ...] = (0.25, 0.5, 0.75),
                    progress: Progress | None = None) -> list[SensitivityRow]:
        """Output change when each group alone is pruned at each ratio (restored exactly)."""
        if self.on_meta:
            raise ValueError("sensitivity needs weights: load the model on cpu, not meta")
        return scan(self.pruner, ratios, progress=progress)

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
            plan = Plan.from_dict(json.loads(text), where="uploaded plan")
        except (PlanError, ValueError, UnicodeDecodeError) as exc:
            return self._fail(f"cannot apply the plan: {exc}")
        before = self.params
        previous = _tensors(self.model)
        try:
            replay = plan.apply(self.model)  # all or nothing
        except (PlanError, ValueError) as exc:
            return self._fail(f"cannot apply the plan: {exc}")

        def revert() -> None:
            undo(self.model, Applied({}, replay.attributes, {}, previous))
            self.pruner.retrace()

        self._push(f"replayed a plan of {len(plan.steps)} step(s)", revert)
        self.log.append({"plan": plan.model, "steps": len(plan.steps),
                         "removed": plan.removed_count})
        self.blocks_removed += 1  # the replay is not an `Applied` record: no re-export
        self.pruner.retrace()
        self.graph = self._model_graph()
        self.message = Message("success", f"replayed a plan of {len(plan.steps)} step(s): "
                                          f"params {before:,} -> {self.params:,}")
        return True

    # ------------------------------------------------------------------ export
    def forward_check(self) -> Message:
        """Run the current model and compare its output shapes with the original's."""
        verdict = forward_check(self.model, self.example_inputs, self.output_shapes)
        if verdict.ok:
            return Message("success", f"forward ok, output shapes {verdict.output_shapes}")
        if verdict.graph is None:
            where = " ".join(x for x in (verdict.module, verdict.location) if x)
            return Message("error", f"forward failed{' in ' + where if where else ''}: "
                                    f"{verdict.error}")
        return Message("error", verdict.error)

    def export_files(self, formats: tuple[str, ...]) -> tuple[dict[str, bytes], list[str]]:
        """Downloads for ``formats`` (see `explorer.io.export.FORMATS`): file name -> bytes.

        ``safetensors`` comes as a zip with ``plan.json``; ``hf`` as a zip of the
        transformers folder; ``report`` as Markdown and HTML (latency measured before and
        after). Returns the files and the exporter's notes (skips, fall-backs).
        """
        from ..io.export import export_bytes
        plan = self.plan() if ("safetensors" in formats or "hf" in formats) else None
        if plan is None and not self.blocks_removed:
            plan = self.plan()
        return export_bytes(clone_model(self.model), formats, plan=plan,
                            original=self.original, example_inputs=self.example_inputs)

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
                "rejected": [list(k) for k, v in self.decided.items()
                             if v == Decision.REJECTED.value]}

    # ------------------------------------------------------------------ internals
    def _model_graph(self) -> ModelGraph:
        return ModelGraph(self.model, self.pruner.graph, self.pruner.coupling)

    def _sync_settings(self) -> None:
        (self.importance, self.ratio, self.heads, self.global_pruning,
         self.round_to) = self.pruner.settings()

    def _check_blocks(self, names: list[str], tuple_output: bool) -> Verdict:
        """Run a copy with ``names`` skipped (on meta when the model runs there)."""
        device = self.pruner.preflight().device
        trial = meta_copy(self.model) if device == "meta" else clone_model(self.model)
        remove_blocks(trial, names, dict.fromkeys(names, tuple_output))
        return forward_check(trial, to_device(self.example_inputs, device), self.output_shapes)

    def _push(self, what: str, revert: Callable[[], None] | None = None) -> None:
        self._history.append(_Undo(what, dict(self.decided), len(self.log), revert,
                                   self.blocks_removed))

    def _fail_preflight(self, verdict: Verdict) -> bool:
        where = " ".join(x for x in (verdict.module, verdict.location) if x)
        return self._fail(f"pre-flight failed{' in ' + where if where else ''}: {verdict.error}")

    def _fail(self, text: str) -> bool:
        self.message = Message("error", text)
        return False

    def _apply(self, removal: Removal, accepted: list[Proposal],
               count: int | Counts | None, verdict: Verdict) -> bool:
        if not verdict.ok:
            return self._fail_preflight(verdict)
        before = self.params
        state = (dict(self.decided), len(self.log), self.blocks_removed)
        try:
            applied = self.pruner.apply(removal)
        except PruneError as exc:
            return self._fail(str(exc))
        title = "; ".join(p.title for p in accepted)
        self._history.append(_Undo(f"accepted {title}", *state[:2], self._undo_apply,
                                   state[2]))
        for p in accepted:
            self._log_accept(p, removal, count, applied)
        self.graph = self._model_graph()
        self.message = Message("success", f"accepted {len(accepted)} group(s): params "
                                          f"{before:,} -> {self.params:,}")
        return True

    def _undo_apply(self) -> None:
        self.pruner.undo()

    def _log_accept(self, p: Proposal, removal: Removal, count: int | Counts | None,
                    applied: Applied) -> None:
        for q in [p, *p.partners]:
            self.decided[q.key] = Decision.ACCEPTED.value
            removed = {a: removal.picks.get((q.group.id, a), []) for a in q.axes}
            self.log.append({"group": q.group.title, "key": list(q.key),
                             "axes": [{"role": q.group.axes[a].role,
                                       "size": q.group.axes[a].size, "removed": idx}
                                      for a, idx in removed.items()],
                             "count": count if not isinstance(count, dict) else
                             {str(k): v for k, v in count.items()},
                             "attributes": applied.attributes})


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


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


__all__ = ["Decision", "Message", "Proposal", "Session", "layer_widths", "message_dict"]
