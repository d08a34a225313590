"""Groups: decide on one proposal at a time (pre-flight, accept, resize, reject, undo)."""
import streamlit as st

from components.graph_view import graph_view
from explorer.app.sources import quality_text
from explorer.prune.importance import CRITERIA
from explorer.prune.pruner import HEAD_MODES
from explorer.render.figures import axes_rows, importance_figure, member_rows
from explorer.render.view import build_view

st.title("Groups")
if "pe" not in st.session_state:
    st.info("Load a model on the Model page first.")
    st.stop()
pe = st.session_state.pe
KEYS = ("groups_criterion", "groups_ratio", "groups_heads", "groups_global", "groups_round")
for k, v in zip(KEYS, pe.settings(), strict=False):  # the session is the source of truth
    st.session_state[k] = v


def _configure() -> None:
    pe.configure(*(st.session_state[k] for k in KEYS))


c = st.columns(5)
c[0].selectbox("Importance", sorted(CRITERIA), key=KEYS[0], on_change=_configure)
c[1].slider("Ratio", 0.0, 0.9, step=0.05, key=KEYS[1], on_change=_configure)
c[2].selectbox("Heads", HEAD_MODES, key=KEYS[2], on_change=_configure,
               help="dims: same dims in every head; whole: remove heads; keep: none")
c[3].toggle("Global ranking", key=KEYS[3], on_change=_configure,
            help="rank channels of all groups together instead of the ratio per group")
c[4].number_input("Round widths to", 1, 256, step=1, key=KEYS[4], on_change=_configure)

m = st.columns(4)
m[0].metric("parameters", f"{pe.params:,}", f"{pe.params - pe.params_start:,}",
            delta_color="inverse")
m[1].metric("MACs", f"{pe.macs:,}", f"{pe.macs - pe.macs_start:,}", delta_color="inverse")
try:
    pending = pe.proposals()
except Exception as exc:  # noqa: BLE001 - e.g. a criterion that needs weights on meta
    st.error(f"cannot compute proposals: {type(exc).__name__}: {exc}")
    st.stop()
m[2].metric("pending groups", len(pending))
quality = pe.quality()
if quality is not None:
    m[3].metric(*quality_text(quality), help=f"against the original, on {pe.quality_source}")
if pe.message is not None:
    getattr(st, pe.message.kind)(pe.message.text)

p = pe.current()
if p is None:
    st.info("Every prunable group is decided. Undo to revisit, or go to Export.")
    st.button("Undo", key="groups_undo_done", on_click=pe.undo, disabled=not pe.can_undo)
    st.stop()

st.subheader(f"Group {p.group.id}: {p.group.title}")
st.caption(" · ".join(f"{ch.axis}: {ch.width_before} → {ch.width_after}" for ch in p.changes))
verdict = pe.preflight(p)
if verdict.ok:
    st.success(f"Pre-flight: the pruned copy runs, output shapes {verdict.output_shapes}")
else:
    st.warning(f"Pre-flight: accepting breaks the forward in {verdict.module or 'the model'} "
               f"{verdict.location}: {verdict.error}")
if verdict.ok and quality is not None:
    try:
        cost = pe.proposal_cost(p)
    except Exception as exc:  # noqa: BLE001 - shown as one line, the page still works
        st.warning(f"could not measure what accepting costs: {type(exc).__name__}: {exc}")
    else:
        if cost is not None:
            label, now = quality_text(quality)
            st.info(f"Accepting it: {label} {now} → {quality_text(cost)[1]} "
                    f"(measured on a copy with weights, {pe.quality_source})")
proposal_id = (pe.version, p.key, pe.settings())
if st.session_state.get("groups_for") != proposal_id:  # a new proposal: reset the counts
    st.session_state.groups_for = proposal_id
    for n, ch in enumerate(p.changes):
        st.session_state[f"groups_count_{n}"] = len(ch.removed)
counts = {}
for n, (axis, ch) in enumerate(zip(p.axes, p.changes, strict=False)):
    counts[axis] = st.number_input(f"Count to remove from '{ch.axis}' (axis {axis}, "
                                   f"{ch.width_before} wide)", 0, ch.width_before - 1,
                                   key=f"groups_count_{n}")
b = st.columns(5)
b[0].button("Accept", key="groups_accept", type="primary", on_click=lambda: pe.accept(p))
b[1].button("Accept with count", key="groups_accept_count",
            on_click=lambda: pe.accept(p, count={a: int(k) for a, k in counts.items()}))
b[2].button("Reject", key="groups_reject", on_click=lambda: pe.reject(p))
b[3].button("Undo", key="groups_undo", on_click=pe.undo, disabled=not pe.can_undo)
b[4].button("Accept all remaining", key="groups_accept_all", on_click=pe.accept_all)

charts = st.columns(len(p.changes))
for n, (axis, ch) in enumerate(zip(p.axes, p.changes, strict=False)):
    charts[n].plotly_chart(importance_figure(p.scores[axis], ch.removed,
                                             f"{pe.importance} importance of '{ch.axis}'"),
                           key=f"groups_importance_{n}", width="stretch")
if p.group.heads is not None:
    h = p.group.heads
    st.markdown(f"**Head structure:** {h.num_heads} heads × {h.head_dim} dims"
                + (f", {h.kv_heads} key/value heads" if h.kv_heads else ""))
st.dataframe(axes_rows(p.group), key="groups_axes", hide_index=True)
if p.group.id < len(pe.graph.groups()) and pe.graph.groups()[p.group.id].title == p.group.title:
    with st.expander("Subgraph: members, coupling chain and one hop of context", expanded=True):
        where = {} if verdict.ok else {
            p.group.id: f"{verdict.module} {verdict.location.rsplit('/', 1)[-1]}"}
        sub = build_view(pe.graph, group=p.group.id, unsafe=where).subgraph()
        graph_view(sub.to_component(), key="groups_graph", height=460,
                   model_key=f"{pe.version}:{p.group.id}")
with st.expander("Why these channels are coupled", expanded=True):
    st.markdown("\n".join(f"- {line}" for line in p.group.explanation) or "- (none)")
    st.dataframe(member_rows(p.group), key="groups_members", hide_index=True)
with st.expander(f"All pending proposals ({len(pending)})"):
    st.dataframe([{"id": q.group.id, "group": q.group.title,
                   "change": "; ".join(f"{ch.axis} {ch.width_before}→{ch.width_after}"
                                       for ch in q.changes)} for q in pending],
                 key="groups_pending", hide_index=True)
