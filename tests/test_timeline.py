"""One timeline of edits (`prune/history.py`), one home of decisions and of settings, a typed
action log: every edit kind undone exactly, analyses and caches taken back, plans made from it."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from explorer.app import actions
from explorer.app.session import Session
from explorer.coupling.vocab import HeadMode
from explorer.io.plan import Plan
from explorer.io.specs import load_model
from explorer.prune.decisions import Decision
from explorer.prune.history import EditKind
from explorer.prune.pruner import Pruner
from explorer.prune.settings import Settings, head_mode


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_every_edit_kind_is_one_typed_entry_undone_exactly() -> None:
    """A cut, a block removal and a plan replay are three edits of one timeline; undo takes
    each back, with the analysis (and so its version and cached proposals) of before it.
    Before the timeline, a block removal re-traced the model and dropped every earlier undo
    snapshot, so undoing it gave a new version and re-planned proposals."""
    lm = load_model("demo:dino_vit_safe")
    s = Session(lm.model, lm.example_inputs, spec="demo:dino_vit_safe")
    start, first = s.version, s.proposals()
    before = _state(s.model)
    assert s.accept(s.current())
    after_cut = s.version
    assert s.remove_block("blocks.1")
    kinds = [e.kind for e in s.pruner.history.edits]
    assert kinds == [EditKind.CUT, EditKind.BLOCKS]
    assert [bool(st.blocks) for st in s.plan().steps] == [False, True]
    assert s.undo() and s.version == after_cut  # the analysis of before, not a re-trace
    assert s.undo() and s.version == start
    assert s.proposals() == first  # the very proposals of that state: caches valid again
    assert all(torch.equal(before[k], v) for k, v in s.model.state_dict().items())

    text = Plan.from_pruner(_cut_once(), "demo:dino_vit_safe").to_dict()
    assert s.apply_plan(json.dumps(text))
    assert [e.kind for e in s.pruner.history.edits] == [EditKind.PLAN]
    with pytest.raises(ValueError, match="replayed a plan: that plan is its record"):
        s.plan()
    assert s.undo() and s.version == start and not s.pruner.history.edits
    assert all(torch.equal(before[k], v) for k, v in s.model.state_dict().items())


def _cut_once() -> Pruner:
    lm = load_model("demo:dino_vit_safe")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.25)
    assert p.step()
    return p


def test_decisions_have_one_home_and_proposals_are_immutable() -> None:
    """Accepted and rejected live in the pruner's `decisions` (accepts are its edits); a
    proposal is frozen, and says whether it was decided by asking them."""
    lm = load_model("demo:resnet")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5)
    props = iter(p.proposals())
    first = next(props)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.reason = "changed"  # type: ignore[misc]
    assert first.accept().ok and first.decided and first.applied is not None
    with pytest.raises(RuntimeError, match="already accepted or rejected"):
        first.accept()
    second = next(props)
    second.reject()
    assert second.decided and second.applied is None
    assert p.decisions.by_key() == {first.key: Decision.ACCEPTED, second.key: Decision.REJECTED}
    assert p.decisions.titles() == [f"accepted {first.title}", f"rejected {second.title}"]
    assert p.undo_decision() == f"rejected {second.title}" and not second.decided
    assert p.undo_decision() == f"accepted {first.title}" and not first.decided
    assert p.undo_decision() is None and not p.applied


def test_settings_are_one_frozen_validated_record() -> None:
    """The pruner's keywords build one `Settings`; a change makes a new one, checked again."""
    lm = load_model("demo:mlp")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.3, heads="whole", round_to=4)
    assert p.config == Settings(ratio=0.3, heads=HeadMode.WHOLE, round_to=4)
    assert p.config.heads is HeadMode.WHOLE and p.heads == "whole"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.config.ratio = 0.9  # type: ignore[misc]
    p.configure(ratio=0.5)
    assert p.ratio == 0.5 and p.settings()[:3] == ("magnitude", 0.5, "whole")
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\), got 1.5"):
        p.configure(ratio=1.5)
    assert p.ratio == 0.5  # unchanged on a bad setting
    with pytest.raises(ValueError, match="heads must be one of"):
        head_mode("some")
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        Settings(round_to=0)
    with pytest.raises(ValueError, match="unknown compensation 'ols'"):
        Settings(compensate="ols")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_macs is a fraction of the original"):
        Settings(target_macs=2.0)


@pytest.mark.parametrize("action", [
    actions.Configure(["magnitude", 0.25, "whole", False, 1, ["mlp"]]),
    actions.Accept([".fc1", 0, 0], True, [[0, 3]]), actions.AcceptAll(),
    actions.Reject([[".fc1", 0, 0]]), actions.Undo(), actions.Block("blocks.1"),
    actions.PlanReplay("{}"),
], ids=lambda a: a.kind.value)
def test_action_log_is_typed_and_round_trips_as_json(action: actions.Action) -> None:
    entry = actions.to_json(action)
    assert entry["do"] == action.kind.value and actions.problem(entry) is None
    assert actions.parse(entry) == action


def test_action_log_names_what_is_not_an_action() -> None:
    assert actions.problem(["do"]) == "list \"['do']\" is not an action object"
    assert actions.problem({"do": "explode"}) == "unknown action 'explode'"
    assert actions.problem({"do": "block"}) == "action 'block' without a str field 'name'"
    old = actions.parse({"do": "accept", "key": ["blocks", 1]})  # older logs: no joint, counts
    assert old == actions.Accept(["blocks", 1], False, None)
