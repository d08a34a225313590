"""Export: check the forward, download the pruned model and a JSON report."""
import json

import streamlit as st

st.title("Export")
if "pe" not in st.session_state:
    st.info("Load a model on the Model page first.")
    st.stop()
pe = st.session_state.pe
if st.button("Run forward check", key="export_check"):
    msg = pe.forward_check()
    getattr(st, msg.kind)(msg.text)

report = pe.report()
c1, c2 = st.columns(2)
c1.download_button("Download pruned model (torch.save)", pe.model_bytes(),
                   file_name="pruned_model.pt", mime="application/octet-stream",
                   key="export_model", help="torch.load(path, weights_only=False)")
c2.download_button("Download JSON report", json.dumps(report, indent=2),
                   file_name="pruning_report.json", mime="application/json",
                   key="export_report")
st.json(report, expanded=False)
