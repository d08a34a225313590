"""The Streamlit app, driven headless with AppTest (no browser), and its session state."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("streamlit")
from llamas import MHA_LLAMA
from streamlit.testing.v1 import AppTest  # noqa: E402

from explorer.app.session import Session  # noqa: E402
from explorer.io.specs import load_model  # noqa: E402

TIMEOUT = 120
APP = str(Path(__file__).resolve().parents[1] / "app.py")


def _params(at: AppTest) -> int:
    metric = next(m for m in at.metric if m.label == "parameters")
    return int(metric.value.replace(",", ""))


@pytest.fixture(autouse=True)
def _session_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PE_SESSION_DIR", str(tmp_path / "sessions"))


@pytest.fixture()
def app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    return at


def _load(at: AppTest, spec: str, device: str = "cpu") -> None:
    at.text_input(key="model_spec").set_value(spec)
    at.radio(key="model_device").set_value(device)
    at.button(key="model_load").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)


def test_default_model_is_traced_and_groups_listed(app: AppTest) -> None:
    assert not app.error
    assert _params(app) > 0
    labels = {m.label: m.value for m in app.metric}
    assert labels["prunable groups"].split(" / ")[0] != "0"
    assert len(app.dataframe) == 1 and len(app.dataframe[0].value) > 3
    assert app.session_state.pe.spec == "demo:dino_vit_safe"
    options = app.selectbox(key="model_example").options
    assert options[:2] == ["demo:dino_vit_safe", "demo:dino_vit"]
    assert any("qkv[0]" in c.value and "file:line" in c.value for c in app.caption)


def _graph_view(at: AppTest) -> dict[str, Any]:
    """The view model the page handed to the graph component."""
    views = [json.loads(c.proto.json_args)["view"] for c in at.get("component_instance")]
    assert len(views) == 1
    return views[0]  # type: ignore[no-any-return]


def test_graph_page_draws_view_explains_group_and_searches(app: AppTest) -> None:
    app.switch_page("pages/2_graph.py").run()
    assert not app.exception, app.exception
    nodes = {n["id"]: n for n in _graph_view(app)["nodes"]}
    assert nodes["m:blocks.0"]["label"] == "0-2 x3 (Block)" and "m:blocks.1" not in nodes
    app.session_state["graph_view"] = {"node": "m:blocks.0", "group": 2, "n": 1}  # a click
    app.run()
    assert not app.exception, app.exception
    assert app.selectbox(key="graph_group").value == 2
    view = _graph_view(app)
    assert view["group"] == 2
    assert any(n["chain"] and n["label"] == "select dim 0 [1]" for n in view["nodes"])
    first = app.session_state.pe.graph.groups()[2].explanation[0]
    assert any(first in md.value for md in app.markdown)
    app.text_input(key="graph_search").set_value("mlp.fc2").run()
    assert any(n["found"] for n in _graph_view(app)["nodes"])
    assert any("3 module(s) match" in c.value for c in app.caption)
    app.text_input(key="graph_search").set_value("zzz").run()
    assert not app.exception and "No module" in app.info[0].value
    assert not any(n["found"] for n in _graph_view(app)["nodes"])
    assert {b.proto.label for b in app.get("download_button")} >= {"Download DOT"}


def test_groups_preflight_accept_reject_undo(app: AppTest) -> None:
    app.switch_page("pages/3_groups.py").run()
    assert not app.exception, app.exception
    charts = [c.key for c in app.get("plotly_chart")]
    assert charts == ["groups_tradeoff", "groups_importance_0"]
    assert app.success and app.success[0].value.startswith("Pre-flight: the pruned copy runs")
    start = _params(app)
    app.button(key="groups_accept").click().run()  # the residual stream: safe in this model
    assert not app.exception and not app.error
    after = _params(app)
    assert after < start
    trail = next(iter(app.session_state.pe_trail.values()))  # the trade-off curve's points
    assert [p[0] for p in trail.points.values()] == [start, after]
    app.button(key="groups_reject").click().run()
    assert _params(app) == after
    app.button(key="groups_undo").click().run()  # the reject
    app.button(key="groups_undo").click().run()  # the accept
    assert _params(app) == start
    assert len(app.session_state.pe.proposals()) == 7


def test_accept_with_count_on_head_dims(app: AppTest) -> None:
    app.switch_page("pages/3_groups.py").run()
    app.button(key="groups_reject").click().run()  # residual stream
    assert "heads x 16" in app.subheader[0].value
    assert any("Head structure" in md.value for md in app.markdown)
    start = _params(app)
    app.number_input(key="groups_count_0").set_value(4).run()
    assert not app.exception and app.success[0].value.startswith("Pre-flight")
    app.button(key="groups_accept").click().run()  # the one Accept uses the count on screen
    assert not app.exception and not app.error
    assert _params(app) < start
    entry = app.session_state.pe.log[-1]
    assert entry["axes"][0]["role"] == "head-dim" and len(entry["axes"][0]["removed"]) == 4


def test_settings_and_accept_all(app: AppTest) -> None:
    app.switch_page("pages/3_groups.py").run()
    app.selectbox(key="groups_criterion").set_value("taylor").run()
    app.toggle(key="groups_global").set_value(True).run()
    app.number_input(key="groups_round").set_value(8).run()
    assert not app.exception and not app.error
    pe = app.session_state.pe
    assert (pe.importance, pe.global_pruning, pe.round_to) == ("taylor", True, 8)
    assert all(ch.width_after % 8 == 0 for p in pe.proposals() for ch in p.changes)
    app.button(key="groups_accept_all").click().run()
    assert not app.exception and not app.error
    assert "Every prunable group is decided" in app.info[0].value




def test_switching_models_redraws_shape_heading_and_names_the_residual_stream(
        app: AppTest) -> None:
    """Seen in Chromium on the 7B shape: the input-shape placeholder kept DINO's image shape,
    the long spec was a large heading, and the first proposal was titled by the embedding
    table instead of the residual stream it is."""
    assert app.text_input(key="model_shape").placeholder == "1,3,32,32"  # DINO's image
    _load(app, MHA_LLAMA, device="meta")
    tokens = app.session_state.pe.example_inputs[0].shape
    assert app.text_input(key="model_shape").placeholder == ",".join(map(str, tokens))
    assert [h.value for h in app.subheader] == ["hf:llama"]  # the options go to a caption
    assert any(c.value.startswith("options: hidden_size=64 · ") for c in app.caption)
    groups = app.dataframe[0].value
    assert "residual stream (64 ch): model.layers" in list(groups["group"])
    app.session_state["groups_statement"] = True  # "What these settings cut", opened
    app.switch_page("pages/3_groups.py").run()
    assert not app.exception, app.exception
    # a language model's residual stream is a target only when chosen
    assert app.subheader[0].value == ("Group 2: 4 heads x 16: model.layers.*.self_attn.q_proj"
                                      " (layers 0-2)")  # the group spans every layer
    assert "residual is not a target" in app.expander[0].markdown[0].value
    app.multiselect(key="groups_targets").select("residual").run()
    assert not app.exception, app.exception
    assert app.subheader[0].value == "Group 1: residual stream (64 ch): model.layers"
    assert "**residual**: 50% of the hidden size" in app.expander[0].markdown[0].value


def test_dino_unsafe_groups_name_the_line(app: AppTest) -> None:
    app.selectbox(key="model_example").set_value("demo:dino_vit").run()
    app.button(key="model_load").click().run()
    assert app.session_state.pe.spec == "demo:dino_vit"
    app.switch_page("pages/3_groups.py").run()
    assert app.warning and "dino.py:" in app.warning[0].value  # shown before accepting
    assert app.button(key="groups_accept").disabled  # unsafe alone: not offered
    assert any("must shrink together" in i.value and "dino.py:" in i.value for i in app.info)
    start = _params(app)
    app.button(key="groups_accept_joint").click().run()
    assert not app.exception and not app.error, (app.exception, app.error)
    assert _params(app) < start
    pe = app.session_state.pe
    assert len(pe.log) == 4  # the residual stream and the heads of the three blocks
    assert pe.message.text.startswith("accepted 4 group(s)")  # was "accepted 1 group(s)"
    assert pe.forward_check().kind == "success"


def test_dimensions_sensitivity_and_blocks(app: AppTest) -> None:
    app.switch_page("pages/4_dimensions.py").run()
    assert not app.exception, app.exception
    assert len(app.get("plotly_chart")) == 2
    widths = json.loads(app.get("plotly_chart")[0].proto.spec)["data"][0]
    assert widths["type"] == "heatmap" and widths["y"] == ["0", "1", "2"]  # layers x kinds
    assert "attn.qkv" in widths["x"] and "mlp.fc1" in widths["x"]
    outside = app.dataframe[0].value  # embeddings and the model's head, apart
    assert "head" in set(outside["module"]) and "blocks.0.attn.qkv" not in set(outside["module"])
    heads = app.dataframe[1].value
    assert len(heads) == 3 and heads["ok"].all() and set(heads["heads"]) == {6}
    assert list(heads.columns)[:7] == ["module", "heads", "head_dim", "kv_heads", "ok",
                                       "pre-flight", "violations"]  # the verdict on screen
    assert heads["projections"][0] == "qkv proj"
    app.multiselect(key="dims_sens_ratios").set_value([0.5])
    app.button(key="dims_sens").click().run()
    assert not app.exception and not app.error
    assert len(app.get("plotly_chart")) == 3
    start = app.session_state.pe.params
    app.selectbox(key="dims_block").set_value("blocks.1")
    app.button(key="dims_remove").click().run()
    assert not app.exception and not app.error
    assert "removed block blocks.1" in app.success[0].value
    assert app.session_state.pe.params < start
    assert len(app.dataframe[2].value) == 2
    app.button(key="dims_undo").click().run()
    assert app.session_state.pe.params == start


def test_export_page(app: AppTest) -> None:
    app.switch_page("pages/5_export.py").run()
    assert not app.exception, app.exception
    app.button(key="export_check").click().run()
    assert app.success and "forward ok" in app.success[0].value


def test_meta_model_errors_are_one_line(app: AppTest) -> None:
    _load(app, "demo:dino_vit_safe", device="meta")
    app.switch_page("pages/4_dimensions.py").run()
    app.button(key="dims_sens").click().run()
    assert not app.exception, app.exception
    assert len(app.error) == 1 and "needs weights" in app.error[0].value
    app.switch_page("pages/3_groups.py").run()
    assert not app.exception, app.exception


def test_invalid_spec_shows_one_error(app: AppTest) -> None:
    app.text_input(key="model_spec").set_value("demo:no_such_demo").run()
    app.button(key="model_load").click().run()
    assert not app.exception, app.exception
    assert len(app.error) == 1 and "no_such_demo" in app.error[0].value
    assert app.session_state.pe.spec == "demo:dino_vit_safe"  # the old session is kept


def test_bad_input_shape_shows_one_error(app: AppTest) -> None:
    app.text_input(key="model_shape").set_value("1,x,3").run()
    app.button(key="model_load").click().run()
    assert not app.exception, app.exception
    assert len(app.error) == 1 and "input shape" in app.error[0].value


@pytest.fixture(scope="module")
def session() -> Session:
    lm = load_model("demo:dino_vit_safe")
    return Session(lm.model, lm.example_inputs, spec="demo:dino_vit_safe")


def test_session_errors_keep_state(session: Session) -> None:
    before = (session.params, session.settings())
    assert not session.configure("no-such", 0.5, "dims")
    assert "unknown importance" in session.message.text
    assert not session.configure("magnitude", 1.5, "dims")
    assert "ratio must be" in session.message.text
    assert not session.configure("magnitude", 0.5, "bogus")
    assert "heads must be" in session.message.text
    assert not session.remove_block("blocks.9")
    assert "not a removable residual block" in session.message.text
    p = session.current()
    assert not session.accept(p, count={99: 1})
    assert "not pruned by this proposal" in session.message.text
    assert not session.accept(p, count=10_000)
    assert "count for" in session.message.text
    assert not session.accept(p, count=0) and "count is 0" in session.message.text
    assert (session.params, session.settings()) == before


def test_session_sensitivity_needs_weights() -> None:
    lm = load_model("demo:mlp", device="meta")
    s = Session(lm.model, lm.example_inputs)
    with pytest.raises(ValueError, match="needs weights"):
        s.sensitivity()


def test_explorer_never_imports_streamlit() -> None:
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "explorer"
    offenders = [str(p) for p in root.rglob("*.py") if "import streamlit" in p.read_text()]
    assert offenders == []


def test_export_plan_and_replay(app: AppTest) -> None:
    app.switch_page("pages/3_groups.py").run()
    app.button(key="groups_accept").click().run()
    pruned = _params(app)
    plan_text = app.session_state.pe.plan().to_dict()
    app.switch_page("pages/5_export.py").run()
    assert not app.exception and not app.error
    app.multiselect(key="export_formats").set_value(["pt", "safetensors", "report"])
    app.button(key="export_build").click().run()
    assert not app.exception and not app.error
    _, files, _, folder = app.session_state.export_files
    assert {"model.pt", "pruned_safetensors.zip", "report.md", "report.html"} <= set(files)
    # built files are on disk in the session's own folder, not held in memory
    assert all(p.parent == Path(folder.name) and p.stat().st_size for p in files.values())
    assert "latency" in files["report.md"].read_text().lower()
    import json
    app.switch_page("pages/1_model.py").run()
    app.button(key="model_load").click().run()  # a fresh, unpruned session
    app.text_area(key="model_plan_text").set_value("{not json").run()
    app.button(key="model_plan_apply").click().run()
    assert not app.exception and len(app.error) == 1 and "cannot apply" in app.error[0].value
    app.text_area(key="model_plan_text").set_value(json.dumps(plan_text)).run()
    app.button(key="model_plan_apply").click().run()
    assert not app.exception and not app.error, app.error
    assert _params(app) == pruned


def test_graph_page_marks_an_unsafe_group_with_its_location(app: AppTest) -> None:
    _load(app, "demo:dino_vit")  # head width from C // num_heads: the qkv group is unsafe
    app.switch_page("pages/2_graph.py").run()
    app.selectbox(key="graph_group").set_value(2).run()
    assert not app.exception, app.exception
    assert any("breaks the forward in blocks.0.attn" in w.value for w in app.warning)
    marked = {n["id"]: n["unsafe"] for n in _graph_view(app)["nodes"] if n["unsafe"]}
    assert marked["m:blocks.0.attn"] == "blocks.0.attn dino.py:58"


def test_proposals_are_picked_and_ordered_by_their_measured_cost(app: AppTest) -> None:
    """The cost of a proposal was shown but not weighed: now every pending cost can be
    measured, the proposals ordered cheapest first, and any one decided on."""
    app.switch_page("pages/3_groups.py").run()
    pe = app.session_state.pe
    assert any("**Accepting it" in m.value for m in app.markdown)  # coloured by severity
    app.button(key="groups_measure_all").click().run()
    assert not app.exception, app.exception
    app.toggle(key="groups_by_cost").set_value(True).run()
    keys = app.selectbox(key="groups_pick").options
    by_key = {p.key: p for p in pe.proposals()}
    costs = [pe.cost_if_measured(by_key[k]) for k in
             (next(k for k in by_key if str(k) == o or f"{by_key[k].group.title} ·" in o)
              for o in keys)]
    assert all(c is not None for c in costs)
    values = [c.after for c in costs]  # cosine to the original: cheapest (highest) first
    assert values == sorted(values, reverse=True)
    last = app.selectbox(key="groups_pick").options[-1]
    app.selectbox(key="groups_pick").set_value(
        next(k for k in by_key if f"{by_key[k].group.title} ·" in last)).run()
    assert app.subheader[0].value.endswith(last.split(" · ")[0])
    before = len(pe.proposals())
    app.button(key="groups_accept").click().run()
    assert not app.exception and not app.error
    assert len(app.session_state.pe.proposals()) < before


def test_graph_click_selects_the_group_of_the_channels_a_node_writes(app: AppTest) -> None:
    """Clicking ``qkv`` selected the residual stream (its input), not the head group whose
    channels it writes; a node in several groups now offers them."""
    app.switch_page("pages/2_graph.py").run()
    app.slider(key="graph_depth").set_value(4)
    app.checkbox(key="graph_fold").uncheck().run()
    nodes = {n["id"]: n for n in _graph_view(app)["nodes"]}
    groups = app.session_state.pe.graph.groups()
    qkv, proj = nodes["m:blocks.0.attn.qkv"], nodes["m:blocks.0.attn.proj"]
    assert groups[qkv["primary_group"]].heads is not None  # the head group
    assert groups[proj["primary_group"]].residual  # proj writes the residual stream
    app.session_state["graph_view"] = {"node": "m:blocks.0.attn.qkv",
                                       "group": qkv["primary_group"], "n": 7}
    app.run()
    assert app.selectbox(key="graph_group").value == qkv["primary_group"]
    offer = app.radio(key="graph_node_pick")
    assert sorted(offer.options) == sorted(str(i) + ": " + groups[i].title
                                           for i in qkv["group_ids"])
    residual = next(i for i in qkv["group_ids"] if groups[i].residual)
    offer.set_value(residual).run()
    assert not app.exception, app.exception
    assert app.selectbox(key="graph_group").value == residual


@pytest.mark.parametrize("page", ["2_graph", "3_groups", "4_dimensions", "5_export"])
def test_a_page_without_a_session_says_so_in_one_line(page: str) -> None:
    """Every page's precondition is `pages._session.session_or_stop`: no session, one info
    line and nothing else drawn after it."""
    at = AppTest.from_file(str(Path(APP).parent / "pages" / f"{page}.py"),
                           default_timeout=TIMEOUT).run()
    assert not at.exception and not at.error, (at.exception, at.error)
    assert [i.value for i in at.info] == ["Load a model on the Model page first."]


def test_the_groups_page_and_the_cli_describe_settings_in_the_same_words(
        app: AppTest, capsys: pytest.CaptureFixture[str]) -> None:
    """What each heads mode, compensation and target means has one wording
    (`prune.settings.HEAD_MODE_WORDS`, `COMPENSATION_WORDS`, `coupling.targets.TARGET_WORDS`):
    the page and `--help` had two, which had drifted apart."""
    from explorer.app.cli import build_parser
    from explorer.coupling.targets import TARGET_WORDS
    from explorer.prune.settings import COMPENSATION_WORDS, HEAD_MODE_WORDS

    app.switch_page("pages/3_groups.py").run()
    assert app.selectbox(key="groups_heads").help == HEAD_MODE_WORDS
    assert COMPENSATION_WORDS in app.selectbox(key="groups_compensate").help
    assert TARGET_WORDS in app.multiselect(key="groups_targets").help
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--help"])
    cli = " ".join(capsys.readouterr().out.split())
    for words in (HEAD_MODE_WORDS, COMPENSATION_WORDS, TARGET_WORDS):
        assert " ".join(words.split()) in cli
