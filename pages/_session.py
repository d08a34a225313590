"""Shared by app.py and the pages (not a page itself): the model cache and session loading."""
from __future__ import annotations

import streamlit as st

from explorer.app.session import Session
from explorer.io.specs import LoadedModel, load_model, parse_input_shape

DEFAULT_REQUEST = ("demo:dino_vit_safe", "cpu", "")


@st.cache_resource(show_spinner=False, max_entries=4)
def pristine(spec: str, device: str, shape: tuple[int, ...] | None) -> LoadedModel:
    """The unpruned model; shared by all sessions, so never mutated (sessions copy it)."""
    return load_model(spec, device=device, input_shape=shape)


def load(request: tuple[str, str, str]) -> bool:
    """Build a fresh session for ``request``; on failure keep the old one and record why."""
    spec, device, shape_text = request
    st.session_state.pe_request = request
    with st.status(f"Loading and tracing `{spec}` ...", expanded=False) as status:
        try:
            shape = parse_input_shape(shape_text) if shape_text.strip() else None
            lm = pristine(spec.strip(), device, shape)
            st.session_state.pe = Session(lm.model, lm.example_inputs, spec=spec.strip())
            st.session_state.pe_error = ""
            status.update(label=f"Traced `{spec}`", state="complete")
            return True
        except Exception as exc:  # noqa: BLE001 - any user model can fail; shown as one line
            st.session_state.pe_error = f"{type(exc).__name__}: {exc}"
            status.update(label=f"Could not load `{spec}`", state="error")
            return False
