"""The Groups page's settings row and the sidebar's cost thresholds."""
from __future__ import annotations

import dataclasses

import streamlit as st

from explorer.app.cost import Thresholds
from explorer.app.session import Session
from explorer.coupling.targets import TARGET_NAMES, TARGET_WORDS
from explorer.prune.importance import CRITERIA
from explorer.prune.settings import COMPENSATION_WORDS, COMPENSATIONS, HEAD_MODE_WORDS, HEAD_MODES
from explorer.render.proposal_view import statement_lines

KEYS = ("groups_criterion", "groups_ratio", "groups_heads", "groups_global", "groups_round",
        "groups_targets")


def settings(pe: Session) -> None:
    if st.session_state.pop("groups_configure", False):  # a setting changed: score with a bar
        bar = st.progress(0.0, text="scoring the groups with the new settings")
        pe.configure(*(st.session_state[k] for k in KEYS),
                     progress=lambda f, text: bar.progress(f, text=f"scoring: {text}"))
        bar.empty()
    for k, v in zip(KEYS, pe.settings(), strict=True):  # the session is the source of truth
        st.session_state[k] = list(v) if isinstance(v, tuple) else v

    def configure() -> None:
        st.session_state.groups_configure = True  # done above, where a bar can be drawn

    c = st.columns(5)
    c[0].selectbox("Importance", sorted(CRITERIA), key=KEYS[0], on_change=configure)
    c[1].slider("Ratio", 0.0, 0.9, step=0.05, key=KEYS[1], on_change=configure)
    c[2].selectbox("Heads", HEAD_MODES, key=KEYS[2], on_change=configure,
                   help=HEAD_MODE_WORDS)
    c[3].toggle("Global ranking", key=KEYS[3], on_change=configure,
                help="rank channels of all groups together instead of the ratio per group")
    c[4].number_input("Round widths to", 1, 256, step=1, key=KEYS[4], on_change=configure)
    st.session_state.groups_compensate = pe.compensation
    row = st.columns([1, 3])
    row[0].selectbox("Compensation", COMPENSATIONS, key="groups_compensate",
                 on_change=lambda: pe.set_compensation(st.session_state.groups_compensate),
                 help=f"after each accept, {COMPENSATION_WORDS}; the cost shown before "
                      f"Accept is measured without it")
    row[1].multiselect("Targets", TARGET_NAMES, key=KEYS[5], on_change=configure,
                   help=f"what may be cut: {TARGET_WORDS}")
    statement(pe)
    if pe.on_meta:
        st.caption("The weights are on the meta device: there are no scores to rank, so the "
                   "lowest indices are proposed (load on cpu for importance charts).")


def statement(pe: Session) -> None:
    """What the settings cut, drawn only while its box is open: the statement runs the
    pre-flight of the whole prune (`Pruner.checked`: on SmolLM2 a second weightless forward
    after every accept), so a closed box costs an Accept nothing."""
    box = st.expander("What these settings cut", key="groups_statement", on_change="rerun")
    if not box.open:
        return
    try:
        said = pe.statement()
    except Exception:  # noqa: BLE001 - main() reports the same failure of the proposals
        return
    box.markdown(f"params {said.params_before:,} -> {said.params_after:,}\n\n"
                 + "\n".join(statement_lines(said)))


def thresholds() -> Thresholds:
    """The cost thresholds (sidebar); they outlive the page."""
    names = [f.name for f in dataclasses.fields(Thresholds)]
    saved: Thresholds = st.session_state.setdefault("pe_thresholds", Thresholds())

    def changed() -> None:
        try:
            st.session_state.pe_thresholds = Thresholds(
                **{n: float(st.session_state[f"cost_{n}"]) for n in names})
        except ValueError as exc:
            st.session_state.cost_error = str(exc)

    with st.sidebar.expander("Cost thresholds (yellow, red)"):
        for n in names:
            st.session_state[f"cost_{n}"] = getattr(saved, n)
        st.number_input("perplexity ×original: yellow above", 1.0, 1e6, step=0.05,
                        key="cost_perplexity_warn", on_change=changed)
        st.number_input("perplexity ×original: red above", 1.0, 1e6, step=0.1,
                        key="cost_perplexity_alarm", on_change=changed)
        st.number_input("agreement with the original: yellow below", 0.0, 1.0, step=0.01,
                        key="cost_agreement_warn", on_change=changed,
                        help="top-1 agreement where the model outputs logits, else cosine")
        st.number_input("agreement with the original: red below", 0.0, 1.0, step=0.01,
                        key="cost_agreement_alarm", on_change=changed)
        if (error := st.session_state.pop("cost_error", None)) is not None:
            st.error(error)
    return st.session_state.pe_thresholds  # type: ignore[no-any-return]
