"""Pruning Explorer: the Streamlit entry point (run with ``streamlit run app.py``).

Loads the default model on first visit (cached once per spec for all sessions) and gives
each browser session its own copy to prune, sharing the cached weights
(`explorer.app.session.Session`). The
session id in the URL and the session log on disk bring the decisions back after a refresh.
"""
from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

ROOT = str(Path(__file__).resolve().parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

st.set_page_config(page_title="Pruning Explorer", layout="wide")
# The navigation comes before the heavy imports and the model load: until it is drawn the
# sidebar lists Streamlit's guess from the pages/ folder (with the `_session` helper).
page = st.navigation([
    st.Page("pages/1_model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/2_graph.py", title="Graph", icon=":material/account_tree:"),
    st.Page("pages/3_groups.py", title="Groups", icon=":material/content_cut:"),
    st.Page("pages/4_dimensions.py", title="Dimensions & heads", icon=":material/bar_chart:"),
    st.Page("pages/5_export.py", title="Export", icon=":material/download:"),
    st.Page("pages/6_learn.py", title="Learn", icon=":material/school:"),
])

from explorer.app.allocator import one_heap, trim_heap  # noqa: E402
from pages._session import held_still, restore_or_start  # noqa: E402 - torch: after the nav

one_heap()  # every page run's thread reuses one heap (explorer.app.allocator); idempotent
restore_or_start()  # a session in the URL (?sid=) is replayed after a refresh
try:
    with held_still():  # another tab's Accept waits until this page is drawn from one state
        page.run()
finally:  # a page's forwards and copies are garbage now: give their heap pages back
    trim_heap()
