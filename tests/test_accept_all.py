"""Accept all's fast path gives what the reference path gave.

Fast: the solver's passing pre-flight of the removal it returns carries the trace of the
pruned copy (`Solution.verdict`), so applying does not trace the model again when that copy
ran where the model runs (meta); the config search builds each set of values once and hands
back the build of its answer; meta builds skip the weight initialisers. Reference: the
session as it was (apply, then trace the model again) and the search as it was (one build
per trial, one more for the answer). Cut, model, config, analysis, session log, undo and
replay must be the same.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
from typing import Any

import pytest
import torch
from torch import nn

from explorer.app.session import Message, Session
from explorer.demos import dino
from explorer.graph.collector import paused
from explorer.graph.ir import Graph
from explorer.graph.tracer import trace
from explorer.graph.walk import tensor_leaves
from explorer.io.specs import load_model
from explorer.prune.fixups import hfconfig
from explorer.prune.joint import merge, solve
from explorer.prune.preflight import Verdict
from explorer.prune.pruner import Pruner
from explorer.prune.removal import Removal, apply_removal

LLAMA = ("hf:llama?hidden_size=64&num_hidden_layers=2&num_attention_heads=4"
         "&num_key_value_heads=2&intermediate_size=96&vocab_size=128")


class OtherLineAttention(dino.Attention):
    """DINO's attention reading ``C // num_heads`` on another line (as XCiT's class
    attention does beside its self-attention): the solver merges the two lines' sets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        head = C // self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, head).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C))


def _two_lines(device: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = dino.VisionTransformer(attn_cls=dino.Attention)
    model.blocks[2].attn = OtherLineAttention(dino.EMBED_DIM, dino.NUM_HEADS)
    return model.to(device), (torch.randn(1, 3, dino.IMG_SIZE, dino.IMG_SIZE, device=device),)


def _model(name: str, device: str) -> tuple[nn.Module, tuple[Any, ...]]:
    if name == "two_lines":
        return _two_lines(device)
    torch.manual_seed(0)
    lm = load_model(name, device=device)
    return lm.model, tuple(lm.example_inputs)


def _reference_accept_all(pe: Session) -> bool:
    """`Session.accept_all` as it was: the same solver, then an apply that traces the model
    again (a verdict without a graph)."""
    pending = pe.proposals()
    parts = {p.key: p.removal() for p in pending}
    sol = solve(pe.pruner.preflight(), parts, rescale=pe.pruner.common_fraction)
    unsafe = [f"{p.group.title} ({sol.unsafe[p.key].module} {sol.unsafe[p.key].location})"
              for p in pending if p.key in sol.unsafe]
    if not sol.safe:
        return pe._fail("no proposal passed the pre-flight: " + "; ".join(unsafe))
    safe = [p for p in pending if p.key in set(sol.safe)]
    ok = pe._apply(sol.removal(parts), safe, None, Verdict(True))
    if ok:
        pe._record({"do": "accept_all"})
    if ok and unsafe:
        pe.message = Message.info(f"accepted {len(safe)} groups; left unsafe: "
                                  + "; ".join(unsafe))
    return ok


def _graph(g: Graph) -> Graph:
    return dataclasses.replace(g, seconds=0.0)  # the one field two traces differ in


def _state(pe: Session) -> dict[str, Any]:
    """Everything Accept all decides: model tensors and settings, config, analysis, log."""
    model = pe.model
    config = getattr(model, "config", None)
    return {
        "tensors": {n: (tuple(t.shape), t.dtype, t.requires_grad)
                    for n, t in model.state_dict(keep_vars=True).items()},
        "settings": {(n, k): v for n, m in model.named_modules() for k, v in vars(m).items()
                     if not k.startswith("_") and isinstance(v, (int, float, str, tuple, list))},
        "config": config.to_dict() if hasattr(config, "to_dict") else None,
        "graph": _graph(pe.pruner.graph),
        "groups": [(g.key, g.title, [(a.role, a.size, a.prunable, a.inner) for a in g.axes],
                    g.modules) for g in pe.pruner.coupling.groups],
        "pending": [(p.key, [(c.axis, c.removed) for c in p.changes]) for p in pe.proposals()],
        "log": copy.deepcopy(pe.log), "actions": copy.deepcopy(pe.actions),
        "decided": dict(pe.decided), "message": pe.message, "history": pe.history,
        "applied": list(pe.applied), "params": pe.params, "macs": pe.macs,
        "version": pe.version,
    }


def _values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()
            if t.device.type != "meta"}


