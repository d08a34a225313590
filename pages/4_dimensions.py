"""Dimensions & heads: per-layer widths before/after, costs per module, head checks."""
import streamlit as st

from explorer.metrics import macs_by_module
from explorer.render.figures import (cost_figure, head_table, params_by_module,
                                     widths_figure)
from explorer.ui_state import layer_widths

st.title("Dimensions & heads")
if "pe" not in st.session_state:
    st.info("Load a model on the Model page first.")
    st.stop()
pe = st.session_state.pe
st.plotly_chart(widths_figure(pe.widths_start, layer_widths(pe.model)), key="dims_widths",
                width="stretch")

st.subheader("Attention heads")
attrs = {name: int(mod.num_heads) for name, mod in pe.model.named_modules()
         if isinstance(getattr(mod, "num_heads", None), int)}
rows = head_table(pe.graph.groups(), attrs)
if rows:
    st.dataframe(rows, key="dims_heads", hide_index=True, width="stretch")
    st.caption("Whole-head pruning ratios must be multiples of 1/kv_heads (GQA) or 1/heads.")
else:
    st.info("The trace found no attention heads in this model.")

st.subheader("Cost per module")
params = {n: p.numel() for n, p in pe.model.named_parameters()}
st.plotly_chart(cost_figure(params_by_module(params, pe.graph.graph.param_owner),
                            macs_by_module(pe.graph.graph)), key="dims_cost",
                width="stretch")
