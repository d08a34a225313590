"""Views of the proposal on screen: importance charts, its subgraph, why its channels are
coupled, the pending list and the decision history."""
from __future__ import annotations

import streamlit as st

from components.graph_view import graph_view
from explorer.app.cost import Thresholds, cost_label, measured
from explorer.app.session import Session
from explorer.prune.preflight import Verdict
from explorer.prune.proposal import Proposal
from explorer.render.proposal_view import (
    axis_figure,
    axis_rows,
    chart_words,
    head_structure,
    heatmap_figure,
    layered,
    member_table,
    pending_rows,
    removed_for,
    short_location,
)
from explorer.render.view import build_view


def chart(pe: Session, p: Proposal, counts: dict[int, int]) -> None:
    if pe.on_meta:
        return
    if layered(p):
        rows = axis_rows(pe.graph.coupling, p, counts)
        st.plotly_chart(heatmap_figure(rows, p, counts, pe.importance), key="groups_heatmap",
                        width="stretch")
        return
    removed = removed_for(p, counts)
    cols = st.columns(len(p.axes))
    for n, axis in enumerate(p.axes):
        cols[n].plotly_chart(axis_figure(p.scores[axis], removed[axis],
                                         *chart_words(p, n, pe.importance)),
                             key=f"groups_importance_{n}", width="stretch")


def subgraph(pe: Session, p: Proposal, verdict: Verdict) -> None:
    """The proposal's members, coupling chain and one hop of context."""
    groups = pe.graph.groups()
    if p.group.id >= len(groups) or groups[p.group.id].title != p.group.title:
        return
    with st.expander("Subgraph: members, coupling chain and one hop of context",
                     expanded=not layered(p)):
        where = {} if verdict.ok else {
            p.group.id: f"{verdict.module} {short_location(verdict.location)}"}
        sub = build_view(pe.graph, group=p.group.id, unsafe=where).subgraph()
        graph_view(sub.to_component(), key="groups_graph", height=460,
                   model_key=f"{pe.version}:{p.group.id}")


def details(pe: Session, p: Proposal, pending: list[Proposal], t: Thresholds) -> None:
    if p.group.heads is not None:
        st.markdown(f"**Head structure:** {head_structure(p.group)}")
    with st.expander("Why these channels are coupled", expanded=not layered(p)):
        st.markdown("\n".join(f"- {line}" for line in p.group.explanation) or "- (none)")
        st.dataframe(member_table(p.group), key="groups_members", hide_index=True)
    with st.expander(f"All pending proposals ({len(pending)})"):
        costs = measured(pe, pending)
        st.dataframe(pending_rows(pending, {k: cost_label(q, t) for k, q in costs.items()}),
                     key="groups_pending", hide_index=True)


def history(pe: Session) -> None:
    with st.expander(f"Decision history ({len(pe.history)})"):
        st.markdown("\n".join(f"{i + 1}. {h}" for i, h in enumerate(pe.history))
                    or "No decisions yet.")
