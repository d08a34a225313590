"""Graph: the traced model collapsed by module depth, one group highlighted."""
import streamlit as st

from explorer.render.dot import dot_to_svg, graph_to_dot, has_dot

st.title("Graph")
if "pe" not in st.session_state:
    st.info("Load a model on the Model page first.")
    st.stop()
mg = st.session_state.pe.graph
groups = mg.groups()
c1, c2, c3 = st.columns([2, 3, 1])
depth = c1.slider("Module depth", 1, 6, 2, key="graph_depth")
gid = c2.selectbox("Highlight group", [None, *range(len(groups))], key="graph_group",
                   format_func=lambda i: "none" if i is None else f"{i}: {groups[i].title}")
fold = c3.checkbox("Fold repeats", value=True, key="graph_fold")
if gid is not None and gid >= len(groups):
    gid = None  # the model changed under the selection (a prune or a new model)
dot = graph_to_dot(mg, depth=depth, highlight_group=gid, fold_repeats=fold)

if gid is not None:
    g = groups[gid]
    with st.expander(f"Why group {gid} ({g.title}) is coupled", expanded=True):
        st.markdown("\n".join(f"- {line}" for line in g.explanation) or "- (no explanation)")
        if not g.prunable:
            st.warning(f"not prunable: {g.reason}")
        st.dataframe([{"module": m.module, "parameter": m.param, "dim": m.dim, "size": m.size}
                      for m in g.members], key="graph_members", hide_index=True)
st.graphviz_chart(dot, width="stretch")
d1, d2 = st.columns(2)
d1.download_button("Download DOT", dot, file_name="model.dot", mime="text/vnd.graphviz",
                   key="graph_dl_dot")
if has_dot():
    d2.download_button("Download SVG", dot_to_svg(dot), file_name="model.svg",
                       mime="image/svg+xml", key="graph_dl_svg")
else:
    d2.caption("Install graphviz `dot` to export SVG.")