CASES = [  # (model, device, session settings)
    (LLAMA, "meta", {"heads": "dims"}),
    (LLAMA, "meta", {"heads": "whole", "round_to": 2}),
    (LLAMA, "cpu", {"heads": "dims", "global_pruning": True}),
    ("demo:dino_vit_safe", "meta", {"heads": "dims"}),
    ("demo:dino_vit_safe", "cpu", {"heads": "whole"}),
    # joint sets merged across two lines and cut at one fraction (random scores on meta)
    ("two_lines", "meta", {"heads": "dims", "global_pruning": True, "importance": "random"}),
    ("two_lines", "cpu", {"heads": "whole", "global_pruning": True}),
    # lowest indices on meta: some groups stay unsafe (bisection, a message naming them)
    ("two_lines", "meta", {"heads": "whole", "global_pruning": True}),
]


@pytest.mark.parametrize(("name", "device", "settings"), CASES,
                         ids=[f"{n.split('?')[0]}-{d}-{s['heads']}-{i}"
                              for i, (n, d, s) in enumerate(CASES)])
def test_accept_all_equals_the_reference_path(name: str, device: str,
                                              settings: dict[str, Any]) -> None:
    model, inputs = _model(name, device)
    fast, ref = (Session(model, inputs, spec=name, **settings) for _ in range(2))
    before = _state(fast)
    assert _state(ref) == before
    assert fast.accept_all()
    assert _reference_accept_all(ref)
    after = _state(fast)
    assert after == _state(ref)
    assert after["tensors"] != before["tensors"]  # it did cut
    assert fast.proposals() == [p for p in fast.pruner.pending() if p.key not in fast.decided]
    assert _values(fast.model).keys() == _values(ref.model).keys()
    for n, t in _values(fast.model).items():
        assert torch.equal(t, _values(ref.model)[n]), n
    if device == "cpu":
        with torch.no_grad():
            outs = [[t for _p, t in tensor_leaves(pe.model(*inputs))] for pe in (fast, ref)]
        assert len(outs[0]) == len(outs[1]) > 0
        assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    # a session log of the fast path replays to the same state
    replayed = Session(model, inputs, spec=name, **settings)
    assert replayed.replay(list(fast.actions)) == len(fast.actions)
    assert {k: v for k, v in _state(replayed).items() if k != "message"} == \
        {k: v for k, v in after.items() if k != "message"}
    # undo takes both back to the state before, exactly
    assert fast.undo() and ref.undo()
    assert {k: v for k, v in _state(fast).items() if k not in ("actions", "message")} == \
        {k: v for k, v in before.items() if k not in ("actions", "message")}
    assert _state(fast) == _state(ref)


def test_meta_accept_all_applies_the_solvers_trace() -> None:
    """On meta the solver's pre-flight trace is what applying installs as the analysis,
    and it equals a trace of the pruned model (config brought in line included)."""
    model, inputs = _model(LLAMA, "meta")
    pe = Session(model, inputs, spec=LLAMA)
    pending = pe.proposals()
    parts = {p.key: p.removal() for p in pending}
    sol = solve(pe.pruner.preflight(), parts, rescale=pe.pruner.common_fraction)
    assert sol.verdict is not None and sol.verdict.ok and sol.verdict.graph is not None
    assert pe.accept_all()
    assert _graph(pe.pruner.graph) == _graph(sol.verdict.graph)
    assert _graph(pe.pruner.graph) == _graph(trace(pe.model, pe.pruner.inputs))


def test_joint_sets_merge_and_the_verdict_is_of_the_final_removal() -> None:
    """Two lines read one width: the set failing at one line takes in the set failing at
    the other; the solution's verdict is the check of exactly what it returns."""
    model, inputs = _two_lines("meta")
    pe = Session(model, inputs, spec="two_lines", global_pruning=True, importance="random")
    pending = pe.proposals()
    parts = {p.key: p.removal() for p in pending}
    sol = solve(pe.pruner.preflight(), parts, rescale=pe.pruner.common_fraction)
    assert len(sol.joint) == 1 and sol.rescaled and not sol.unsafe
    alone = {pe.preflight(p).location.rpartition("/")[2] for p in pending
             if p.key in sol.joint[0].parts}
    assert len(alone) == 2, alone  # parts failing alone at two different lines, merged
    assert sol.verdict is not None
    check = pe.pruner.preflight().check(sol.removal(parts))
    assert check.ok and check.graph is not None and sol.verdict.graph is not None
    assert _graph(check.graph) == _graph(sol.verdict.graph)


def test_alone_solution_has_no_verdict_of_a_union_it_did_not_check() -> None:
    model, inputs = _model("demo:dino_vit_safe", "meta")
    pe = Session(model, inputs, spec="dino")
    parts = {p.key: p.removal() for p in pe.proposals()}
    sol = solve(pe.pruner.preflight(), parts, alone=True)
    assert len(sol.safe) > 1 and not sol.unsafe
    assert sol.verdict is None  # every part checked alone; their union never ran
    one = dict(list(parts.items())[:1])
    assert solve(pe.pruner.preflight(), one, alone=True).verdict is not None


