"""Graph: the traced model as nested modules, interactive, one group and its chain highlighted."""
import streamlit as st

from components.graph_view import graph_view
from explorer.render.dot import dot_to_svg, graph_to_dot, has_dot
from explorer.render.figures import member_rows, search_modules
from explorer.render.view import build_view
from pages._session import session_or_stop

st.title("Graph")
pe = session_or_stop()
mg = pe.graph
groups = mg.groups()
click = st.session_state.get("graph_view")
if isinstance(click, dict) and click.get("n") != st.session_state.get("graph_click_n"):
    st.session_state.graph_click_n = click.get("n")  # a new click in the graph selects its group
    st.session_state.graph_node = click.get("node")
    if click.get("group") is not None and click["group"] < len(groups):
        st.session_state.graph_group = click["group"]
c1, c2, c3, c4 = st.columns([2, 3, 2, 1])
depth = c1.slider("Expanded to depth", 1, 6, 2, key="graph_depth")
gid = c2.selectbox("Group", [None, *range(len(groups))], key="graph_group",
                   format_func=lambda i: "none" if i is None else f"{i}: {groups[i].title}")
query = c3.text_input("Search module", key="graph_search", placeholder="e.g. attn.qkv, Linear")
fold = c4.checkbox("Fold repeats", value=True, key="graph_fold")
if gid is not None and gid >= len(groups):
    gid = None  # the model changed under the selection (a prune or a new model)
found = search_modules(mg.graph.modules, query)
if query.strip():
    if found:
        st.caption(f"{len(found)} module(s) match '{query.strip()}' (red border): "
                   + ", ".join(found[:12]) + (" ..." if len(found) > 12 else ""))
    else:
        st.info(f"No module name or class contains '{query.strip()}'.")
unsafe: dict[int, str] = {}
if gid is not None:  # pre-flight the selected group's pending proposal: unsafe shows file:line
    try:
        p = next((q for q in pe.proposals() if q.group.id == gid), None)
        verdict = pe.preflight(p) if p is not None else None
    except Exception:  # noqa: BLE001 - e.g. a criterion that needs weights on meta
        verdict = None
    if verdict is not None and not verdict.ok:
        unsafe[gid] = f"{verdict.module} {verdict.location.rsplit('/', 1)[-1]}"
        st.warning(f"Pruning group {gid} breaks the forward in {verdict.module} "
                   f"{verdict.location}: {verdict.error}")
view = build_view(mg, depth=depth, group=gid, fold=fold, search=found, unsafe=unsafe)
model_key = f"{pe.spec}:{mg.num_ops}:{len(groups)}:{depth}:{fold}"
graph_view(view.to_component(), key="graph_view", model_key=model_key,
           selected=st.session_state.get("graph_node"))
clicked = next((n for n in view.nodes if n.id == st.session_state.get("graph_node")), None)
if clicked is not None and 1 < len(clicked.group_ids) <= 6:  # a node in several groups
    if st.session_state.get("graph_node_pick") not in clicked.group_ids or \
            st.session_state.get("graph_node_for") != clicked.id:
        st.session_state.graph_node_pick = gid if gid in clicked.group_ids else \
            clicked.group_ids[0]
    st.session_state.graph_node_for = clicked.id
    st.radio(f"`{clicked.module or clicked.label}` carries the channels of "
             f"{len(clicked.group_ids)} groups; select one", clicked.group_ids,
             key="graph_node_pick", horizontal=True,
             format_func=lambda i: f"{i}: {groups[i].title}",
             on_change=lambda: st.session_state.update(
                 graph_group=st.session_state.graph_node_pick))
if gid is not None:
    g = groups[gid]
    st.markdown(f"**Selected group {gid}: {g.title}** — members filled orange, the coupling "
                "chain in red (coupled dims starred on each edge), ops that pin an axis cut "
                "at the corners.")
    if not g.prunable:
        st.warning(f"not prunable: {g.reason}")
    with st.expander(f"Why group {gid} is coupled", expanded=False):
        st.markdown("\n".join(f"{n}. {line}" for n, line in enumerate(g.explanation, 1))
                    or "- (no explanation)")
        st.dataframe(member_rows(g), key="graph_members", hide_index=True)


def _dot() -> str:  # made on click (a deferred download), from the same view model
    return graph_to_dot(mg, depth=depth, highlight_group=gid, fold_repeats=fold,
                        highlight_modules=found)


d1, d2 = st.columns(2)
d1.download_button("Download DOT", _dot, file_name="model.dot", mime="text/vnd.graphviz",
                   key="graph_dl_dot", on_click="ignore")
if has_dot():
    d2.download_button("Download SVG", lambda: dot_to_svg(_dot()), file_name="model.svg",
                       mime="image/svg+xml", key="graph_dl_svg", on_click="ignore")
else:
    d2.caption("Install graphviz `dot` to export SVG.")
