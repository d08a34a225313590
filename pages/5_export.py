"""Export: check the forward, download the pruned model, its plan and a report."""
import json
import tempfile
from pathlib import Path

import streamlit as st

from explorer.io.export import FORMATS
from explorer.prune.records import said_once
from pages._session import prompt_lines, session_or_stop, show

st.title("Export")
pe = session_or_stop()
if st.button("Run forward check", key="export_check"):
    msg = pe.forward_check()
    show(msg)

try:
    plan_text = json.dumps(pe.plan().to_dict(), indent=1)
except Exception as exc:  # noqa: BLE001 - e.g. a removed block: shown as one line
    plan_text = None
    st.info(f"No plan: {exc}")
c1, c2, c3 = st.columns(3)
c1.download_button("Download plan JSON", plan_text or "", file_name="plan.json",
                   mime="application/json", key="export_plan", disabled=plan_text is None,
                   on_click="ignore", help="replay with explorer.Plan.load(path).apply(model)")
c2.download_button("Download pruned model (torch.save)", pe.model_bytes,  # made on click
                   file_name="pruned_model.pt", mime="application/octet-stream",
                   key="export_model", on_click="ignore",
                   help="torch.load(path, weights_only=False)")
c3.download_button("Download JSON session log", lambda: json.dumps(pe.report(), indent=2),
                   file_name="pruning_session.json", mime="application/json",
                   key="export_report", on_click="ignore")

config_box = st.empty()  # why no transformers config fits, unless the export notes say it
st.subheader("All formats")
default = [f for f in FORMATS if f != "hf" or pe.spec.startswith("hf:")]
formats = st.multiselect("Formats", FORMATS, default=default, key="export_formats",
                         help="report measures latency before and after on this machine")
if st.button("Build export files", key="export_build", type="primary", disabled=not formats):
    bar = st.progress(0.0, text="exporting")
    # Built files live on disk in this browser session's own temporary folder (removed with
    # the session, replaced by the next build); downloads stream them from there.
    folder = tempfile.TemporaryDirectory(prefix="pe-export-")
    try:
        built: dict[str, Path] = {}
        messages: list[str] = []
        for i, fmt in enumerate(formats):  # one format at a time, so the bar is real progress
            bar.progress(i / len(formats), text=f"exporting {fmt}"
                         + (" (measuring latency before and after)" if fmt == "report" else ""))
            got, notes = pe.export_files((fmt,), folder.name,
                                         prompts=prompt_lines(st.session_state))
            built.update(got)
            messages = said_once([*messages, *notes])
        st.session_state.export_files = (pe.version, built, messages, folder)
    except Exception as exc:  # noqa: BLE001 - shown as one line, the session is untouched
        folder.cleanup()
        st.error(f"export failed: {exc}")
    finally:
        bar.empty()
version, files, notes, _folder = st.session_state.get("export_files", (None, {}, [], None))
built = version == pe.version and bool(files)
if pe.config_line(notes if built else []):
    config_box.info(pe.config_line(notes if built else []))
if built:
    for note in notes:
        st.caption(note)
    cols = st.columns(min(len(files), 4))
    for n, (name, path) in enumerate(files.items()):
        cols[n % len(cols)].download_button(f"Download {name}", path.read_bytes,
                                            file_name=name, key=f"export_file_{n}",
                                            on_click="ignore")
    if "report.md" in files:
        with st.expander("Report", expanded=True):
            st.markdown(files["report.md"].read_text())
st.json(pe.report(), expanded=False)
