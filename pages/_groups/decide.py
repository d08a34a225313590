"""The Groups page's decision: which proposal, its counts, its pre-flight and the buttons."""
from __future__ import annotations

import contextlib

import streamlit as st

from explorer.app.cost import Thresholds, cost_label, measure_all
from explorer.app.decide import order, picked
from explorer.app.session import Session
from explorer.prune.preflight import Verdict
from explorer.prune.proposal import Proposal
from explorer.render.proposal_view import (
    axis_rows,
    count_label,
    edited,
    joint_text,
    layer_caption,
    layer_table,
    layered,
    metric_cards,
    quality_note,
    table_counts,
    verdict_text,
)
from pages._session import heldout_path, remember, remembered, reset


def pick(pe: Session, pending: list[Proposal], t: Thresholds) -> Proposal:
    """The proposal to decide on: the first pending one, or one the user picks (ordered by
    measured cost when asked)."""
    c = st.columns([5, 2, 2])
    listing = order(pe, pending, remembered("groups_by_cost", False))
    if listing.measurable:
        c[1].toggle("Cheapest first", key="groups_by_cost", on_change=remember,
                    args=("groups_by_cost",), help="order the proposals by their measured cost")
    missing = listing.missing
    if missing and listing.measurable and c[2].button(
            f"Measure all costs ({len(missing)})", key="groups_measure_all",
            help="apply each proposal to a copy with weights and measure its quality"):
        bar = st.progress(0.0, text="measuring costs")
        failed = measure_all(pe, missing, lambda f, text: bar.progress(f, text=text))
        bar.empty()
        for line in failed:
            st.warning(f"could not measure {line}")
        listing = order(pe, pending, listing.by_cost)
    # Set on every run: the browser holds the pick by its label, which changes once its cost
    # is measured; without this it kept showing "not measured" above the measured cost.
    key, st.session_state.groups_pick_for = picked(
        listing, pe, st.session_state.get("groups_pick"),
        st.session_state.get("groups_pick_for"))
    st.session_state.groups_pick = key
    by_key = {p.key: p for p in listing.pending}
    costs = dict(listing.costs)
    if costs.get(key) is None and listing.measurable:
        # the proposal on screen: its cost is shown below anyway (and says why it fails)
        with contextlib.suppress(Exception), st.spinner(
                "measuring what accepting the proposal on screen costs (a forward)"):
            costs[key] = pe.proposal_cost(by_key[key])
    chosen = c[0].selectbox(
        "Proposal", list(by_key), key="groups_pick",
        format_func=lambda k: by_key[k].group.title + (
            f" · {cost_label(costs.get(k), t)}" if listing.measurable else ""))
    return by_key[chosen]


def counts_editor(pe: Session, p: Proposal) -> dict[int, int]:
    """The counts on screen: a few inputs, or one layer table for a group spanning layers."""
    proposal_id = (pe.version, tuple(p.keys), pe.settings())
    fresh = st.session_state.get("groups_for") != proposal_id
    if fresh:  # a new proposal: the widgets start from the proposed counts
        st.session_state.groups_for = proposal_id
        st.session_state.pop("groups_table", None)
        for n, ch in enumerate(p.changes):
            st.session_state[f"groups_count_{n}"] = len(ch.removed)
    if not layered(p):
        cols = st.columns(len(p.axes))
        return {axis: int(cols[n].number_input(count_label(pe.graph.coupling, p, n), 0,
                                               ch.width_before - 1, key=f"groups_count_{n}"))
            for n, (axis, ch) in enumerate(zip(p.axes, p.changes, strict=True))}
    rows = axis_rows(pe.graph.coupling, p)
    st.caption(layer_caption(rows))
    table = st.data_editor(layer_table(rows), key="groups_table", hide_index=True,
                           width="stretch", disabled=["layer", "part", "width"],
                           column_config={"remove": st.column_config.NumberColumn(
                               "remove", min_value=0, step=1)})
    return table_counts(rows, table)


def verdict_box(pe: Session, p: Proposal, verdict: Verdict, joint: Proposal | None) -> None:
    (st.success if verdict.ok else st.warning)(verdict_text(verdict))
    if joint is not None:
        st.info(joint_text(joint))


def metrics(pe: Session, verdict: Verdict | None, pending: int) -> None:
    with st.spinner(f"measuring quality on {pe.quality_source}"):
        quality = pe.quality()  # cached per model version: a spinner only after a change
    cards = metric_cards((pe.params, pe.params_start), (pe.macs, pe.macs_start), pending,
                         verdict, quality, pe.quality_source)
    for column, card in zip(st.columns(len(cards)), cards, strict=True):
        if card is not None:
            column.metric(card.label, card.value, card.delta, help=card.help,
                          delta_color="inverse" if card.inverse else "normal")
    if quality is not None:
        note, command = quality_note(quality, pe.quality_source, pe.spec,
                                     heldout_path())
        st.caption(note, help=command)


def actions(pe: Session, p: Proposal, counts: dict[int, int], verdict: Verdict,
            joint: Proposal | None) -> None:
    b = st.columns(6)
    on_screen = edited(p, counts)
    b[0].button("Accept", key="groups_accept", type="primary", disabled=not verdict.ok,
                help="apply the counts on screen" if verdict.ok else
                "unsafe alone: see the pre-flight (and the joint proposal, if any)",
                on_click=lambda: pe.accept(p, on_screen))
    if joint is not None and joint.joint:
        b[1].button(f"Accept jointly ({len(joint.keys)} groups)", key="groups_accept_joint",
                    type="primary", on_click=lambda: pe.accept(joint, on_screen))
    elif joint is not None:  # the outer axis, as proposed (the counts on screen are inner)
        b[1].button(f"Accept on the outer axis ({joint.changes[0].width_after} left)",
                    key="groups_accept_joint", type="primary",
                    on_click=lambda: pe.accept(joint))
    b[2].button("Reject", key="groups_reject", on_click=lambda: pe.reject(p))
    b[3].button("Undo", key="groups_undo", on_click=pe.undo, disabled=not pe.can_undo)
    if b[4].button("Accept all", key="groups_accept_all",
                   help="accept every remaining proposal (joint sets included)"):
        bar = st.progress(0.0, text="Accept all")
        pe.accept_all(lambda f, text: bar.progress(f, text=text))
        bar.empty()
        st.rerun()
    b[5].button("Reset", key="groups_reset", on_click=reset,
                help="forget every decision and start again from the unpruned model")
