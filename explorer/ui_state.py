"""The interactive pruning session behind the app: propose, accept, reject, undo.

Streamlit-free on purpose (the app's pages only draw it), so every transition is unit-tested
without a browser. A session owns a private copy of the model; the pristine model it was
made from is never touched.

A group is known across re-traces by its `group_key` (first member parameter and dim), since
group ids change whenever a prune changes the graph.
"""
from __future__ import annotations

import copy
import io
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .api import ModelGraph
from .groups import Group
from .importance import scores as importance_scores
from .metrics import count_macs, count_params
from .preflight import Preflight
from .prune import PruneError, Removal, apply_removal
from .pruner import GroupChange, Pruner

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
    scores: list[np.ndarray]  # one per axis of the group (lower = less important)

    def removal(self, count: int | None = None) -> Removal:
        """The proposal as a `Removal`; ``count`` resizes the primary axis (k lowest scores)."""
        out = Removal()
        for n, (axis, change) in enumerate(zip(self.axes, self.changes)):
            idx = change.removed
            if n == 0 and count is not None:
                order = np.argsort(self.scores[axis], kind="stable")[:max(0, int(count))]
                idx = sorted(int(i) for i in order)
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
    decided: dict[GroupKey, str] = field(default_factory=dict)  # key -> "accepted"/"rejected"
    log: list[dict[str, Any]] = field(default_factory=list)  # accepted changes, for the report
    message: Message | None = None

    def __post_init__(self) -> None:
        self.model = copy.deepcopy(self.model)
        self.example_inputs = tuple(self.example_inputs)
        self._history: list[_Snapshot] = []
        self._proposals: list[Proposal] | None = None
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

    def configure(self, importance: str, ratio: float, heads: str) -> None:
        """Change the criterion, ratio or head mode; proposals are recomputed lazily."""
        if (importance, ratio, heads) != (self.importance, self.ratio, self.heads):
            self.importance, self.ratio, self.heads = importance, ratio, heads
            self._pruner = self._make_pruner(reuse=self._pruner)
            self._proposals = None

    def proposals(self) -> list[Proposal]:
        """Proposals for every prunable group not yet accepted or rejected."""
        if self._proposals is None:
            self._proposals = self._propose()
        return [p for p in self._proposals if p.key not in self.decided]

    def current(self) -> Proposal | None:
        """The next proposal to decide on, or None when every group is decided."""
        pending = self.proposals()
        return pending[0] if pending else None

    # ------------------------------------------------------------------ transitions
    def accept(self, proposal: Proposal, count: int | None = None) -> bool:
        """Pre-flight and apply one proposal (``count`` resizes its primary axis)."""
        try:
            removal = proposal.removal(count)
        except (TypeError, ValueError) as exc:
            return self._fail(f"invalid count: {exc}")
        if not removal:
            return self._fail("nothing to remove: the count is 0")
        return self._apply(removal, [proposal], count)

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
        """Restore the state before the last accept or reject."""
        if not self._history:
            self.message = Message("error", "nothing to undo")
            return False
        snap = self._history.pop()
        self.decided, self.log = snap.decided, snap.log
        if snap.model is not None:
            self.model = snap.model
            self._retrace()
        self.message = Message("info", "undone")
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

    def model_bytes(self) -> bytes:
        """The pruned module, ``torch.save``-d (load with ``torch.load(weights_only=False)``)."""
        buf = io.BytesIO()
        torch.save(self.model, buf)
        return buf.getvalue()

    def report(self) -> dict[str, Any]:
        """A JSON-ready record of the session: spec, settings, accepted changes, totals."""
        return {"spec": self.spec, "importance": self.importance, "ratio": self.ratio,
                "heads": self.heads, "params_before": self.params_start,
                "params_after": self.params, "macs_before": self.macs_start,
                "macs_after": self.macs, "accepted": self.log,
                "rejected": [list(k) for k, v in self.decided.items() if v == "rejected"]}

    # ------------------------------------------------------------------ internals
    def _trace(self) -> ModelGraph:
        pruner = Pruner(self.model, self.example_inputs, importance=self.importance,
                        ratio=self.ratio, heads=self.heads)
        return ModelGraph(pruner.graph, pruner.coupling)

    def _make_pruner(self, reuse: Pruner | None = None) -> Pruner:
        if reuse is not None:  # same model: keep its trace, only the settings change
            reuse.importance, reuse.ratio, reuse.heads = self.importance, self.ratio, self.heads
            return reuse
        return Pruner(self.model, self.example_inputs, importance=self.importance,
                      ratio=self.ratio, heads=self.heads)

    def _retrace(self) -> None:
        self._pruner = self._make_pruner()
        self.graph = ModelGraph(self._pruner.graph, self._pruner.coupling)
        self._proposals = None

    def _propose(self) -> list[Proposal]:
        removal, changes, _ = self._pruner.propose()
        by_group: dict[int, list[tuple[int, GroupChange]]] = {}
        for (gid, axis), change in zip(removal.picks, changes):  # appended in step
            by_group.setdefault(gid, []).append((axis, change))
        out = []
        for gid, picks in by_group.items():
            group = self.graph.coupling.groups[gid]
            s = importance_scores(self.importance, self.model, self.graph.coupling, group)
            out.append(Proposal(group, group_key(group), [c for _, c in picks],
                                [a for a, _ in picks], s))
        return out

    def _push(self, with_model: bool) -> None:
        self._history.append(_Snapshot(copy.deepcopy(self.model) if with_model else None,
                                       dict(self.decided), list(self.log)))

    def _fail(self, text: str) -> bool:
        self.message = Message("error", text)
        return False

    def _apply(self, removal: Removal, accepted: list[Proposal], count: int | None,
               flight: Preflight | None = None) -> bool:
        flight = flight or Preflight(self.model, self.example_inputs, self.graph.coupling)
        verdict = flight.check(removal)
        if not verdict.ok:
            where = " ".join(x for x in (verdict.module, verdict.location) if x)
            return self._fail(f"pre-flight failed{' in ' + where if where else ''}: "
                              f"{verdict.error}")
        before = self.params
        self._push(with_model=True)
        try:
            applied = apply_removal(self.model, self.graph.coupling, removal)
        except PruneError as exc:
            self._history.pop()
            return self._fail(str(exc))
        for p in accepted:
            self.decided[p.key] = "accepted"
            removed = {a: removal.picks.get((p.group.id, a), []) for a in p.axes}
            self.log.append({"group": p.group.title, "key": list(p.key),
                             "axes": [{"role": p.group.axes[a].role, "size": p.group.axes[a].size,
                                       "removed": idx} for a, idx in removed.items()],
                             "count": count, "attributes": applied.attributes})
        self._retrace()
        self.message = Message("success", f"accepted {len(accepted)} group(s): params "
                                          f"{before:,} -> {self.params:,}")
        return True


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