def test_merge_keeps_what_removal_add_keeps() -> None:
    parts = [Removal({(0, 0): [3, 1, 3], (1, 0): [2]}), Removal({(0, 0): [1, 5], (2, 1): []})]
    slow = Removal()
    for r in parts:
        for (g, ax), idx in r.picks.items():
            slow.add(g, ax, idx)
    assert merge(parts).picks == slow.picks == {(0, 0): [3, 1, 5], (1, 0): [2], (2, 1): []}


# ------------------------------------------------------------------ the config search

def _reference_search(model: nn.Module, config: Any, ours: dict[Any, float],
                      readings: dict[Any, Any], candidates: dict[Any, list[int | None]]
                      ) -> dict[Any, int | None]:
    """`hfconfig._search` as it was: one build per trial, none remembered."""
    current = {slot: cands[0] for slot, cands in candidates.items()}
    anchored = {slot for slot, found in readings.items()
                if any(r.weight > 1 and r.value == current[slot] for r in found)}
    builds = 0

    def distance(values: dict[Any, int | None]) -> tuple[int, int] | None:
        nonlocal builds
        builds += 1
        with torch.device("meta"):
            cfg = hfconfig._with(config, values)
            try:
                fresh = type(model)(cfg)
            except Exception:  # noqa: BLE001 - as `_build`: the config cannot say this
                return None
        return hfconfig._distance(ours, fresh)

    best = distance(current)
    while best != (0, 0) and builds < hfconfig._MAX_BUILDS:
        moves = []
        for slot, cands in candidates.items():
            for value in cands:
                if value == current[slot] or builds >= hfconfig._MAX_BUILDS:
                    continue
                trial = {**current, slot: value}
                d = distance(trial)
                if d is not None and (best is None or d < best):
                    moves.append((slot in anchored, d, trial))
        if not moves:
            break
        _, best, current = min(moves, key=lambda m: (m[0], m[1]))
    return current


SEARCHES = [(LLAMA, "dims"), (LLAMA, "whole"), ("hf:gpt2", "dims"), ("hf:bert", "whole"),
            ("hf:qwen2?num_hidden_layers=1", "dims")]


@pytest.mark.parametrize(("spec", "heads"), SEARCHES,
                         ids=[f"{s.split('?')[0]}-{h}" for s, h in SEARCHES])
def test_config_search_equals_the_reference_search(spec: str, heads: str) -> None:
    model, inputs = _model(spec, "meta")
    pruner = Pruner(model, inputs, heads=heads)
    removal, _changes, _skipped = pruner.propose()
    apply_removal(model, pruner.coupling, removal)  # widths cut, config not updated yet
    config = model.config
    base = hfconfig._build(model, config)
    assert not isinstance(base, str)
    ours = hfconfig._observe(model)
    readings, candidates = hfconfig._readings(model, config, base, ours)
    values, built = hfconfig._search(model, config, ours, readings, candidates)
    assert values == _reference_search(model, config, ours, readings, candidates)
    with torch.device("meta"):
        plain = type(model)(hfconfig._with(config, values))
    assert not isinstance(built, str)
    assert hfconfig._observe(built) == hfconfig._observe(plain)


@pytest.mark.parametrize("spec", [LLAMA, "hf:gpt2", "hf:bert", "demo:llama"])
def test_builds_without_initialisers_are_the_same_builds(spec: str) -> None:
    """Skipping the initialisers changes nothing a build is read for, touches no random
    state, and is off again afterwards."""
    model, _inputs = _model(spec, "meta")
    config = getattr(model, "config", None)
    if config is None:
        pytest.skip("not a transformers model")
    rng = torch.get_rng_state()
    fast = hfconfig._build(model, config)
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.device("meta"):
        plain = type(model)(config)
    assert not isinstance(fast, str)
    assert hfconfig._observe(fast) == hfconfig._observe(plain)
    assert {n: vars(m).keys() for n, m in fast.named_modules()} == \
        {n: vars(m).keys() for n, m in plain.named_modules()}
    w = torch.empty(4, 4)
    torch.nn.init.constant_(w, 3.0)  # initialisers work again once the build is done
    assert torch.equal(w, torch.full((4, 4), 3.0))


def test_collector_pause_restores_the_collector() -> None:
    assert gc.isenabled()
    with paused():
        assert not gc.isenabled()
        with paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause leaves the outer one paused
    assert gc.isenabled()
    gc.disable()
    try:
        with paused():
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
