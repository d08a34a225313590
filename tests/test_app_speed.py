"""The app's session, fast: a reopened session redoes its recorded cuts exactly, without
choosing them again; the quality after an accept is the cost measured before it.

Each accept's log entry carries what it cut (`explorer.io.plan.step_record`: tensors, dims,
removed indices, attributes), so a replay (`Session.replay`) redoes the cuts as recorded: no
scoring, no pre-flight, no analysis between them (`History.recut`), one trace at the end.
The replayed session must equal the live one (tensors, config, analysis, history, log,
undo); a log of an older version (no recorded cuts) still replays by choosing again; a
recorded cut that does not fit falls back to choosing again, one that breaks the forward
restores nothing and says so.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from explorer.app.session import Session
from explorer.io.specs import load_model
from explorer.prune import importance
from explorer.prune.preflight import Preflight, meta_copy
from explorer.prune.pruner import Pruner
from explorer.prune.removal import PruneError, Removal, apply_removal
from explorer.prune.uniform import breaks_uniform, differing, same_cut_everywhere, shapes_by_kind
from explorer.quality import probe

LLAMA = ("hf:llama?hidden_size=64&num_hidden_layers=4&num_attention_heads=4"
         "&num_key_value_heads=2&intermediate_size=96&vocab_size=128")


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    torch.manual_seed(0)
    lm = load_model(LLAMA, device="cpu")
    return lm.model, tuple(lm.example_inputs)


def _state(pe: Session) -> dict[str, Any]:
    model = pe.model
    return {
        "tensors": {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()},
        "settings": {(n, k): v for n, m in model.named_modules() for k, v in vars(m).items()
                     if not k.startswith("_") and isinstance(v, (int, float, str, tuple, list))},
        "config": model.config.to_dict(),
        # the live accept keeps its pre-flight's trace (on meta), a replay traces on cpu (a
        # few device ops differ): the same named shapes, and the same groups below
        "graph": [(v.name, v.shape) for v in pe.pruner.graph.values.values() if v.name],
        "groups": [(g.key, g.title, [(a.role, a.size) for a in g.axes])
                   for g in pe.pruner.coupling.groups],
        "pending": [(p.key, [(c.axis, c.removed) for c in p.changes]) for p in pe.proposals()],
        "log": copy.deepcopy(pe.log), "decided": dict(pe.decided), "history": pe.history,
        "params": pe.params, "macs": pe.macs, "version": pe.version,
        "plan": pe.plan().to_dict(), "note": pe.config_note,
    }


@pytest.fixture(scope="module")
def live(llama: tuple[torch.nn.Module, tuple[Any, ...]]) -> tuple[Session, dict[str, Any]]:
    """The live session of `_live` and its state (the test that undoes on it runs last)."""
    pe = _live(*llama)
    return pe, _state(pe)


def _same_values(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ours, theirs = a.state_dict(), b.state_dict()
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name


def _live(model: torch.nn.Module, inputs: tuple[Any, ...]) -> Session:
    """A session with accepts (one resized, one of a layered group's layer), a reject and an
    undo of a later accept."""
    pe = Session(model, inputs, spec=LLAMA, heads="whole")
    first = pe.proposals()
    assert pe.accept(first[0])
    assert pe.accept(pe.proposals()[0], 2)
    pe.reject(pe.proposals()[0])
    assert pe.accept(pe.proposals()[0])
    assert pe.undo()
    assert pe.accept(pe.proposals()[-1])
    return pe


def test_an_old_log_without_recorded_cuts_replays_by_choosing_again(
        llama: tuple[torch.nn.Module, tuple[Any, ...]],
        live: tuple[Session, dict[str, Any]]) -> None:
    model, inputs = llama
    pe, state = live
    old = [{k: v for k, v in a.items() if k not in ("cut", "what")} for a in pe.actions]
    again = Session(model, inputs, spec=LLAMA, heads="whole")
    assert again.replay(old) == len(old)
    ours, theirs = _state(again), dict(state)
    # choosing again resizes by the logged {axis: count}, where the live accept had the int
    assert [{**line, "count": None} for line in ours.pop("log")] == \
        [{**line, "count": None} for line in theirs.pop("log")]
    assert ours == theirs
    _same_values(again.model, pe.model)


def _bad_log(llama: tuple[torch.nn.Module, tuple[Any, ...]],
             live: tuple[Session, dict[str, Any]]
             ) -> tuple[list[dict[str, Any]], dict[str, Any], Session]:
    """A copy of the live session's log, its first accept's recorded cut (to spoil), and a
    fresh session on the model to replay it into."""
    model, inputs = llama
    bad = copy.deepcopy(live[0].actions)
    first = next(a for a in bad if a["do"] == "accept")
    return bad, first["cut"]["step"], Session(model, inputs, spec=LLAMA, heads="whole")


def test_a_recorded_cut_that_does_not_fit_is_chosen_again(
        llama: tuple[torch.nn.Module, tuple[Any, ...]],
        live: tuple[Session, dict[str, Any]]) -> None:
    bad, step, again = _bad_log(llama, live)
    step["tensors"][0]["size_before"] += 1  # as if the model had changed
    assert again.replay(bad) == len(bad)
    assert _state(again) == live[1]


def test_a_recorded_cut_that_breaks_the_forward_restores_nothing(
        llama: tuple[torch.nn.Module, tuple[Any, ...]],
        live: tuple[Session, dict[str, Any]]) -> None:
    bad, step, again = _bad_log(llama, live)
    step["tensors"] = step["tensors"][:1]  # one member of a coupled group cut alone
    step["attributes"] = {}
    fresh = _state(again)
    assert again.replay(bad) == 0
    assert again.message is not None
    assert again.message.text.startswith("restored no decisions: the recorded cuts do not run "
                                          "on this model (")
    assert _state(again) == fresh and again.actions == []


def test_a_replay_stopped_by_a_stale_decision_settles_the_cuts_before_it(
        llama: tuple[torch.nn.Module, tuple[Any, ...]],
        live: tuple[Session, dict[str, Any]]) -> None:
    model, inputs = llama
    accepts = [a for a in live[0].actions if a["do"] == "accept"][:2]
    again = Session(model, inputs, spec=LLAMA, heads="whole")
    assert again.replay([*accepts, {"do": "reject", "keys": [["nowhere", 0, 0]]}]) == 2
    assert again.message is not None and again.message.text == (
        "replayed 2 of 3 decisions; decision 3 (reject) no longer applies: its group is not "
        "pending")
    history = again.pruner.history
    assert not history._unsettled and history.now.graph is not None  # config and analysis
    twice = Session(model, inputs, spec=LLAMA, heads="whole")
    assert twice.replay(accepts) == 2
    assert again.model.config.to_dict() == twice.model.config.to_dict()
    assert again.history == twice.history


def test_a_replayed_criterion_switch_scores_once_when_asked(
        llama: tuple[torch.nn.Module, tuple[Any, ...]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A logged switch to a data-aware criterion runs no calibration pass while the log
    replays: the proposals of the state it ends in are scored when first asked for."""
    model, inputs = llama
    live = Session(model, inputs, spec=LLAMA)
    assert live.accept(live.proposals()[0])
    assert live.configure("wanda", live.ratio, live.heads)
    assert live.accept(live.proposals()[0])
    expected = [p.key for p in live.proposals()]
    passes: list[int] = []
    original = importance.activation_norms
    monkeypatch.setattr(importance, "activation_norms",
                        lambda *a, **k: passes.append(1) or original(*a, **k))
    again = Session(model, inputs, spec=LLAMA)
    assert again.replay(live.actions) == len(live.actions)
    assert passes == [] and again.importance == "wanda"
    assert [p.key for p in again.proposals()] == expected
    assert passes == [1]
    _same_values(again.model, live.model)


def test_groups_are_scored_once_per_model_state_and_settings(
        llama: tuple[torch.nn.Module, tuple[Any, ...]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The proposals and the statement of what the settings cut read the same scores; an
    accept or a settings change scores again."""
    model, inputs = llama
    pe = Session(model, inputs, spec=LLAMA)
    scored: list[str] = []
    original = importance.Magnitude.scores
    monkeypatch.setattr(importance.Magnitude, "scores", lambda self, m, c, g: scored.append(
        g.title) or original(self, m, c, g))
    pending = pe.proposals()
    groups = len(scored)
    assert groups == len(pending) > 1
    assert pe.statement().params_after < pe.params
    pe.pruner.common_fraction([pending[0].removal()])
    assert len(scored) == groups  # nothing scored again
    assert pe.accept(pending[0])
    pe.proposals()
    assert len(scored) == 2 * groups  # the new state: every group scored once
    pe.statement()
    assert pe.configure("magnitude", 0.25, pe.heads)
    assert len(scored) == 3 * groups


def test_breaks_uniform_reads_the_shapes_a_cut_would_make(
        llama: tuple[torch.nn.Module, tuple[Any, ...]]) -> None:
    """`breaks_uniform` predicts the shapes from the kept indices (no copy is cut): the same
    lines as cutting a weightless copy, for every proposal and the same cut in all layers."""
    model, inputs = llama
    pe = Session(model, inputs, spec=LLAMA, heads="whole")
    pending = pe.proposals()
    same = same_cut_everywhere(pending[1], pending)
    assert same is not None
    for p in [*pending, same]:
        trial = meta_copy(pe.model)
        apply_removal(trial, pe.graph.coupling, p.removal())
        cut = differing(shapes_by_kind(trial))
        assert breaks_uniform(pe.model, pe.graph.coupling, p.removal()) == cut
    assert breaks_uniform(pe.model, pe.graph.coupling, same.removal()) == []
    assert breaks_uniform(pe.model, pe.graph.coupling, pending[1].removal()) != []
    with pytest.raises(PruneError, match="group 999 does not exist"):
        breaks_uniform(pe.model, pe.graph.coupling, Removal({(999, 0): [0]}))


@pytest.mark.parametrize("refit", ["none", "bias"])
def test_the_quality_after_an_accept_is_the_cost_measured_before_it(
        llama: tuple[torch.nn.Module, tuple[Any, ...]], refit: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No forward measures the model an accept made when its cost was measured on the same
    cut (a refit changes the weights: then it is measured)."""
    model, inputs = llama
    pe = Session(model, inputs, spec=LLAMA)
    assert pe.set_compensation(refit)
    p = pe.proposals()[0]
    cost = pe.proposal_cost(p, {})  # what the Groups page shows (the counts on screen)
    assert cost is not None and pe.quality() is not None
    forwards: list[int] = []
    compare = probe.compare
    monkeypatch.setattr(probe, "compare", lambda *a, **k: forwards.append(1) or compare(*a, **k))
    assert pe.accept(p, {})
    after = pe.quality()
    assert forwards == ([] if refit == "none" else [1])
    assert (after is cost) == (refit == "none")
    measured = probe.QualityProbe(pe.original, pe.measures._probe.data).current(  # type: ignore[union-attr]
        pe.model, "again")
    assert measured == after


def test_replayed_cuts_equal_the_live_session(
        llama: tuple[torch.nn.Module, tuple[Any, ...]], live: tuple[Session, dict[str, Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """(Last: it undoes on the shared live session.)"""
    model, inputs = llama
    live_pe, state = live
    accepts = [a for a in live_pe.actions if a["do"] == "accept"]
    assert len(accepts) == 4 and all("step" in a["cut"] for a in accepts)
    assert [a for a in live_pe.actions if a["do"] == "reject"][0]["what"].startswith("rejected ")
    again = Session(model, inputs, spec=LLAMA, heads="whole")
    calls: list[str] = []
    for cls, name in ((Pruner, "pending"), (Preflight, "check")):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *a, _f=original, _n=name, **k:
                            calls.append(_n) or _f(*a, **k))
    assert again.replay(live_pe.actions) == len(live_pe.actions)
    assert calls == []  # nothing scored, nothing pre-flown: the cuts as recorded
    assert again.message is not None and again.message.text == \
        f"restored {len(live_pe.actions)} decisions"
    assert _state(again) == state == _state(live_pe)
    _same_values(again.model, live_pe.model)
    assert again.actions == live_pe.actions  # the reopened session saves the same log
    # undo takes back a replayed cut exactly, the config included
    assert again.undo() and live_pe.undo()
    assert _state(again) == _state(live_pe)
    _same_values(again.model, live_pe.model)
    monkeypatch.undo()
    assert again.undo() and live_pe.undo()
    assert _state(again) == _state(live_pe)


def _scores(pruner: Pruner) -> dict[tuple[Any, ...], Any]:
    return {(c.group.key, c.axis): c.scores for c in pruner.candidates()[0]}


def test_activation_scores_follow_a_cut_and_its_undo_without_a_calibration_pass(
        llama: tuple[torch.nn.Module, tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    """In a session (``remeasure`` off) an accept carries the activation norms through the
    cut: kept channels keep their scores, no calibration pass runs, an undo finds the scores
    of before; the CLI's steps (``remeasure`` on) measure again."""
    model, inputs = copy.deepcopy(llama[0]), llama[1]
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randint(0, 128, (4, 12), generator=gen),) for _ in range(2)]
    from explorer.prune.calibration import Calibration
    data = Calibration(calib)
    passes = [0]
    norms = importance.activation_norms

    def counted(*a: Any, **k: Any) -> Any:
        passes[0] += 1
        return norms(*a, **k)

    monkeypatch.setattr(importance, "activation_norms", counted)
    pruner = Pruner(model, inputs, importance="activation", ratio=0.25, calibration=data)
    pruner.remeasure = False
    before = _scores(pruner)
    assert passes[0] == 1
    mlp = next(p for p in pruner.pending() if "mlp" in p.group.title)
    axis, removed = mlp.axes[0], set(mlp.changes[0].removed)
    assert pruner.accept(mlp).ok
    after = _scores(pruner)
    assert passes[0] == 1  # carried, not measured again
    key = (mlp.group.key, axis)
    kept = [i for i in range(len(before[key])) if i not in removed]
    assert after[key].tolist() == pytest.approx(before[key][kept].tolist(), rel=1e-6)
    for k, v in before.items():  # groups the cut did not touch score as before
        if k != key and k in after and len(after[k]) == len(v) and "mlp" in k[0][0]:
            assert after[k].tolist() == pytest.approx(v.tolist(), rel=1e-6)
    pruner.undo()
    undone = _scores(pruner)
    assert undone.keys() == before.keys()
    for k, v in before.items():
        assert undone[k].tolist() == pytest.approx(v.tolist(), rel=1e-6)
    assert passes[0] == 1
    pruner.remeasure = True  # the CLI's iterative steps measure on the pruned model
    assert pruner.accept(next(p for p in pruner.pending() if "mlp" in p.group.title)).ok
    _scores(pruner)
    assert passes[0] == 2


def test_an_accept_rescores_only_the_layers_its_cut_replaced(
        llama: tuple[torch.nn.Module, tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Carrying the activation norms through an accept re-scored every layer of the model
    (211 on SmolLM2, about 0.4 s of each Accept) when the cut replaced three: the others keep
    their scores, which equal a full re-scoring."""
    model, inputs = copy.deepcopy(llama[0]), llama[1]
    gen = torch.Generator().manual_seed(1)
    from explorer.prune.calibration import Calibration
    data = Calibration([(torch.randint(0, 128, (4, 12), generator=gen),) for _ in range(2)])
    pruner = Pruner(model, inputs, importance="activation", ratio=0.25, calibration=data)
    pruner.remeasure = False
    _scores(pruner)
    crit = pruner.criterion
    assert isinstance(crit, importance.Activation)
    scored: list[str] = []
    add = importance.Activation.add_statistics

    def counted(self: importance.Activation, modules: Any, norms: dict[str, Any]) -> None:
        scored.extend(norms)
        add(self, modules, norms)

    monkeypatch.setattr(importance.Activation, "add_statistics", counted)
    mlp = next(p for p in pruner.pending() if "layers.1.mlp" in p.group.title)
    assert pruner.accept(mlp).ok
    after = _scores(pruner)
    assert sorted(scored) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj",
                              "model.layers.1.mlp.up_proj"]
    crit._made.clear()  # score every layer again from the same norms
    scored.clear()
    assert crit.follow(pruner.model, pruner.applied)
    assert len(scored) == len(crit._layers) > 3
    again = _scores(pruner)
    assert again.keys() == after.keys()
    for k, v in again.items():
        assert after[k].tolist() == v.tolist(), k
