"""AppTest runs that start from ``app.py``, as every run after the first does on a server.

Streamlit keeps "this app has a ``pages/`` folder" in a class attribute
(``PagesManager.uses_pages_directory``); while it is set a run executes the current page's file
directly (multipage v1), without ``app.py``. On a server the first run's ``st.navigation``
clears it for good; AppTest sets it again before every run, so after ``switch_page`` its runs
skip ``app.py``: no session lock (`pages._session.held_still`), no registry measure, no heap
trim after the run (the freed heap of a page run stays resident until a fresh AppTest runs
``app.py``). Where that work is what a flow tests, the flow runs served:
``tests/test_app_sessions.py`` (the id in the URL, the registry's measure and eviction, the
session lock: every test, by ``monkeypatch``); `benchmarks/app_llm.py` and
`benchmarks/app_render.py` measure with it. The other AppTests check what pages draw and do,
which is the same either way (checked: every AppTest file passes served too).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from streamlit.runtime.pages_manager import PagesManager

Init = Callable[..., None]


def served(init: Init) -> Init:
    """``PagesManager.__init__`` (``init``) followed by what ``app.py``'s ``st.navigation``
    sets on a server: no pages-folder mode."""

    def __init__(self: PagesManager, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    return __init__


def run_app_py_every_time() -> None:
    """For the rest of this process, every AppTest run starts from ``app.py``."""
    PagesManager.__init__ = served(PagesManager.__init__)  # type: ignore[method-assign]
