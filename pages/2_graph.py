"""Graph: the traced model collapsed by module depth, one group and a search highlighted."""
import streamlit as st

from explorer.render.dot import dot_to_svg, graph_to_dot, has_dot
from explorer.render.figures import member_rows, search_modules

st.title("Graph")
if "pe" not in st.session_state:
    st.info("Load a model on the Model page first.")
    st.stop()
mg = st.session_state.pe.graph
groups = mg.groups()
c1, c2, c3, c4 = st.columns([2, 3, 2, 1])
depth = c1.slider("Module depth", 1, 6, 2, key="graph_depth")
gid = c2.selectbox("Highlight group", [None, *range(len(groups))], key="graph_group",
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
dot = graph_to_dot(mg, depth=depth, highlight_group=gid, fold_repeats=fold,
                   highlight_modules=found)

if gid is not None:
    g = groups[gid]
    with st.expander(f"Why group {gid} ({g.title}) is coupled", expanded=True):
        st.markdown("\n".join(f"{n}. {line}" for n, line in enumerate(g.explanation, 1))
                    or "- (no explanation)")
        if not g.prunable:
            st.warning(f"not prunable: {g.reason}")
        st.dataframe(member_rows(g), key="graph_members", hide_index=True)
st.graphviz_chart(dot, width="stretch")
d1, d2 = st.columns(2)
d1.download_button("Download DOT", dot, file_name="model.dot", mime="text/vnd.graphviz",
                   key="graph_dl_dot")
if has_dot():
    d2.download_button("Download SVG", dot_to_svg(dot), file_name="model.svg",
                       mime="image/svg+xml", key="graph_dl_svg")
else:
    d2.caption("Install graphviz `dot` to export SVG.")
