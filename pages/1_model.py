"""Model: choose a spec, build it, and see what the trace found."""
import streamlit as st

from explorer.app.display import (
    continuation_rows,
    group_rows,
    heading,
    input_placeholder,
    loaded_caption,
    unsafe_alone,
)
from explorer.app.session import Message
from explorer.app.sources import example_specs, plan_text, request_from_fields
from explorer.graph.metrics import count_params
from explorer.render.figures import compact, quality_text
from explorer.render.proposal_view import quality_note
from pages._session import heldout_path, load, prompts_box, session_or_stop, show


def _pick() -> None:
    st.session_state.model_spec = st.session_state.model_example


st.title("Model")
if "model_spec" not in st.session_state or "model_spec_next" in st.session_state:
    # the loaded spec (a local folder's hf:<folder> too), not what the box held before
    st.session_state.model_spec = st.session_state.pop("model_spec_next",
                                                       st.session_state.pe_request.spec)
st.selectbox("Examples", example_specs(), index=None, key="model_example", on_change=_pick,
             placeholder="pick a demo, transformers family or timm model")
st.caption("`demo:dino_vit` is DINO's exact attention code: it shows the `qkv[0]` indexing "
           "case and why its hard-coded `C // num_heads` reshape makes the residual-stream and "
           "head groups unsafe alone, with the failing file:line, and safe when cut together. "
           "`demo:dino_vit_safe` reads the head size from an attribute, so every group prunes.")
st.text_input("Model spec", key="model_spec",
              help="timm:<name>?k=v, hf:<family>?k=v, demo:<name> or path/file.py:callable")
c1, c2 = st.columns(2)
c1.radio("Device", ["cpu", "meta"], key="model_device", horizontal=True,
         help="meta builds shapes only: explore big models without weights")
current = st.session_state.get("pe")
c2.text_input("Input shape (blank = default)", key="model_shape",
              placeholder=input_placeholder(current.example_inputs) if current else "default")
DATA_DEFAULTS = {"model_path": "", "model_upload": None, "model_calib": "",
                 "model_calib_up": None, "model_heldout": "", "model_heldout_up": None,
                 "model_samples": 0, "model_seq_len": 128, "model_batch": 8}
# open while any of its fields is set: an edit reruns the page, which must not close it; the
# key keeps it one element (the browser remounted it, fields and all, when `expanded` changed)
with st.expander("Local checkpoint and data (real weights, real text or images)",
                 key="model_local", expanded=any(st.session_state.get(k, v) != v
                                                 for k, v in DATA_DEFAULTS.items())):
    st.text_input("Local folder or weights file", key="model_path",
                  placeholder="/models/all-MiniLM-L6-v2  (config.json + weights + tokenizer)",
                  help="a transformers folder (single or sharded safetensors, tokenizer) loads "
                       "as hf:<folder>; a timm folder as timm:<folder>; a file is a state "
                       "dict (.safetensors, *.index.json or .pt, weights_only) for the spec")
    st.file_uploader("... or upload a weights file", type=["safetensors", "pt", "pth", "bin"],
                     key="model_upload")
    d = st.columns(2)
    d[0].text_input("Calibration data", key="model_calib",
                    placeholder=".txt (one sample a line), .jsonl, image folder or .pt")
    d[0].file_uploader("... or upload it", type=["txt", "jsonl", "pt"], key="model_calib_up")
    d[1].text_input("Held-out data (quality)", key="model_heldout",
                    placeholder="other samples than calibration")
    d[1].file_uploader("... or upload it", type=["txt", "jsonl", "pt"], key="model_heldout_up")
    o = st.columns(3)
    o[0].number_input("Samples (0 = all)", 0, 100_000, 16, key="model_samples",
                      help="the first N samples of each file; data-aware criteria score on "
                           "them again after every accept, so more samples are slower")
    o[1].number_input("Sequence length", 2, 8192, 128, key="model_seq_len")
    o[2].number_input("Batch size", 1, 1024, 8, key="model_batch")


