"""The interactive core: one Proposal, joint proposals, exact undo, depth in plans, replay."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from explorer.app import store
from explorer.app.session import MessageKind, Session
from explorer.io.plan import SCHEMA, Plan, checksum
from explorer.io.specs import load_model
from explorer.prune.proposal import Proposal
from explorer.prune.pruner import Pruner


def _num_heads(model: torch.nn.Module) -> list[int]:
    return [m.num_heads for _n, m in model.named_modules() if hasattr(m, "num_heads")]


@pytest.mark.parametrize("heads", ["dims", "whole"])
def test_dino_prunes_heads_through_step(heads: str) -> None:
    lm = load_model("demo:dino_vit")
    shape = lm.model(*lm.example_inputs).shape
    report = Pruner(lm.model, lm.example_inputs, ratio=0.5, heads=heads).step()
    assert report.forward_ok and report.output_shape_ok and not report.unsafe
    roles = {c.axis for c in report.changes}
    assert ("heads" if heads == "whole" else "head-dim") in roles
    assert _num_heads(lm.model) == ([3, 3, 3] if heads == "whole" else [6, 6, 6])
    assert lm.model(*lm.example_inputs).shape == shape
    assert report.params_after < 0.4 * report.params_before


@pytest.mark.parametrize("heads", ["dims", "whole"])
def test_dino_joint_proposal_accepts_interactively(heads: str) -> None:
    lm = load_model("demo:dino_vit")
    shape = lm.model(*lm.example_inputs).shape
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5, heads=heads)
    first = next(p.proposals())
    assert first.group.title == "residual stream (96 ch): blocks"
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    assert not p.preflight().check(first.removal()).ok  # unsafe alone
    assert all(torch.equal(state[k], v) for k, v in lm.model.state_dict().items())
    joint = p.joint(first)
    assert joint is not None and len(joint.partners) == 3
    assert "dino.py:" in joint.reason and "C // self.num_heads" in joint.reason
    verdict = joint.accept()
    assert verdict.ok
    assert _num_heads(lm.model) == ([3, 3, 3] if heads == "whole" else [6, 6, 6])
    assert lm.model.blocks[0].attn.qkv.weight.shape == (144, 48)
    assert lm.model(*lm.example_inputs).shape == shape
    p.undo()  # exact: same tensors
    assert all(torch.equal(state[k], v) for k, v in lm.model.state_dict().items())


def test_verdicts_show_unsafe_alone_and_joint_up_front() -> None:
    lm = load_model("demo:dino_vit")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5)
    sol = p.verdicts()
    assert len(sol.joint) == 1 and len(sol.joint[0].parts) == 4
    assert "dino.py:" in sol.joint[0].location and not sol.unsafe
    assert len(sol.safe) == len(p.pending())


def test_step_alias_and_one_proposal_class() -> None:
    lm = load_model("demo:mlp")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5)
    with pytest.warns(DeprecationWarning, match="proposals"):
        props = list(p.step(interactive=True))  # type: ignore[call-overload]
    assert props and all(isinstance(x, Proposal) and x.pruner is p for x in props)
    s = Session(lm.model, lm.example_inputs)
    assert all(type(x) is Proposal for x in s.proposals())


def test_session_undo_is_the_pruners_exact_undo() -> None:
    lm = load_model("demo:dino_vit_safe")
    s = Session(lm.model, lm.example_inputs)
    tensors = dict(s.model.named_parameters())
    assert s.accept(s.current(), count=8)
    assert s.accept(s.current())
    assert len(s.applied) == 2 and s.params < s.params_start
    assert s.undo() and s.undo()
    assert all(t is tensors[n] for n, t in s.model.named_parameters())  # the same objects
    assert s.params == s.params_start and not s.applied


def test_accept_uses_counts_and_partial_layers() -> None:
    lm = load_model("demo:dino_vit_safe")
    s = Session(lm.model, lm.example_inputs)
    p = s.current()
    assert s.preflight(p, {p.axes[0]: 10}).ok
    assert s.accept(p, {p.axes[0]: 10})
    assert len(s.log[-1]["axes"][0]["removed"]) == 10
    assert s.log[-1]["axes"][0]["size"] - 10 == 86


def test_depth_removal_round_trips_through_a_plan(tmp_path: Path) -> None:
    lm = load_model("demo:dino_vit_safe")
    s = Session(lm.model, lm.example_inputs, spec="demo:dino_vit_safe")
    assert s.accept(s.current())
    assert s.remove_block("blocks.1")
    assert s.accept(s.current())
    plan = s.plan()
    assert plan.schema == SCHEMA == 2
    assert [bool(st.blocks) for st in plan.steps] == [False, True, False]
    plan.save(tmp_path / "plan.json")
    fresh = load_model("demo:dino_vit_safe").model
    Plan.load(tmp_path / "plan.json").apply(fresh)
    x = lm.example_inputs
    assert sum(p.numel() for p in fresh.parameters()) == s.params
    assert torch.equal(fresh(*x), s.model(*x))
    files, _notes = s.export_files(("safetensors", "report"), tmp_path / "dl")  # every export works
    assert "pruned_safetensors.zip" in files and "report.md" in files
    assert s.undo() and s.undo() and s.undo() and s.params == s.params_start


def test_schema_1_plans_are_migrated(tmp_path: Path) -> None:
    lm = load_model("demo:mlp")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5)
    p.step()
    data = Plan.from_pruner(p, "demo:mlp").to_dict()
    data["schema"] = 1
    for step in data["steps"]:
        del step["blocks"]
    data["sha256"] = checksum(data)  # as a schema-1 writer sealed it
    plan = Plan.from_dict(json.loads(json.dumps(data)))
    fresh = load_model("demo:mlp").model
    plan.apply(fresh)
    assert sum(t.numel() for t in fresh.parameters()) == sum(t.numel()
                                                             for t in lm.model.parameters())


def test_session_log_replays_after_a_refresh(tmp_path: Path) -> None:
    lm = load_model("demo:dino_vit_safe")
    s = Session(lm.model, lm.example_inputs)
    assert s.configure("magnitude", 0.25, "whole")
    assert s.accept(s.current(), count=12)
    s.reject(s.current())
    assert s.accept(s.current())
    assert s.undo()
    assert s.remove_block("blocks.2")
    sid = store.new_sid()
    store.save(sid, store.SavedSession({"spec": "demo:dino_vit_safe"}, s.actions), tmp_path)
    saved = store.load(sid, tmp_path)
    assert saved is not None and saved.request["spec"] == "demo:dino_vit_safe"
    again = Session(load_model("demo:dino_vit_safe").model, lm.example_inputs)
    assert again.replay(saved.actions) == len(s.actions)
    assert again.params == s.params and again.decided == s.decided
    assert again.history == s.history
    assert store.load("../../etc/passwd", tmp_path) is None  # ids from a URL are data


def test_app_session_survives_refresh_and_reset(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("PE_SESSION_DIR", str(tmp_path))
    app = str(Path(__file__).resolve().parents[1] / "app.py")
    at = AppTest.from_file(app, default_timeout=120).run()
    sid = at.query_params["sid"][0] if isinstance(at.query_params["sid"], list) \
        else at.query_params["sid"]
    at.switch_page("pages/3_groups.py").run()
    at.button(key="groups_accept").click().run()
    params = at.session_state.pe.params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = AppTest.from_file(app, default_timeout=120)
        fresh.query_params["sid"] = sid
        fresh.run()  # a refresh: a new script session with the same URL
    assert not fresh.exception, fresh.exception
    assert fresh.session_state.pe.params == params
    assert fresh.session_state.pe.history == ["accepted residual stream (96 ch): blocks"]
    fresh.switch_page("pages/3_groups.py").run()
    fresh.button(key="groups_reset").click().run()
    assert fresh.session_state.pe.params == fresh.session_state.pe.params_start
    assert not fresh.session_state.pe.history


def test_cli_trace_shows_joint_verdicts(capsys: pytest.CaptureFixture[str]) -> None:
    from explorer.app.cli import main
    assert main(["trace", "--model", "demo:dino_vit", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    verdicts = out["preflight"]
    assert verdicts["0"].startswith("unsafe alone (dino.py:") and "jointly" in verdicts["0"]
    assert verdicts["3"] == "safe alone"


def test_model_page_and_heads_table_show_verdicts_up_front(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("PE_SESSION_DIR", str(tmp_path))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"),
                           default_timeout=120).run()
    at.text_input(key="model_spec").set_value("demo:dino_vit")
    at.button(key="model_load").click().run()
    table = at.dataframe[0].value
    first = table[table["id"] == 0]["pre-flight"].iloc[0]
    assert first.startswith("unsafe alone (dino.py:") and at.warning
    at.switch_page("pages/4_dimensions.py").run()
    heads = next(d.value for d in at.dataframe if "pre-flight" in d.value.columns)
    assert heads["pre-flight"].str.startswith("unsafe alone").all()


LLAMA_7B = ("hf:llama?hidden_size=4096&num_hidden_layers=32&num_attention_heads=32"
            "&num_key_value_heads=32&intermediate_size=11008&vocab_size=32000")


@pytest.mark.slow
def test_7b_head_group_is_one_layer_table(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("PE_SESSION_DIR", str(tmp_path))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"),
                           default_timeout=600).run()
    at.text_input(key="model_spec").set_value(LLAMA_7B)
    at.radio(key="model_device").set_value("meta")
    at.button(key="model_load").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    tokens = at.session_state.pe.example_inputs[0].shape
    assert at.text_input(key="model_shape").placeholder == ",".join(map(str, tokens))
    assert [h.value for h in at.subheader] == ["hf:llama"]
    at.switch_page("pages/3_groups.py").run()
    assert not at.exception and not at.error, (at.exception, at.error)
    # a language model's residual stream is not a target by default: heads come first
    assert "32 heads x 128" in at.subheader[0].value
    # round-to and the sidebar's cost thresholds only: no input per axis
    assert not [n for n in at.number_input if n.key.startswith("groups_count")]
    table = at.dataframe[0].value  # the layer table: one row per layer (and the shared dims)
    layers = [x for x in table["layer"] if x.startswith("model.layers.")]
    assert len(layers) == 32 and len(set(layers)) == 32
    per_layer = table[table["layer"].str.startswith("model.layers.")]
    assert (per_layer["remove"] == 64).all()  # v/out dims per head, 128 wide
    assert list(table[table["layer"] == "all layers (shared)"]["remove"]) == [32]  # q/k rotary
    assert not at.get("plotly_chart")  # meta: no scores to chart, and the page says so
    assert any("meta device" in c.value for c in at.caption)
    start = at.session_state.pe.params
    at.button(key="groups_accept").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    assert at.session_state.pe.params < start
    at.button(key="groups_undo").click().run()
    assert at.session_state.pe.params == start


def test_layer_table_accepts_a_subset_of_layers() -> None:
    from explorer.render.proposal_view import axis_rows, layered
    spec = ("hf:llama?hidden_size=64&num_hidden_layers=5&num_attention_heads=4"
            "&num_key_value_heads=4&intermediate_size=128&vocab_size=100")
    lm = load_model(spec)
    s = Session(lm.model, lm.example_inputs, spec=spec)
    heads = next(p for p in s.proposals() if p.group.heads is not None)
    rows = axis_rows(s.graph.coupling, heads)
    assert layered(heads) and "all layers (shared)" in [r.layer for r in rows]
    only = next(r for r in rows if r.layer == "model.layers.1.self_attn")
    counts = {r.axis: (r.remove if r is only else 0) for r in rows}
    # transformers' Llama views v with a config-wide head_dim: dims of one layer alone fail
    assert not s.preflight(heads, counts).ok
    assert s.configure("magnitude", 0.5, "whole")  # whole heads: per-layer counts work
    heads = next(p for p in s.proposals() if p.group.heads is not None)
    rows = axis_rows(s.graph.coupling, heads)
    assert layered(heads) and {r.part for r in rows} == {"heads"} and len(rows) == 5
    counts = {r.axis: (1 if r.layer == "model.layers.1.self_attn" else 0) for r in rows}
    assert s.accept(heads, counts)
    widths = [layer.self_attn.v_proj.weight.shape[0] for layer in s.model.model.layers]
    assert widths == [64, 48, 64, 64, 64]  # one head of 16 dims less in layer 1 only
    assert s.forward_check().kind == "success"


@pytest.mark.parametrize("heads", ["dims", "whole"])
def test_dino_global_ranking_cuts_tied_groups_by_one_fraction(heads: str) -> None:
    lm = load_model("demo:dino_vit")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5, heads=heads, global_pruning=True)
    joint = p.joint(p.pending()[0])  # global ranking proposes different fractions per group
    assert joint is not None and p.preflight().check(joint.removal()).ok
    report = p.step()
    assert not report.unsafe and report.forward_ok and report.output_shape_ok
    residual = next(c for c in report.changes if c.group == 0)
    heads_kept = {c.width_after for c in report.changes if c.axis in ("heads", "head-dim")}
    per_head = 16 if heads == "whole" else heads_kept.pop()
    n_heads = heads_kept.pop() if heads == "whole" else 6
    assert residual.width_after == n_heads * per_head  # C // num_heads still holds


def test_session_logs_are_private_and_stay_in_their_folder(tmp_path: Path) -> None:
    """Logs name local paths and data: folder 0700, logs 0600, looser modes tightened; a log
    is never read or written through a link (issue 22)."""
    import os
    import stat
    folder = tmp_path / "sessions"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    old = folder / f"{store.new_sid()}.json"
    old.write_text('{"request": {"spec": "demo:mlp"}, "actions": []}')
    old.chmod(0o644)
    sid = store.new_sid()
    store.save(sid, store.SavedSession({"spec": "demo:mlp"}, []), folder)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731 - a one-line helper
    assert mode(folder) == 0o700 and mode(folder / f"{sid}.json") == 0o600
    assert mode(old) == 0o600
    assert sorted(p.name for p in folder.iterdir()) == sorted([old.name, f"{sid}.json"])
    fresh = tmp_path / "new" / "sessions"
    store.save(sid, store.SavedSession({"spec": "demo:mlp"}, []), fresh)
    assert mode(fresh) == 0o700 and mode(fresh / f"{sid}.json") == 0o600
    outside = tmp_path / "elsewhere.json"
    outside.write_text('{"request": {"spec": "demo:mlp"}, "actions": []}')
    linked = store.new_sid()
    os.symlink(outside, folder / f"{linked}.json")
    assert store.load(linked, folder) is None  # not read through the link
    store.save(linked, store.SavedSession({"spec": "demo:resnet"}, []), folder)
    assert "demo:mlp" in outside.read_text()  # not written through it either
    assert not (folder / f"{linked}.json").is_symlink()


def test_hand_edited_log_reports_what_it_skips(tmp_path: Path) -> None:
    lm = load_model("demo:mlp")
    s = Session(lm.model, lm.example_inputs)
    assert s.accept(s.current())
    sid = store.new_sid()
    edited = [{"do": "frobnicate"}, "accept everything", {"do": "accept", "key": ["x"]},
              {"do": "block"}, *s.actions]
    store.save(sid, store.SavedSession({"spec": "demo:mlp"}, edited), tmp_path)
    saved = store.load(sid, tmp_path)
    assert saved is not None and saved.actions == edited  # kept: each is judged on replay
    again = Session(load_model("demo:mlp").model, lm.example_inputs)
    assert again.replay(saved.actions) == 1 and again.params == s.params
    assert again.message is not None and again.message.kind is MessageKind.ERROR
    text = again.message.text
    assert text.startswith("restored 1 of 5 decisions; skipped decision 1 (unknown action "
                           "'frobnicate'); skipped decision 2 (str 'accept everything' is not "
                           "an action object); skipped decision 3 (action 'accept' with a "
                           "malformed field"), text
    assert "skipped decision 4 (action 'block' without a str field 'name')" in text


def test_app_says_which_decision_of_a_log_it_skipped(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("streamlit")
    import dataclasses

    from streamlit.testing.v1 import AppTest

    from explorer.app.sources import LoadRequest
    monkeypatch.setenv("PE_SESSION_DIR", str(tmp_path))
    sid = store.new_sid()
    store.save(sid, store.SavedSession(dataclasses.asdict(LoadRequest("demo:mlp")),
                                       [{"do": "frobnicate"}]), tmp_path)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"),
                           default_timeout=120)
    at.query_params["sid"] = sid
    at.run()
    assert not at.exception, at.exception
    assert any("skipped decision 1 (unknown action 'frobnicate')" in e.value for e in at.error), \
        [e.value for e in at.error]
