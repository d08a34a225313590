"""Shared by app.py and the pages (not a page itself, so a package: the first run of a fresh
server lists pages/*.py in the sidebar, Streamlit's multipage v1, until app.py's st.navigation
replaces it; a package is not listed): the model cache, session loading, the
live sessions of this server (`explorer.app.registry`: one per session id, shared by its tabs,
within a memory budget) and the session log on disk that brings an evicted session, a refresh
or a server restart back (`explorer.app.store`)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import streamlit as st

from explorer.app import store
from explorer.app.registry import Registry, memory_short, tensor_bytes
from explorer.app.session import Message, MessageKind, Session
from explorer.app.sources import LoadRequest, load_request, typed_path
from explorer.io.specs import LoadedModel, load_model
from explorer.prune.records import said_once

DEFAULT_REQUEST = LoadRequest("demo:dino_vit_safe")
# `file.py:fn` specs import and run that file on the server: off unless whoever starts the
# server sets this to 1 (PRUNING_EXPLORER_ALLOW_FACTORY=1 streamlit run app.py).
ALLOW_FACTORY_ENV = "PRUNING_EXPLORER_ALLOW_FACTORY"


@st.cache_resource(show_spinner=False, max_entries=4)
def pristine(spec: str, device: str, shape: tuple[int, ...] | None,
             weights: str | None) -> LoadedModel:
    """The unpruned model; shared by all sessions, so never mutated (each session prunes a
    copy of its modules that shares its weights, `explorer.app.workspace.working_copy`)."""
    return load_model(spec, device=device, input_shape=shape, weights=weights,
                      allow_code=os.environ.get(ALLOW_FACTORY_ENV) == "1")


@dataclasses.dataclass
class Live:
    """A live session and what the Model page says about it (shared by the session's tabs)."""

    session: Session
    request: LoadRequest
    summary: dict[str, Any]


def _held(live: Live) -> int:
    """Bytes one session holds beyond the shared pristine model: the tensors its cuts made
    (its working copy and its kept original share the pristine model's other tensors)."""
    return tensor_bytes([live.session.model], shared=[live.session.original])


@st.cache_resource(show_spinner=False)
def sessions() -> Registry[Live]:
    """This server's live sessions (one registry per process)."""
    return Registry(_held)


def _cached(spec: str, *, device: str, input_shape: tuple[int, ...] | None,
            weights: str | None) -> LoadedModel:
    return pristine(spec, device, input_shape, weights)


def _sid() -> str:
    """This browser session's id, kept in the URL (``?sid=``) so a refresh finds it.

    Streamlit's page links drop the query string, so the id also lives in the session state
    and is written back into the URL on every run: a refresh after changing page finds it."""
    sid = st.query_params.get("sid")
    if not store.valid_sid(sid):
        sid = st.session_state.get("pe_sid")
        if not store.valid_sid(sid):
            sid = store.new_sid()
        st.query_params["sid"] = sid
    st.session_state.pe_sid = sid
    return str(sid)


def _save(session: Session) -> None:
    request = st.session_state.get("pe_request", DEFAULT_REQUEST)
    try:
        store.save(_sid(), store.SavedSession(dataclasses.asdict(request), session.actions))
    except OSError as exc:  # a read-only disk: the session still works, it just won't survive
        st.session_state.pe_error = f"cannot save the session log: {exc}"


def load(request: LoadRequest, actions: list[dict[str, Any]] | None = None) -> bool:
    """Build a fresh session for ``request`` (replaying ``actions``); on failure keep the
    old one and record why."""
    st.session_state.pe_request = request
    with st.status(f"Loading `{request.spec}` ...", expanded=False) as status:
        try:
            loaded = load_request(request, build=_cached, progress=status.write)
            lm = loaded.model
            # the session shares the (loaded) pristine weights; its cuts, a forward's
            # activations and the heap they pass through: about the weights again on SmolLM2
            need = tensor_bytes([lm.model])
            short = memory_short(need, f"a session of `{request.spec}`")
            if short is not None:
                sessions().drop(_sid())  # this tab's own earlier session goes first
                short = memory_short(need, f"a session of `{request.spec}`")
            if short is not None:
                raise MemoryError(short)
            status.write("tracing the model and finding its groups")
            pe = Session(lm.model, lm.example_inputs, spec=request.spec,
                         calibration=loaded.calibration, heldout=loaded.heldout, task=lm.task,
                         tokenizer=lm.tokenizer, sentence=lm.sentence,
                         importance=loaded.importance, heads=loaded.heads)
            if actions:
                bar = st.progress(0.0, text="replaying your decisions")
                pe.replay(list(actions), lambda f, text: bar.progress(f, text=text))
                bar.empty()
            pe.on_action = _save
            st.session_state.pe = pe
            st.session_state.pe_loaded = _summary(lm, loaded.note)
            sessions().put(_sid(), Live(pe, request, st.session_state.pe_loaded))
            # a log that did not replay whole: which decision and why, on the Model page
            failed = actions and pe.message is not None and pe.message.kind is MessageKind.ERROR
            st.session_state.pe_error = f"session log: {pe.message.text}" \
                if failed and pe.message is not None else ""
            _save(pe)
            status.update(label=f"Traced `{request.spec}`", state="complete")
            return True
        except MemoryError as exc:  # the server lives on: say so instead of dying
            st.session_state.pe_error = str(exc) or (f"not enough memory to load "
                                                     f"`{request.spec}` on this server")
            status.update(label=f"Could not load `{request.spec}`", state="error")
            return False
        except Exception as exc:  # noqa: BLE001 - any user model can fail; shown as one line
            st.session_state.pe_error = (str(exc) or type(exc).__name__).splitlines()[0]
            status.update(label=f"Could not load `{request.spec}`", state="error")
            return False


def _summary(lm: LoadedModel, chosen: str | None = None) -> dict[str, Any]:
    """What the Model page says about where the weights came from (and ``chosen``: the
    criterion and data picked for the user, `explorer.io.defaults`)."""
    return {"pretrained": lm.pretrained, "task": lm.task.value,
            "notes": said_once([*([chosen] if chosen else []), *lm.notes]),
            "tokenizer": type(lm.tokenizer).__name__ if lm.tokenizer is not None else None}


def _request(fields: dict[str, Any]) -> LoadRequest | None:
    """A saved request, if it still names `LoadRequest` fields of the right types."""
    known = {f.name: f for f in dataclasses.fields(LoadRequest)}
    if set(fields) - set(known):
        return None
    try:
        return LoadRequest(**fields)
    except TypeError:
        return None


def restore_or_start() -> None:
    """At the start of every run: this tab's session is the live one of the id in the URL
    (another tab's, after a refresh too); an id with no live session replays its saved log;
    a fresh page loads the default model."""
    sid = _sid()  # also puts the id back into the URL after a page link dropped it
    live = sessions().get(sid)
    if live is not None:
        if st.session_state.get("pe") is not live.session:  # a second tab, a refresh
            st.session_state.pe = live.session
            st.session_state.pe_request = live.request
            st.session_state.pe_loaded = live.summary
            st.session_state.pe_error = ""
        sessions().touch(sid)
        return
    if "pe" in st.session_state and "pe_request" in st.session_state:
        # evicted while this tab kept it: it is alive here, so it is live again
        sessions().put(sid, Live(st.session_state.pe, st.session_state.pe_request,
                                 st.session_state.get("pe_loaded", {})))
        return
    if st.session_state.get("pe_restored"):
        return  # the load failed: the Model page shows why
    # Marked done only when the load returns: a click on a page link while it runs stops
    # this run (the sidebar is drawn first), and the next run must load again.
    saved = store.load(sid)
    request = _request(saved.request) if saved is not None else None
    if saved is not None and request is not None:
        load(request, saved.actions)
    elif load(DEFAULT_REQUEST) and saved is not None:  # a failure is shown on the Model page
        st.session_state.pe_error = ("session log: its model request is not one the app "
                                     "writes; the default model was loaded instead")
    st.session_state.pe_restored = True


@contextlib.contextmanager
def held_still() -> Iterator[None]:
    """A page's run with this tab's session held still (`Workspace.reading`): another tab's
    Accept waits until the page is drawn. After it, the session is measured again (its cuts
    changed what it holds) and idle sessions are dropped to fit the memory budget."""
    pe = st.session_state.get("pe")
    try:
        with pe.reading() if isinstance(pe, Session) else contextlib.nullcontext():
            yield
    finally:  # also after st.stop() or st.rerun() in the page
        if isinstance(st.session_state.get("pe"), Session):
            sessions().touch(_sid())


def reset() -> None:
    """Forget every decision: a fresh, unpruned session of the same model."""
    load(st.session_state.get("pe_request", DEFAULT_REQUEST))


_SHOW = {MessageKind.SUCCESS: st.success, MessageKind.ERROR: st.error, MessageKind.INFO: st.info}


def session_or_stop(missing: str = "Load a model on the Model page first.") -> Session:
    """This tab's session; where none is loaded, ``missing`` in an info box and the page's
    run ends there (every page's precondition, said one way)."""
    pe = st.session_state.get("pe")
    if not isinstance(pe, Session):
        st.info(missing)
        st.stop()
    return pe


def show(message: Message) -> None:
    """Draw a session message with the Streamlit element for its kind."""
    _SHOW[message.kind](message.text)


def remembered(key: str, default: Any) -> Any:
    """A value that outlives the page it is edited on (Streamlit drops a widget's state when
    its page is left): kept under ``pe_<key>``, written back into the widget's key."""
    value = st.session_state.setdefault(f"pe_{key}", default)
    st.session_state[key] = value
    return value


def remember(key: str) -> None:
    """``on_change`` of a `remembered` widget: keep its new value."""
    st.session_state[f"pe_{key}"] = st.session_state[key]


def prompts_box(key: str) -> list[str]:
    """The prompts to continue greedily (shared by the Model and Groups pages), one a line."""
    from explorer.app.display import PROMPT_EXAMPLE
    st.session_state[key] = st.session_state.get("pe_prompts", "")
    text = st.text_area("Prompts to continue, one a line (greedy, before and after pruning)",
                        key=key, placeholder=PROMPT_EXAMPLE,
                        on_change=lambda: st.session_state.update(
                            pe_prompts=st.session_state[key]))
    return prompt_lines({"pe_prompts": text})


def heldout_path() -> str:
    """The held-out file of the loaded model as the user typed it ("" for an upload or none),
    for the line that says how to measure on all of it."""
    return typed_path(st.session_state.get("pe_request", DEFAULT_REQUEST).heldout)


def prompt_lines(state: Any) -> list[str]:
    """The prompts typed on the Model or Groups page (the report continues them too)."""
    return [p for p in str(state.get("pe_prompts", "")).splitlines() if p.strip()]
