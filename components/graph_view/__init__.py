"""The interactive graph: a Streamlit component over Cytoscape.js + ELK, vendored as a bundle.

The frontend source is in ``frontend/`` (``npm ci && npm run build`` writes ``static/``); the
app serves the committed ``static/`` folder and needs no network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit.components.v1 as components

_STATIC = Path(__file__).resolve().parent / "static"
_component = components.declare_component("pe_graph_view", path=str(_STATIC))


def graph_view(view: dict[str, Any], key: str, model_key: str = "", height: int = 720,
               selected: str | None = None) -> dict[str, Any] | None:
    """Draw a view model (``ViewModel.to_component()``) and return the last click.

    Pan (drag), zoom (wheel), fit, search, expand/collapse (double click) happen in the
    browser; a click on a node comes back as ``{"node": id, "group": primary group or None,
    "n": click counter}`` (the counter tells a new click from the same one on a rerun).

    Args:
        view: the view model as plain data.
        key: the Streamlit widget key (its value is also in ``st.session_state[key]``).
        model_key: changes when the model changes; resets expansion and selection.
        height: frame height in pixels.
        selected: id of the node to show as selected.
    """
    value = _component(view=view, key=key, model_key=model_key, height=height,
                       selected=selected, default=None)
    return value if isinstance(value, dict) else None
