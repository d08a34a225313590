"""The Streamlit app, driven headless with AppTest (no browser)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

TIMEOUT = 120
APP = str(Path(__file__).resolve().parents[1] / "app.py")


def _params(at: AppTest) -> int:
    metric = next(m for m in at.metric if m.label == "parameters")
    return int(metric.value.replace(",", ""))


@pytest.fixture()
def app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    return at


def test_default_model_is_traced_and_groups_listed(app: AppTest) -> None:
    assert not app.error
    assert _params(app) > 0
    labels = {m.label: m.value for m in app.metric}
    assert labels["prunable groups"].split(" / ")[0] != "0"
    assert len(app.dataframe) == 1 and len(app.dataframe[0].value) > 3
    assert app.session_state.pe.spec == "demo:dino_vit"


def test_graph_page_draws_dot_and_explains_group(app: AppTest) -> None:
    app.switch_page("pages/2_graph.py").run()
    assert not app.exception, app.exception
    charts = app.get("graphviz_chart")
    assert len(charts) == 1
    assert charts[0].proto.spec.startswith("digraph model")
    assert "blocks.0-2 x3" in charts[0].proto.spec
    app.selectbox(key="graph_group").set_value(2).run()
    assert not app.exception, app.exception
    assert "penwidth=2.5" in app.get("graphviz_chart")[0].proto.spec
    first = app.session_state.pe.graph.groups()[2].explanation[0]
    assert any(first in md.value for md in app.markdown)


def test_groups_accept_reject_undo(app: AppTest) -> None:
    app.switch_page("pages/3_groups.py").run()
    assert not app.exception, app.exception
    assert len(app.get("plotly_chart")) == 1
    start = _params(app)
    # the first proposal is the residual stream, which dino's hard-coded reshape breaks:
    app.button(key="groups_accept").click().run()
    assert not app.exception, app.exception
    assert len(app.error) == 1 and "dino.py:" in app.error[0].value
    assert _params(app) == start
    app.button(key="groups_reject").click().run()
    assert _params(app) == start
    app.button(key="groups_reject").click().run()  # qkv: dino hard-codes C // H too
    app.button(key="groups_accept").click().run()  # the mlp group is safe
    assert not app.exception and not app.error
    after = _params(app)
    assert after < start
    app.button(key="groups_undo").click().run()
    assert _params(app) == start
    app.button(key="groups_undo").click().run()  # undo both rejects too
    app.button(key="groups_undo").click().run()
    assert len(app.session_state.pe.proposals()) == 7


def test_accept_with_count(app: AppTest) -> None:
    app.switch_page("pages/3_groups.py").run()
    app.button(key="groups_reject").click().run()
    app.button(key="groups_reject").click().run()
    start = _params(app)
    app.number_input(key="groups_count").set_value(8).run()
    app.button(key="groups_accept_count").click().run()
    assert not app.exception and not app.error
    assert _params(app) < start
    entry = app.session_state.pe.log[-1]
    assert entry["count"] == 8 and len(entry["axes"][0]["removed"]) == 8


def test_dimensions_and_export_pages(app: AppTest) -> None:
    app.switch_page("pages/4_dimensions.py").run()
    assert not app.exception, app.exception
    assert len(app.get("plotly_chart")) == 2
    assert any(len(d.value) == 3 for d in app.dataframe)  # one row per attention block
    app.switch_page("pages/5_export.py").run()
    assert not app.exception, app.exception
    app.button(key="export_check").click().run()
    assert app.success and "forward ok" in app.success[0].value


def test_invalid_spec_shows_one_error(app: AppTest) -> None:
    app.text_input(key="model_spec").set_value("demo:no_such_demo").run()
    app.button(key="model_load").click().run()
    assert not app.exception, app.exception
    assert len(app.error) == 1 and "no_such_demo" in app.error[0].value
    assert app.session_state.pe.spec == "demo:dino_vit"  # the old session is kept


def test_bad_input_shape_shows_one_error(app: AppTest) -> None:
    app.text_input(key="model_shape").set_value("1,x,3").run()
    app.button(key="model_load").click().run()
    assert not app.exception, app.exception
    assert len(app.error) == 1 and "input shape" in app.error[0].value


def test_explorer_never_imports_streamlit() -> None:
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "explorer"
    offenders = [str(p) for p in root.rglob("*.py") if "import streamlit" in p.read_text()]
    assert offenders == []
