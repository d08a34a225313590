"""The interactive pruning session behind the app: propose, accept, reject, undo.

Streamlit-free on purpose (the app's pages only draw it), so every transition is unit-tested
without a browser. A session owns a private copy of the model's modules that shares its
weights (`workspace.working_copy`: cuts replace tensors, never write into them); the pristine
model it was made from is never touched.

The session is a coordinator: proposals, pre-flight, joint sets, application, the timeline
of edits and its exact undo are the `Pruner`'s (`explorer.prune`: `history`, `decisions`),
plans are `explorer.io.plan`'s and exports `explorer.io.export`'s; what the pages read is its
`Workspace`'s. It adds the transitions a person deciding one group at a time makes, one
`Message` after each, and the typed action log (`actions`) that replays them.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from ..graph.walk import to_device
from ..io.plan import Plan, PlanError, redo_step, step_record
from ..prune.compensate import compensation
from ..prune.decisions import Decision
from ..prune.depth import remove_blocks
from ..prune.joint import solve
from ..prune.preflight import Verdict, forward_check, meta_copy, shared_clone
from ..prune.proposal import Counts, Proposal
from ..prune.removal import PruneError, Removal
from ..prune.sensitivity import Progress
from ..prune.uniform import SAME_CUT
from .actions import (
    Accept,
    AcceptAll,
    Action,
    Block,
    Compensate,
    Configure,
    PlanReplay,
    Reject,
    Undo,
    to_json,
)
from .actions import parse as parse_action
from .actions import problem as action_problem
from .messages import Message, MessageKind, failure
from .workspace import Workspace, layer_widths

_P = ParamSpec("_P")
_R = TypeVar("_R")


def transition(method: Callable[Concatenate[Session, _P], _R]
               ) -> Callable[Concatenate[Session, _P], _R]:
    """Run ``method`` holding the session's lock: two tabs share one live session (the
    registry), so two clicks at once must not interleave their changes to the model."""
    @functools.wraps(method)
    def locked(self: Session, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            return method(self, *args, **kwargs)
    return locked


class Session(Workspace):
    """One user's interactive pruning of one model copy: the transitions and the action log
    over a `Workspace` (see there for the arguments)."""

    def _started(self) -> None:
        self.message: Message | None = None
        self._actions: list[Action] = []  # what the user did, replayable (`replay`)
        self._replaying = False  # settings change without scoring while a log replays
        self.on_action: Callable[[Session], None] | None = None  # e.g. save the log to disk

    @transition
    def configure(self, importance: str, ratio: float, heads: str,
                  global_pruning: bool | None = None, round_to: int | None = None,
                  targets: tuple[str, ...] | list[str] | None = None,
                  progress: Progress | None = None) -> bool:
        """Change the pruning settings and recompute the proposals (``progress`` is told how
        far a data-aware criterion's calibration passes are).

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
        if self._replaying:  # scored when a page first asks for proposals, at the end state
            *rest, targets_now = self.settings()
            self._record(Configure([*rest, list(targets_now)]))
            return True
        self.pruner.criterion.progress = progress
        try:
            self.pruner.pending()
        except Exception as exc:  # noqa: BLE001 - a criterion may need weights or data
            self.pruner.configure(*old)
            return self._fail(f"cannot use {importance!r} here: {exc}")
        finally:
            self.pruner.criterion.progress = None
        *rest, targets_now = self.settings()
        self._record(Configure([*rest, list(targets_now)]))
        return True

    # ------------------------------------------------------------------ transitions
    @transition
    def set_compensation(self, name: str) -> bool:
        """Refit the consumers of removed channels after each accept (``--compensate``'s
        choices: "none", "bias", "lstsq"); False and an error message for another name."""
        try:
            mode = compensation(None if name == "none" else name)
        except ValueError as exc:
            return self._fail(str(exc))
        if mode != self.pruner.compensate:
            self.pruner.compensate = mode
            self.message = Message.info(f"accepts now refit with {name}" if mode else
                                        "accepts no longer refit the consumers")
            self._record(Compensate(name))
        return True

    @transition
    def accept(self, proposal: Proposal, count: int | Counts | None = None) -> bool:
        """Pre-flight and apply one proposal (``count`` resizes its axes, see `removal`)."""
        if self._stale(proposal):
            return False
        try:
            removal = proposal.removal(count)
        except (TypeError, ValueError) as exc:
            return self._fail(f"invalid count: {exc}")
        if not removal:
            return self._fail("nothing to remove: the count is 0")
        cost_key = self._cost_key(proposal, {proposal.axes[0]: count} if isinstance(count, int)
                                  else dict(count or {}))
        ok = self._apply(removal, [proposal], count, self.preflight(proposal, count))
        if ok and self.pruner.compensate is None and not self.applied[-1].constants:
            self.measures.adopt(cost_key, self.version)  # the cost measured is its quality
        if ok:
            counts = {proposal.axes[0]: count} if isinstance(count, int) else count
            same = proposal.reason == SAME_CUT  # partners named: replay rebuilds the set
            self._record(Accept(list(proposal.key),
                                (proposal.joint or proposal.fallback) and not same,
                                None if counts is None else
                                [[int(a), int(n)] for a, n in counts.items()],
                                [list(k) for k in proposal.keys[1:]] if same else None,
                                self._cut_record()))
        return ok

    def _cut_record(self) -> dict[str, Any] | None:
        """The last edit (an accept's cut) as a replay redoes it exactly (`actions.Accept`'s
        ``cut``); None after a refit, whose new values no record holds."""
        edit = self.pruner.history.edits[-1]
        step = None if self.pruner.compensate is not None else step_record(edit.applied)
        if step is None:
            return None
        return {"step": step, "what": edit.what, "keys": [list(k) for k in edit.keys],
                "titles": list(edit.titles), "report": list(edit.report)}

    @transition
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

    @transition
    def reject(self, proposal: Proposal) -> None:
        """Keep the group(s) as they are; not proposed again (until undo)."""
        if self._stale(proposal):
            return
        self.pruner.reject(proposal)
        self.message = Message.info(f"rejected {proposal.title}")
        self._record(Reject([list(k) for k in proposal.keys], f"rejected {proposal.title}"))

    @transition
    def undo(self) -> bool:
        """Revert the last accept, reject, block removal or plan replay exactly."""
        what = self.pruner.undo_decision()
        if what is None:
            self.message = Message.error("nothing to undo")
            return False
        self.message = Message.info(f"undone: {what}")
        self._record(Undo())
        return True

    @transition
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
        self.message = Message.success(f"removed block {name}: params {before:,} -> "
                                          f"{self.params:,}")
        self._record(Block(name))
        return True

    @transition
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

        self.message = Message.success(f"replayed a plan of {len(plan.steps)} step(s): "
                                          f"params {before:,} -> {self.params:,}")
        self._record(PlanReplay(text if isinstance(text, str) else text.decode()))
        return True

    # ------------------------------------------------------------------ replay
    @transition
    def replay(self, actions: list[Any], progress: Progress | None = None) -> int:
        """Redo recorded ``actions`` (from `actions` of an earlier session on the same model).

        An entry that is not an action the session records (a hand-edited log) is skipped
        and named in `message`. Replay stops at the first action that no longer applies
        (the model or code changed) and says so in `message`. Returns how many actions were
        replayed.
        """
        skipped: list[str] = []
        done = 0
        start = (len(self.pruner.history.edits), len(self.pruner.decisions.rejected),
                 len(self._actions))
        self._replaying = True
        try:
            done = self._replay(actions, skipped, progress)
        finally:
            self._replaying = False
        problem = self._settle(start)  # also after a decision that no longer applies
        if problem is not None:
            self.message = Message.error(f"restored no decisions: {problem}")
            return 0
        if done < 0:  # `message` says which decision stopped it
            return -done - 1
        if skipped:
            self.message = Message.error("; ".join([f"restored {done} of {len(actions)} "
                                                    "decisions", *skipped]))
        elif actions:
            self.message = Message.info(f"restored {len(actions)} decisions")
        return done

    def _settle(self, start: tuple[int, int, int]) -> str | None:
        """After a replay: the config follows the redone cuts and the model is analysed (a
        recorded cut that breaks the forward is found here); on a failure every edit the
        replay made is undone and why is returned."""
        history = self.pruner.history
        try:
            history.settle()
            history.graph  # noqa: B018 - traced now, once, for the state the replay ends in
            return None
        except Exception as exc:  # noqa: BLE001 - a log's cuts that no longer run
            while len(history.edits) > start[0]:
                self.pruner.undo()
            del self.pruner.decisions.rejected[start[1]:]
            del self._actions[start[2]:]
            return f"the recorded cuts do not run on this model ({exc})"

    def _replay(self, actions: list[Any], skipped: list[str], progress: Progress | None
                ) -> int:
        """`replay`'s loop: how many were replayed, or -(done + 1) when one no longer
        applies (`message` says which)."""
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
                return -done - 1
            done += 1
        return done

    @transition
    def redo_accept(self, key: tuple[Any, ...], joint: bool, counts: dict[int, int] | None,
                    same_cut: list[list[Any]] | None = None,
                    cut: dict[str, Any] | None = None) -> bool:
        """Accept the pending proposal of group ``key`` again (its joint or outer-axis
        proposal when ``joint``; with the groups ``same_cut`` names as the same cut in other
        layers, `explorer.prune.uniform`), resized by ``counts`` (a replayed `actions.Accept`).

        With ``cut`` (what the accept cut, recorded) the cut is redone exactly as recorded:
        no scoring, no pre-flight, no analysis until the replay ends (`replay`); a record that
        does not fit the model falls back to choosing again."""
        if cut is not None and self._recut(cut):
            self._record(Accept(list(key), joint, None if counts is None else
                                [[int(a), int(n)] for a, n in counts.items()], same_cut, cut))
            return True
        p = self._pending_by_key(key)
        if p is not None and joint:
            p = self.joint(p)
        if p is not None and same_cut is not None:
            found = [self._pending_by_key(tuple(k)) for k in same_cut]
            partners = [q for q in found if q is not None]
            p = dataclasses.replace(p, partners=partners, reason=SAME_CUT) \
                if len(partners) == len(found) else None
        if p is None:
            return self._fail("its group is not pending")
        return self.accept(p, counts)

    @transition
    def redo_reject(self, key: tuple[Any, ...], keys: list[list[Any]] | None = None,
                    what: str | None = None) -> bool:
        """Reject the pending proposal of group ``key`` again (a replayed `actions.Reject`);
        with its ``keys`` and ``what`` recorded, those groups without proposing again."""
        if keys is not None and what is not None:
            decided = [(str(k[0]), int(k[1]), int(k[2])) for k in keys]
            self.pruner.decisions.reject(self.version, decided, what)
            self.message = Message.info(what)
            self._record(Reject([list(k) for k in decided], what))
            return True
        p = self._pending_by_key(key)
        if p is None:
            return self._fail("its group is not pending")
        self.reject(p)
        return True

    def _recut(self, cut: dict[str, Any]) -> bool:
        """Redo a recorded accept (`actions.Accept`'s ``cut``); False, changing nothing, when
        the record does not fit the model as it is."""
        before = self.params
        try:
            keys = [(str(k[0]), int(k[1]), int(k[2])) for k in cut["keys"]]
            what, titles = str(cut["what"]), [str(t) for t in cut["titles"]]
            lines = [dict(line) for line in cut["report"]]
        except (KeyError, TypeError, ValueError, IndexError):
            return False
        for settle in (False, True):  # recorded after the config followed the cuts before
            if settle:
                self.pruner.history.settle()
            try:
                self.pruner.recut(lambda model: redo_step(model, cut["step"]), what, keys,
                                  titles, lines)
            except (KeyError, TypeError, ValueError, IndexError):  # PlanError, PruneError
                continue
            self.message = Message.success(f"{what}: params {before:,} -> {self.params:,}")
            return True
        return False

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
    def _check_blocks(self, names: list[str], tuple_output: bool) -> Verdict:
        """Run a copy with ``names`` skipped (on meta when the model runs there)."""
        device = self.pruner.preflight().device
        trial = meta_copy(self.model) if device == "meta" else shared_clone(self.model)
        remove_blocks(trial, names, dict.fromkeys(names, tuple_output))
        return forward_check(trial, to_device(self.example_inputs, device), self.output_shapes)

    def _stale(self, proposal: Proposal) -> bool:
        """Whether ``proposal`` was made for another state of the model (another tab of this
        session changed it since this page was drawn); says so in `message`."""
        if proposal.pruner is None or proposal.version == self.version:
            return False
        self.message = Message.error(f"not applied: {proposal.title} was proposed for an "
                                     "earlier state of the model (changed in another tab); "
                                     "the page now shows the current proposals")
        return True

    def _fail_preflight(self, verdict: Verdict) -> bool:
        return self._fail(failure(verdict))

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
        groups = sum(len(p.keys) for p in accepted)  # a joint proposal covers its partners
        self.message = Message.success(f"accepted {groups} group(s): params "
                                       f"{before:,} -> {self.params:,}")
        return True


__all__ = ["Decision", "Message", "MessageKind", "Proposal", "Session", "Workspace",
           "action_problem", "layer_widths"]
