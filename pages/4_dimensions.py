"""Dimensions & heads: widths before/after, head checks, costs, sensitivity, depth pruning."""
import pandas as pd
import streamlit as st

from explorer.app.session import layer_widths
from explorer.coupling.places import natural_key
from explorer.graph.metrics import macs_by_module
from explorer.prune.sensitivity import as_table
from explorer.render.figures import (
    attention_rows,
    cost_figure,
    layer_grid,
    params_by_module,
    sensitivity_figure,
    widths_figure,
)
from pages._session import session_or_stop, show

st.title("Dimensions & heads")
pe = session_or_stop()
AUTO_PREFLIGHT = 16  # pending groups up to which the verdicts are computed on render

if (msg := st.session_state.pop("dims_message", None)) is not None:
    show(msg)
widths_now = layer_widths(pe.model)
st.plotly_chart(widths_figure(pe.widths_start, widths_now), key="dims_widths",
                width="stretch")
grid = layer_grid(pe.widths_start, widths_now)
if len(grid.layers) >= 2 and grid.outside:
    st.caption("Outside the numbered layers (embeddings, heads of the model: drawn apart, "
               "their widths would flatten the layers')")
    st.dataframe(grid.outside_rows(), key="dims_outside", hide_index=True)

st.subheader("Attention heads")
rows = sorted(attention_rows(pe.graph.attention()), key=lambda r: natural_key(str(r["module"])))
verdicts = pe.verdict_labels() if len(pe.proposals()) <= AUTO_PREFLIGHT else {}
for r in rows:  # the pre-flight of each head group, alone and jointly, up front
    r["pre-flight"] = verdicts.get(int(str(r["group"])), "")
if rows:
    table = pd.DataFrame(rows)
    first = ["module", "heads", "head_dim", "kv_heads", "ok", "pre-flight", "violations"]
    table = table[[*first, *(c for c in table.columns if c not in first)]]
    st.dataframe(table.style.apply(lambda r: ["" if r["ok"] else "background-color: #F8D7DA"]
                                   * len(r), axis=1), key="dims_heads", hide_index=True,
                 width="stretch", column_config={
                     "module": st.column_config.TextColumn(width="medium"),
                     "projections": st.column_config.TextColumn(width="small"),
                     "widths": st.column_config.TextColumn(width="small")})
    unsafe = [r for r in rows if str(r["pre-flight"]).startswith("unsafe")]
    if unsafe:
        st.warning(f"{len(unsafe)} head group(s) are unsafe to cut alone: "
                   + "; ".join(f"{r['module']}: {r['pre-flight']}" for r in unsafe))
    bad = [r for r in rows if not r["ok"]]
    if bad:
        st.warning(f"{len(bad)} attention module(s) violate head divisibility: "
                   + "; ".join(f"{r['module']}: {r['violations']}" for r in bad))
    st.caption("Whole-head pruning ratios must be multiples of 1/kv_heads (GQA) or 1/heads.")
else:
    st.info("The trace found no attention heads in this model.")

st.subheader("Cost per module")
params = {n: p.numel() for n, p in pe.model.named_parameters()}
st.plotly_chart(cost_figure(params_by_module(params, pe.graph.graph.param_owner),
                            macs_by_module(pe.graph.graph)), key="dims_cost", width="stretch")

st.subheader("Sensitivity")
ratios = st.multiselect("Ratios", [0.1, 0.25, 0.5, 0.75, 0.9], default=[0.25, 0.5, 0.75],
                        key="dims_sens_ratios")
if st.button("Compute sensitivity", key="dims_sens", disabled=not ratios,
             help="prunes each group alone on a copy and measures the output change"):
    bar = st.progress(0.0, text="pruning each group alone ...")
    try:
        rows = pe.sensitivity(ratios, lambda f, text: bar.progress(f, text=text))
        st.session_state.dims_sens_rows = (pe.version, as_table(rows))
    except Exception as exc:  # noqa: BLE001 - shown as one line
        st.error(f"sensitivity failed: {exc}")
    finally:
        bar.empty()
version, sens = st.session_state.get("dims_sens_rows", (None, []))
if version == pe.version and sens:
    st.plotly_chart(sensitivity_figure(sens), key="dims_sens_chart", width="stretch")

st.subheader("Residual blocks (depth pruning)")
blocks = pe.graph.blocks()
if not blocks:
    st.info("No residual block can be removed whole in this model.")
    st.stop()
st.dataframe([{"block": b.module, "params": b.params, "shape": str(list(b.shape))}
              for b in blocks], key="dims_blocks", hide_index=True)


def _remove() -> None:
    pe.remove_block(st.session_state.dims_block)
    st.session_state.dims_message = pe.message


c1, c2, c3 = st.columns([3, 1, 1])
c1.selectbox("Block", [b.module for b in blocks], key="dims_block")
c2.button("Remove block", key="dims_remove", on_click=_remove,
          help="pre-flighted on a weightless copy first; replaced by identity")
c3.button("Undo", key="dims_undo", disabled=not pe.can_undo,
          on_click=lambda: (pe.undo(), st.session_state.update(dims_message=pe.message)))