if st.button("Load and trace", key="model_load", type="primary"):
    try:
        request = request_from_fields(st.session_state)
    except ValueError as exc:
        st.session_state.pe_error = str(exc)
    else:
        if load(request):
            st.session_state.model_spec_next = request.spec  # a folder's hf:<folder> too
            st.rerun()  # draw the fields above (input-shape placeholder) for the new model
if st.session_state.get("pe_error"):
    st.error(st.session_state.pe_error)

pe = session_or_stop("No model is loaded yet.")


def _apply_plan() -> None:
    text = plan_text(st.session_state.model_plan, st.session_state.model_plan_text)
    if text is None:
        pe.message = Message.error("no plan: upload a plan JSON file or paste its text")
    else:
        pe.apply_plan(text)
    st.session_state.model_plan_msg = pe.message


with st.expander("Replay a pruning plan on this model"):
    st.file_uploader("Plan JSON (from the Export page or explorer.plan)", type=["json"],
                     key="model_plan")
    st.text_area("... or paste it", key="model_plan_text", height=80)
    st.button("Apply plan", key="model_plan_apply", on_click=_apply_plan)
if (msg := st.session_state.pop("model_plan_msg", None)) is not None:
    show(msg)
mg = pe.graph
title = heading(pe.spec)
st.subheader(title.name, help=f"spec: `{pe.spec}`")
if title.options:
    st.caption(f"options: {title.options}")
info = st.session_state.get("pe_loaded", {})
st.caption(loaded_caption(info, pe.calibration is not None))
for note in info.get("notes", []):
    st.warning(note)
m = st.columns(5)
m[0].metric("parameters", compact(count_params(pe.model)), help=f"{count_params(pe.model):,}")
m[1].metric("MACs", compact(pe.macs), help=f"{pe.macs:,}")
m[2].metric("ATen ops", mg.num_ops)
m[3].metric("prunable groups", f"{sum(g.prunable for g in mg.groups())} / {len(mg.groups())}")
quality = pe.quality()
if quality is not None:
    m[4].metric(*quality_text(quality), help=f"measured on {pe.quality_source}")
    note, command = quality_note(quality, pe.quality_source, pe.spec,
                                 heldout_path())
    st.caption(note, help=command)
if pe.tokenizer is not None and callable(getattr(pe.model, "generate", None)) \
        and not pe.on_meta:
    lines = prompts_box("model_prompts")
    if lines:
        st.dataframe(continuation_rows(pe.continuations(lines)), key="model_continuations",
                     hide_index=True, width="stretch")
AUTO_PREFLIGHT = 16  # up to this many pending groups the verdicts are computed on load
undecided = pe.undecided()  # counted without scoring: scores are computed when needed
verdicts: dict[int, str] = {}
if undecided and (undecided <= AUTO_PREFLIGHT or st.session_state.get("model_verdicts_for")
                  == pe.version):
    bar = st.progress(0.0, text="pre-flight of every group") \
        if len(pe.proposals()) > 4 else None
    verdicts = pe.verdict_labels(None if bar is None else
                                 lambda f, text: bar.progress(f, text=text))
    if bar is not None:
        bar.empty()
elif undecided and st.button(f"Pre-flight every group ({undecided}, about "
                             f"{undecided} forward passes)", key="model_verdicts"):
    st.session_state.model_verdicts_for = pe.version
    st.rerun()
st.dataframe(group_rows(mg.groups(), verdicts), key="model_groups", hide_index=True,
             width="stretch")
if unsafe_alone(verdicts):
    st.warning("Some groups are unsafe to cut alone but safe together (see pre-flight): the "
               "Groups page offers them as one joint proposal, and Accept all cuts them "
               "together.")
unknown = mg.coupling.unknown_ops
if unknown:
    st.warning(f"ops with no coupling rule (treated conservatively): {', '.join(sorted(unknown))}")

