"""Shared by app.py and the pages (not a page itself): the model cache, session loading and
the session log on disk that lets a session survive a browser refresh (`explorer.app.store`)."""
from __future__ import annotations

import streamlit as st

from explorer.app import store
from explorer.app.session import Session
from explorer.io.specs import LoadedModel, load_model, parse_input_shape

DEFAULT_REQUEST = ("demo:dino_vit_safe", "cpu", "")


@st.cache_resource(show_spinner=False, max_entries=4)
def pristine(spec: str, device: str, shape: tuple[int, ...] | None) -> LoadedModel:
    """The unpruned model; shared by all sessions, so never mutated (sessions copy it)."""
    return load_model(spec, device=device, input_shape=shape)


def _sid() -> str:
    """This browser session's id, kept in the URL (``?sid=``) so a refresh finds it."""
    sid = st.query_params.get("sid")
    if not store.valid_sid(sid):
        sid = store.new_sid()
        st.query_params["sid"] = sid
    return str(sid)


def _save(session: Session) -> None:
    request = st.session_state.get("pe_request", DEFAULT_REQUEST)
    try:
        store.save(_sid(), store.SavedSession(tuple(request), session.actions))
    except OSError as exc:  # a read-only disk: the session still works, it just won't survive
        st.session_state.pe_error = f"cannot save the session log: {exc}"


def load(request: tuple[str, str, str], actions: list[dict[str, object]] | None = None) -> bool:
    """Build a fresh session for ``request`` (replaying ``actions``); on failure keep the
    old one and record why."""
    spec, device, shape_text = request
    st.session_state.pe_request = request
    with st.status(f"Loading and tracing `{spec}` ...", expanded=False) as status:
        try:
            shape = parse_input_shape(shape_text) if shape_text.strip() else None
            lm = pristine(spec.strip(), device, shape)
            pe = Session(lm.model, lm.example_inputs, spec=spec.strip())
            if actions:
                bar = st.progress(0.0, text="replaying your decisions")
                pe.replay(list(actions), lambda f, text: bar.progress(f, text=text))
                bar.empty()
            pe.on_action = _save
            st.session_state.pe = pe
            st.session_state.pe_error = ""
            _save(pe)
            status.update(label=f"Traced `{spec}`", state="complete")
            return True
        except Exception as exc:  # noqa: BLE001 - any user model can fail; shown as one line
            st.session_state.pe_error = str(exc) or exc.__class__.__name__
            status.update(label=f"Could not load `{spec}`", state="error")
            return False


def restore_or_start() -> None:
    """On a fresh page: replay the session named in the URL, or load the default model."""
    if "pe_request" in st.session_state:
        return
    saved = store.load(_sid())
    if saved is not None:
        load(saved.request, saved.actions)
    else:
        load(DEFAULT_REQUEST)  # a failure is shown on the Model page


def reset() -> None:
    """Forget every decision: a fresh, unpruned session of the same model."""
    load(st.session_state.get("pe_request", DEFAULT_REQUEST))
