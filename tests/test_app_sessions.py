"""A session's lifetime in the app (AppTest, no browser): the id in the URL survives page
changes; a refresh or a second tab gets the live session itself; an evicted session and a
server restart reopen from the saved log; short memory is one line, not a dead server.

Every run here starts from ``app.py``, as on a server (`served`): the id in the URL, the
registry's measure and eviction and the session lock are ``app.py``'s work on every run,
which AppTest's own runs after ``switch_page`` skip."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
import streamlit as st  # noqa: E402
from served import served  # noqa: E402 - tests/ is on sys.path
from streamlit.runtime.pages_manager import PagesManager  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from explorer.app import registry  # noqa: E402

TIMEOUT = 120
APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGES_DIRECT = PagesManager.__init__  # AppTest's own: a switched-to page runs without app.py


@pytest.fixture(autouse=True)
def _fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PE_SESSION_DIR", str(tmp_path / "sessions"))
    monkeypatch.setattr(PagesManager, "__init__", served(PAGES_DIRECT))  # as on a server
    _sessions().clear()  # no live session of another test


def _sessions() -> registry.Registry:  # type: ignore[type-arg]
    from pages._session import sessions
    return sessions()


def _open(sid: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if sid is not None:
        at.query_params["sid"] = sid
    at.run()
    assert not at.exception and not at.error, (at.exception, at.error)
    return at


def _accept_one(at: AppTest) -> int:
    at.switch_page("pages/3_groups.py").run()
    at.button(key="groups_accept").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    return int(at.session_state["pe"].params)


def test_served_apptest_runs_start_from_app_py(monkeypatch: pytest.MonkeyPatch) -> None:
    """AppTest ran a switched-to page without app.py (Streamlit's pages-folder mode, which
    a server leaves after its first run): no heap trim, no registry measure after the run, so
    the SmolLM2 benchmark read 1.0-1.5 GB for a session of 0.78 GB. `served` runs app.py
    every time, as a server does."""
    from explorer.app import allocator
    monkeypatch.setattr(PagesManager, "__init__", PAGES_DIRECT)  # the oracle: AppTest alone
    trims = [0]
    trim = allocator.trim_heap

    def counted() -> bool:
        trims[0] += 1
        return trim()

    monkeypatch.setattr(allocator, "trim_heap", counted)
    first = _open()
    first.switch_page("pages/3_groups.py").run()
    assert trims[0] == 1  # AppTest alone: only the first run went through app.py
    monkeypatch.setattr(PagesManager, "__init__", served(PagesManager.__init__))
    first.button(key="groups_accept").click().run()
    assert not first.exception and not first.error, (first.exception, first.error)
    assert trims[0] == 2 and first.session_state["pe"].applied
    assert _sessions().held > 0  # the registry measured the session after the page run


def test_a_refresh_and_a_second_tab_share_the_live_session() -> None:
    first = _open()
    sid = first.session_state["pe_sid"]
    params = _accept_one(first)
    first.switch_page("pages/4_dimensions.py").run()
    assert first.query_params["sid"] == sid  # a page change keeps the id in the URL
    second = _open(sid)  # a refresh, or the same link in another tab: no replay
    assert second.session_state["pe"] is first.session_state["pe"]
    assert second.session_state["pe"].params == params
    assert len(_sessions()) == 1
    second.switch_page("pages/3_groups.py").run()
    second.button(key="groups_reject").click().run()  # decided in one tab ...
    first.switch_page("pages/3_groups.py").run()
    assert "rejected" in first.session_state["pe"].history[-1]  # ... seen in the other


def test_a_page_link_that_drops_the_query_string_gets_the_id_back() -> None:
    """Streamlit's page links drop ``?sid=``: the next run writes it back from the session
    state, so a refresh on the new page finds the session (AppTest alone never ran the code
    that does, after ``switch_page``)."""
    first = _open()
    sid = first.session_state["pe_sid"]
    first.query_params.clear()
    first.switch_page("pages/4_dimensions.py").run()
    assert first.query_params["sid"] == sid
    assert _open(sid).session_state["pe"] is first.session_state["pe"]


def test_a_server_restart_replays_the_saved_log() -> None:
    first = _open()
    sid = first.session_state["pe_sid"]
    params = _accept_one(first)
    st.cache_resource.clear()  # what a restart loses: the models and the live sessions
    again = _open(sid)
    pe = again.session_state["pe"]
    assert pe is not first.session_state["pe"] and pe.params == params
    assert pe.message is not None and pe.message.text == "restored 1 decisions"


def test_an_evicted_session_reopens_from_its_log_and_frees_its_place() -> None:
    first = _open()
    sid = first.session_state["pe_sid"]
    params = _accept_one(first)
    # a session holds what its cuts made (the rest is the pristine model's): measured after
    # every run, here the Accept's own (AppTest alone skipped it and measured 0 until a
    # refresh ran app.py)
    assert _sessions().held > 0
    _sessions().budget = 1  # bytes: every new session evicts the others
    other = _open()  # another user loads a model: the idle session goes
    assert sid not in _sessions() and other.session_state["pe_sid"] in _sessions()
    reopened = _open(sid)  # its link, in a new tab: the log replays
    pe = reopened.session_state["pe"]
    assert pe is not first.session_state["pe"] and pe.params == params
    assert sid in _sessions() and other.session_state["pe_sid"] not in _sessions()


def test_short_memory_is_one_line_and_keeps_the_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _open()
    before = at.session_state["pe"]
    info = tmp_path / "meminfo"
    info.write_text("MemAvailable:          0 kB\n")
    monkeypatch.setattr(registry, "MEMINFO", info)
    at.text_input(key="model_spec").set_value("demo:resnet")
    at.button(key="model_load").click().run()
    assert not at.exception
    assert len(at.error) == 1, at.error
    assert at.error[0].value.startswith("not enough memory for a session of `demo:resnet`")
    assert "\n" not in at.error[0].value and "0 MB is free; close other sessions" \
        in at.error[0].value
    assert at.session_state["pe"] is before  # the loaded session is still there


def test_two_tabs_clicking_at_once_do_not_interleave() -> None:
    """Two tabs share one live session: two clicks at once each hold the session's lock, and
    a proposal drawn before the other tab changed the model is refused in one line."""
    import threading
    import time

    from explorer.app.session import Session
    from explorer.io.specs import load_model

    lm = load_model("demo:dino_vit_safe")
    pe = Session(lm.model, lm.example_inputs, spec="demo:dino_vit_safe")
    first, second = pe.proposals()[:2]  # both drawn on the pages before either click
    inside, most = [0], [0]
    apply = pe.pruner.apply

    def slow_apply(*args, **kwargs):  # type: ignore[no-untyped-def]
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.3)  # a long accept: the other click arrives meanwhile
        try:
            return apply(*args, **kwargs)
        finally:
            inside[0] -= 1

    pe.pruner.apply = slow_apply  # type: ignore[method-assign]
    done: dict[str, bool] = {}
    tabs = [threading.Thread(target=lambda p=p, n=n: done.__setitem__(n, pe.accept(p)))
            for n, p in (("first", first), ("second", second))]
    for t in tabs:
        t.start()
        time.sleep(0.05)
    for t in tabs:
        t.join()
    assert most[0] == 1  # one change to the model at a time
    assert done == {"first": True, "second": False}
    assert pe.message is not None and pe.message.text.startswith(
        f"not applied: {second.title} was proposed for an earlier state of the model")
    assert len(pe.applied) == 1 and pe.forward_check().kind == "success"
    pe.reject(second)  # a stale reject is refused too
    assert "earlier state" in pe.message.text and len(pe.history) == 1


DEEP_LLAMA = ("hf:llama?hidden_size=32&num_hidden_layers=20&num_attention_heads=2"
              "&num_key_value_heads=1&intermediate_size=48&vocab_size=64")


def test_a_restart_replays_recorded_cuts_and_scores_only_when_the_groups_page_asks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart reopens on the Model page with the recorded cuts redone and the logged
    switch to a data-aware criterion not yet scored (more groups than the page pre-flights
    on load: it counts them without scoring); the Groups page scores once."""
    from explorer.prune import importance
    first = _open()
    sid = first.session_state["pe_sid"]
    first.text_input(key="model_spec").set_value(DEEP_LLAMA)
    first.button(key="model_load").click().run()
    params = _accept_one(first)
    first.selectbox(key="groups_criterion").set_value("wanda").run()
    first.button(key="groups_accept").click().run()
    assert not first.exception and not first.error, (first.exception, first.error)
    pe = first.session_state["pe"]
    assert pe.params < params and pe.importance == "wanda"
    assert all("cut" in a for a in pe.actions if a["do"] == "accept")
    passes: list[int] = []
    norms = importance.activation_norms
    monkeypatch.setattr(importance, "activation_norms",
                        lambda *a, **k: passes.append(1) or norms(*a, **k))
    st.cache_resource.clear()  # a restart
    again = _open(sid)
    reopened = again.session_state["pe"]
    assert reopened is not pe and reopened.params == pe.params
    assert reopened.actions == pe.actions and reopened.history == pe.history
    assert passes == []  # nothing scored for the Model page
    assert f"Pre-flight every group ({reopened.undecided()}," in again.button(
        key="model_verdicts").label
    again.switch_page("pages/3_groups.py").run()
    assert not again.exception and not again.error, (again.exception, again.error)
    assert passes == [1]


