"""Groups: decide on one proposal at a time (pre-flight, counts, accept, reject, undo).

Top to bottom: the settings, the proposal picked, its counts and pre-flight, what it costs,
the buttons, then views of it; each section is a function of `pages/_groups/`.
"""
from __future__ import annotations

import streamlit as st

from explorer.prune.preflight import Verdict
from explorer.render.proposal_view import axis_rows, edited, equal_counts, layered
from pages._groups.costs import cost, export_aware, tradeoff
from pages._groups.decide import actions, counts_editor, metrics, pick, verdict_box
from pages._groups.settings import settings, thresholds
from pages._groups.views import chart, details, history, subgraph
from pages._session import reset, session_or_stop, show


def main() -> None:
    st.title("Groups")
    pe = session_or_stop()
    t = thresholds()
    settings(pe)
    try:
        with st.spinner("scoring the groups (a data-aware criterion: a pass over the "
                        "calibration data after every change)"):
            pending = pe.proposals()  # cached per model state: instant after the first
    except Exception as exc:  # noqa: BLE001 - e.g. a criterion that needs weights on meta
        st.error(f"cannot compute proposals: {exc}")
        st.stop()
    if not pending:
        metrics(pe, None, 0)
        if pe.message is not None:
            show(pe.message)
        st.info("Every prunable group is decided. Undo to revisit, or go to Export.")
        c = st.columns(2)
        c[0].button("Undo", key="groups_undo_done", on_click=pe.undo, disabled=not pe.can_undo)
        c[1].button("Reset", key="groups_reset_done", on_click=reset)
        tradeoff(pe, None, None, t)
        history(pe)
        st.stop()
    p = pick(pe, pending, t)
    st.subheader(f"Group {p.group.id}: {p.group.title}")
    counts = counts_editor(pe, p)
    try:
        with st.spinner("pre-flight: the cut on a weightless copy"):  # cached: shown once
            verdict = pe.preflight(p, edited(p, counts))
    except ValueError as exc:  # a count out of range
        verdict = Verdict(False, error=str(exc))
    # unequal per-layer counts of a group whose layers share tensors: the answer is equal
    # cuts (offered below), not a joint set with other groups (a pre-flight of every group)
    equal = equal_counts(axis_rows(pe.graph.coupling, p, counts)) \
        if layered(p) and not verdict.ok else None
    joint = pe.joint(p) if not verdict.ok and equal is None else None
    metrics(pe, verdict, len(pending))
    if pe.message is not None:
        show(pe.message)
    verdict_box(pe, p, verdict, joint)
    after = cost(pe, p, counts, verdict, t)
    export_aware(pe, p, counts, verdict, pending, equal, t)
    actions(pe, p, counts, verdict, joint)
    tradeoff(pe, verdict, after, t)
    chart(pe, p, counts)
    subgraph(pe, p, verdict)
    details(pe, p, pending, t)
    history(pe)


main()
