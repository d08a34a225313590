"""Pruning Explorer: the Streamlit entry point (run with ``streamlit run app.py``).

Loads the requested model once per (spec, device, input shape) into a shared cache, and gives
each browser session its own deep copy to prune (`explorer.ui_state.Session`).
"""
from __future__ import annotations

import streamlit as st

from explorer.specs import LoadedModel, load_model, parse_input_shape
from explorer.ui_state import Session

DEFAULT_REQUEST = ("demo:dino_vit", "cpu", "")


@st.cache_resource(show_spinner=False, max_entries=4)
def pristine(spec: str, device: str, shape: tuple[int, ...] | None) -> LoadedModel:
    """The unpruned model; shared by all sessions, so never mutated (sessions copy it)."""
    return load_model(spec, device=device, input_shape=shape)


def load(request: tuple[str, str, str]) -> None:
    """Build a fresh session for ``request``; on failure keep the old one and record why."""
    spec, device, shape_text = request
    st.session_state.pe_loaded = request
    with st.status(f"Loading and tracing `{spec}` ...", expanded=False) as status:
        try:
            shape = parse_input_shape(shape_text) if shape_text.strip() else None
            lm = pristine(spec.strip(), device, shape)
            st.session_state.pe = Session(lm.model, lm.example_inputs, spec=spec.strip())
            st.session_state.pe_error = ""
            status.update(label=f"Traced `{spec}`", state="complete")
        except Exception as exc:  # noqa: BLE001 - any user model can fail; shown as one line
            st.session_state.pe_error = f"{type(exc).__name__}: {exc}"
            status.update(label=f"Could not load `{spec}`", state="error")


st.set_page_config(page_title="Pruning Explorer", layout="wide")
if "pe_request" not in st.session_state:
    st.session_state.pe_request = DEFAULT_REQUEST
if st.session_state.get("model_load"):  # the Model page's button, clicked in this run
    st.session_state.pe_request = (st.session_state.get("model_spec", ""),
                                   st.session_state.get("model_device", "cpu"),
                                   st.session_state.get("model_shape", ""))
    st.session_state.pe_loaded = None  # reload even when the request is unchanged
if st.session_state.get("pe_loaded") != st.session_state.pe_request:
    load(st.session_state.pe_request)
if st.session_state.get("pe_error"):
    st.error(st.session_state.pe_error)

page = st.navigation([
    st.Page("pages/1_model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/2_graph.py", title="Graph", icon=":material/account_tree:"),
    st.Page("pages/3_groups.py", title="Groups", icon=":material/content_cut:"),
    st.Page("pages/4_dimensions.py", title="Dimensions & heads", icon=":material/bar_chart:"),
    st.Page("pages/5_export.py", title="Export", icon=":material/download:"),
])
page.run()