def test_a_page_reads_one_state_while_another_tab_accepts() -> None:
    """A page's reads hold the session still (`Workspace.reading`, what app.py wraps every
    page run in): another tab's Accept waits until the page is drawn, then goes through."""
    import threading

    from explorer.app.session import Session
    from explorer.io.specs import load_model

    lm = load_model("demo:mlp")
    pe = Session(lm.model, lm.example_inputs, spec="demo:mlp")
    p = pe.current()
    assert p is not None
    drawing, applying = threading.Event(), threading.Event()
    apply = pe.pruner.apply

    def watched_apply(*args, **kwargs):  # type: ignore[no-untyped-def]
        applying.set()
        return apply(*args, **kwargs)

    pe.pruner.apply = watched_apply  # type: ignore[method-assign]
    seen: list[tuple[int, int, int]] = []
    started: list[bool] = []
    done: list[bool] = []

    def page() -> None:
        with pe.reading():
            seen.append((pe.version, pe.params, len(pe.history)))
            drawing.set()
            started.append(applying.wait(timeout=1.0))  # the other tab clicked meanwhile
            seen.append((pe.version, pe.params, len(pe.history)))

    def other_tab() -> None:
        drawing.wait()
        done.append(pe.accept(p))

    threads = [threading.Thread(target=page), threading.Thread(target=other_tab)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert started == [False]  # the accept did not start while the page read
    assert seen[0] == seen[1] and seen[0][2] == 0
    assert done == [True] and len(pe.history) == 1 and pe.params < seen[0][1]
    with pe.reading(), pe.reading():  # re-entrant: a page's own clicks run inside it
        assert pe.undo()
