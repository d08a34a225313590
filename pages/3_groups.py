"""Groups: decide on one proposal at a time (accept, resize, reject, undo)."""
import streamlit as st

from explorer.importance import CRITERIA
from explorer.pruner import HEAD_MODES
from explorer.render.figures import importance_figure

st.title("Groups")
if "pe" not in st.session_state:
    st.info("Load a model on the Model page first.")
    st.stop()
pe = st.session_state.pe

c = st.columns(3)
crit = c[0].selectbox("Importance", sorted(CRITERIA), key="groups_criterion",
                      index=sorted(CRITERIA).index(pe.importance))
ratio = c[1].slider("Ratio", 0.05, 0.9, pe.ratio, 0.05, key="groups_ratio")
heads = c[2].selectbox("Heads", HEAD_MODES, key="groups_heads",
                       index=HEAD_MODES.index(pe.heads),
                       help="dims: same dims in every head; whole: remove heads; keep: none")
pe.configure(crit, ratio, heads)

m = st.columns(3)
m[0].metric("parameters", f"{pe.params:,}", f"{pe.params - pe.params_start:,}",
            delta_color="inverse")
m[1].metric("MACs", f"{pe.macs:,}", f"{pe.macs - pe.macs_start:,}", delta_color="inverse")
m[2].metric("pending groups", len(pe.proposals()))
if pe.message is not None:
    getattr(st, pe.message.kind)(pe.message.text)

p = pe.current()
if p is None:
    st.info("Every prunable group is decided. Undo to revisit, or go to Export.")
    st.button("Undo", key="groups_undo_done", on_click=pe.undo, disabled=not pe.can_undo)
    st.stop()

st.subheader(f"Group {p.group.id}: {p.group.title}")
st.caption(" · ".join(f"{ch.axis}: {ch.width_before} → {ch.width_after}" for ch in p.changes))
primary = p.changes[0]
count = st.number_input(f"Count to remove from '{primary.axis}'", 0, primary.width_before - 1,
                        len(primary.removed), key="groups_count")
b = st.columns(5)
b[0].button("Accept", key="groups_accept", type="primary", on_click=lambda: pe.accept(p))
b[1].button("Accept with count", key="groups_accept_count",
            on_click=lambda: pe.accept(p, count=int(count)))
b[2].button("Reject", key="groups_reject", on_click=lambda: pe.reject(p))
b[3].button("Undo", key="groups_undo", on_click=pe.undo, disabled=not pe.can_undo)
b[4].button("Accept all remaining", key="groups_accept_all", on_click=pe.accept_all)

st.plotly_chart(importance_figure(p.scores[p.axes[0]], primary.removed,
                                  f"{crit} importance of '{primary.axis}'"),
                key="groups_importance", width="stretch")
with st.expander("Members and coupling", expanded=False):
    st.markdown("\n".join(f"- {line}" for line in p.group.explanation))
    st.dataframe([{"module": mb.module, "parameter": mb.param, "dim": mb.dim, "size": mb.size}
                  for mb in p.group.members], key="groups_members", hide_index=True)
with st.expander(f"All pending proposals ({len(pe.proposals())})"):
    st.dataframe([{"id": q.group.id, "group": q.group.title,
                   "change": "; ".join(f"{ch.axis} {ch.width_before}→{ch.width_after}"
                                       for ch in q.changes)} for q in pe.proposals()],
                 key="groups_pending", hide_index=True)
