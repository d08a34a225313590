"""Shared by app.py and the pages (not a page itself): the model cache and session loading."""
from __future__ import annotations

import os
from typing import Any

import streamlit as st

from explorer.app.session import Session
from explorer.app.sources import LoadRequest, load_request
from explorer.io.specs import LoadedModel, load_model

DEFAULT_REQUEST = LoadRequest("demo:dino_vit_safe")
# `file.py:fn` specs import and run that file on the server: off unless whoever starts the
# server sets this to 1 (PRUNING_EXPLORER_ALLOW_FACTORY=1 streamlit run app.py).
ALLOW_FACTORY_ENV = "PRUNING_EXPLORER_ALLOW_FACTORY"


@st.cache_resource(show_spinner=False, max_entries=4)
def pristine(spec: str, device: str, shape: tuple[int, ...] | None,
             weights: str | None) -> LoadedModel:
    """The unpruned model; shared by all sessions, so never mutated (sessions copy it)."""
    return load_model(spec, device=device, input_shape=shape, weights=weights,
                      allow_code=os.environ.get(ALLOW_FACTORY_ENV) == "1")


def _cached(spec: str, *, device: str, input_shape: tuple[int, ...] | None,
            weights: str | None) -> LoadedModel:
    return pristine(spec, device, input_shape, weights)


def load(request: LoadRequest) -> bool:
    """Build a fresh session for ``request``; on failure keep the old one and record why."""
    st.session_state.pe_request = request
    with st.status(f"Loading `{request.spec}` ...", expanded=False) as status:
        try:
            loaded = load_request(request, build=_cached, progress=status.write)
            lm = loaded.model
            status.write("tracing the model and finding its groups")
            st.session_state.pe = Session(lm.model, lm.example_inputs, spec=request.spec,
                                          calibration=loaded.calibration,
                                          heldout=loaded.heldout, task=lm.task)
            st.session_state.pe_loaded = _summary(lm)
            st.session_state.pe_error = ""
            status.update(label=f"Traced `{request.spec}`", state="complete")
            return True
        except Exception as exc:  # noqa: BLE001 - any user model can fail; shown as one line
            st.session_state.pe_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            status.update(label=f"Could not load `{request.spec}`", state="error")
            return False


def _summary(lm: LoadedModel) -> dict[str, Any]:
    """What the Model page says about where the weights came from."""
    return {"pretrained": lm.pretrained, "task": lm.task.value, "notes": list(lm.notes),
            "tokenizer": type(lm.tokenizer).__name__ if lm.tokenizer is not None else None}
