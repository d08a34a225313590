"""What accepting the proposal on screen costs: quality in the colour of its severity,
continuations, the export it keeps, and the trade-off curve."""
from __future__ import annotations

import streamlit as st

from explorer.app.cost import Severity, Thresholds, Trail, cost_sentence, severity, would_be_rows
from explorer.app.decide import widths_differ
from explorer.app.session import Session
from explorer.prune.preflight import Verdict
from explorer.prune.proposal import Proposal
from explorer.prune.uniform import same_cut_everywhere
from explorer.quality.evaluate import Quality
from explorer.render.proposal_view import edited, layered
from pages._session import prompts_box

COLOUR = {Severity.OK: "green", Severity.WARN: "orange", Severity.ALARM: "red"}


def cost_box(pe: Session, now: Quality, after: Quality, t: Thresholds) -> None:
    """A measured cost in the colour of its severity."""
    st.markdown(f":{COLOUR[severity(after, t)]}-background["
                f"{cost_sentence(now, after, t, pe.quality_source, pe.compensation)}]")


def cost(pe: Session, p: Proposal, counts: dict[int, int], verdict: Verdict,
         t: Thresholds) -> Quality | None:
    """What accepting the counts on screen costs in quality (on a copy with weights), in the
    colour of its severity; with greedy continuations of the user's prompts for LLMs."""
    quality = pe.quality()
    if not verdict.ok or quality is None:
        return None
    try:
        with st.spinner("measuring what accepting costs (the cut on a copy with weights)"):
            after = pe.proposal_cost(p, edited(p, counts))
    except Exception as exc:  # noqa: BLE001 - shown as one line, the page still works
        st.warning(f"could not measure what accepting costs: {exc}")
        return None
    if after is None:
        return None
    cost_box(pe, quality, after, t)
    if pe.tokenizer is not None and callable(getattr(pe.model, "generate", None)):
        with st.expander("Greedy continuations if accepted", expanded=True):
            prompts = prompts_box("groups_prompts")
            if prompts:
                try:
                    rows = would_be_rows(pe, p, edited(p, counts), prompts,
                                         st.session_state.setdefault("pe_texts", {}))
                except Exception as exc:  # noqa: BLE001 - shown as one line
                    st.warning(f"could not continue the prompts: {exc}")
                else:
                    st.dataframe(rows, key="groups_continuations", hide_index=True,
                                 width="stretch")
    return after


def export_aware(pe: Session, p: Proposal, counts: dict[int, int], verdict: Verdict,
                 pending: list[Proposal], equal: dict[int, int] | None, t: Thresholds) -> None:
    """Before Accept: whether the cut keeps a `from_pretrained` folder, and one click for the
    same cut in every layer (and, asked, its cost); ``equal``: the counts that cut every
    layer of a group whose layers share tensors alike (the counts on screen do not)."""
    on_screen = edited(p, counts)
    if layered(p) and not verdict.ok:
        if equal is not None:
            st.warning("The layers of this group share tensors (on Llama-style models the "
                       "one rotary cos/sin row every layer reads), so each part must be cut "
                       "by the same count in every layer: unequal counts break the forward.")
            st.button("Accept with equal cuts in every layer", key="groups_accept_equal",
                      type="primary", on_click=lambda: pe.accept(p, equal))
        return
    if not verdict.ok or not callable(getattr(pe.model, "save_pretrained", None)):
        return
    differ = widths_differ(pe, p, on_screen, st.session_state.setdefault("pe_uniform", {}))
    if not differ:
        return
    same = same_cut_everywhere(p, pending)
    st.warning("Accepting this makes widths differ between layers, so no transformers config "
               "describes the result and the hf export will not be a `from_pretrained` "
               "folder (it falls back to safetensors + plan.json): "
               + "; ".join(f"`{line}`" for line in differ[:3])
               + (" ..." if len(differ) > 3 else "") + "."
               + (" Cut the same in every layer to keep one." if same is not None else ""))
    if same is None:
        return
    # its cost is not the one above (one layer): a newcomer accepted 30 layers' worth unseen
    quality = pe.quality()
    after = pe.cost_if_measured(same, on_screen)
    if after is None and quality is not None and st.button(
            f"What does the same cut in all {len(same.keys)} layers cost?",
            key="groups_same_cost", help="apply it to a copy with weights and measure"):
        try:
            with st.spinner(f"measuring the same cut in all {len(same.keys)} layers"):
                after = pe.proposal_cost(same, on_screen)
        except Exception as exc:  # noqa: BLE001 - shown as one line, the page still works
            st.warning(f"could not measure what it costs: {exc}")
    if after is not None and quality is not None:
        st.markdown(f"The same cut in all {len(same.keys)} layers:")
        cost_box(pe, quality, after, t)
    st.button(f"Accept the same cut in all {len(same.keys)} layers", key="groups_same_cut",
              type="primary", on_click=lambda: pe.accept(same, on_screen))


def tradeoff(pe: Session, verdict: Verdict | None, after: Quality | None,
             t: Thresholds) -> None:
    """Quality against parameters as decisions accumulate, and the proposal on screen."""
    quality = pe.quality()
    if quality is None:
        return
    trail: Trail = st.session_state.setdefault("pe_trail", {}).setdefault(id(pe), Trail())
    label = pe.history[-1] if pe.history else "the original"
    trail.record(len(pe.pruner.history.edits), pe.params, quality, label)  # model changes
    would_be = (verdict.params, after) if verdict is not None and verdict.ok and \
        verdict.params and after is not None else None
    st.plotly_chart(trail.figure(quality, would_be=would_be, thresholds=t,
                                 source=pe.quality_source),
                    key="groups_tradeoff", width="stretch")
