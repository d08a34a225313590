"""Groups: decide on one proposal at a time (pre-flight, counts, accept, reject, undo).

Each section is one function over the session (`explorer.app.session.Session`) so a new
view of the current proposal is one more function and one call at the bottom.
"""
from __future__ import annotations

import contextlib
import dataclasses

import streamlit as st

from components.graph_view import graph_view
from explorer.app.cost import (
    Severity,
    Thresholds,
    Trail,
    by_cost,
    cost_label,
    cost_sentence,
    measure_all,
    measured,
    severity,
    would_be_rows,
)
from explorer.app.session import Session
from explorer.coupling.targets import TARGET_NAMES
from explorer.prune.compensate import Compensation
from explorer.prune.importance import CRITERIA
from explorer.prune.preflight import Verdict
from explorer.prune.proposal import Proposal
from explorer.prune.pruner import HEAD_MODES
from explorer.prune.uniform import breaks_uniform, same_cut_everywhere
from explorer.quality.evaluate import Quality
from explorer.render.proposal_view import (
    axis_figure,
    axis_rows,
    chart_words,
    count_label,
    edited,
    equal_counts,
    head_structure,
    heatmap_figure,
    joint_text,
    layer_caption,
    layer_table,
    layered,
    member_table,
    metric_cards,
    pending_rows,
    quality_note,
    removed_for,
    short_location,
    statement_lines,
    table_counts,
    verdict_text,
)
from explorer.render.view import build_view
from pages._session import heldout_path, prompts_box, remember, remembered, reset, show

COMPENSATIONS = ["none", *(c.value for c in Compensation)]
KEYS = ("groups_criterion", "groups_ratio", "groups_heads", "groups_global", "groups_round",
        "groups_targets")


def settings(pe: Session) -> None:
    if st.session_state.pop("groups_configure", False):  # a setting changed: score with a bar
        bar = st.progress(0.0, text="scoring the groups with the new settings")
        pe.configure(*(st.session_state[k] for k in KEYS),
                     progress=lambda f, text: bar.progress(f, text=f"scoring: {text}"))
        bar.empty()
    for k, v in zip(KEYS, pe.settings(), strict=True):  # the session is the source of truth
        st.session_state[k] = list(v) if isinstance(v, tuple) else v

    def configure() -> None:
        st.session_state.groups_configure = True  # done above, where a bar can be drawn

    c = st.columns(5)
    c[0].selectbox("Importance", sorted(CRITERIA), key=KEYS[0], on_change=configure)
    c[1].slider("Ratio", 0.0, 0.9, step=0.05, key=KEYS[1], on_change=configure)
    c[2].selectbox("Heads", HEAD_MODES, key=KEYS[2], on_change=configure,
                   help="dims: same dims in every head; whole: whole heads (whole key/value "
                        "groups under GQA); query: query heads inside every key/value group; "
                        "keep: no attention change")
    c[3].toggle("Global ranking", key=KEYS[3], on_change=configure,
                help="rank channels of all groups together instead of the ratio per group")
    c[4].number_input("Round widths to", 1, 256, step=1, key=KEYS[4], on_change=configure)
    st.session_state.groups_compensate = pe.compensation
    row = st.columns([1, 3])
    row[0].selectbox("Compensation", COMPENSATIONS, key="groups_compensate",
                 on_change=lambda: pe.set_compensation(st.session_state.groups_compensate),
                 help="after each accept, refit the layers that read removed channels on the "
                      "calibration data: bias (the mean of what was removed, FLAP) or lstsq "
                      "(ridge least squares, layer by layer, kept only where it helps on "
                      "held-out calibration samples); the cost shown before Accept is "
                      "measured without it")
    row[1].multiselect("Targets", TARGET_NAMES, key=KEYS[5], on_change=configure,
                   help="what may be cut: mlp (feed-forward hidden units), heads (attention), "
                        "residual (the hidden size: embeddings, norms, every projection), "
                        "channels (convolutions, other layers)")
    try:
        said = pe.statement()
    except Exception:  # noqa: BLE001 - main() reports the same failure of the proposals
        said = None
    if said is not None:
        with st.expander(f"What these settings cut: params {said.params_before:,} -> "
                         f"{said.params_after:,}", expanded=False):
            st.markdown("\n".join(statement_lines(said)))
    if pe.on_meta:
        st.caption("The weights are on the meta device: there are no scores to rank, so the "
                   "lowest indices are proposed (load on cpu for importance charts).")


def counts_editor(pe: Session, p: Proposal) -> dict[int, int]:
    """The counts on screen: a few inputs, or one layer table for a group spanning layers."""
    proposal_id = (pe.version, tuple(p.keys), pe.settings())
    fresh = st.session_state.get("groups_for") != proposal_id
    if fresh:  # a new proposal: the widgets start from the proposed counts
        st.session_state.groups_for = proposal_id
        st.session_state.pop("groups_table", None)
        for n, ch in enumerate(p.changes):
            st.session_state[f"groups_count_{n}"] = len(ch.removed)
    if not layered(p):
        cols = st.columns(len(p.axes))
        return {axis: int(cols[n].number_input(count_label(pe.graph.coupling, p, n), 0,
                                               ch.width_before - 1, key=f"groups_count_{n}"))
            for n, (axis, ch) in enumerate(zip(p.axes, p.changes, strict=True))}
    rows = axis_rows(pe.graph.coupling, p)
    st.caption(layer_caption(rows))
    table = st.data_editor(layer_table(rows), key="groups_table", hide_index=True,
                           width="stretch", disabled=["layer", "part", "width"],
                           column_config={"remove": st.column_config.NumberColumn(
                               "remove", min_value=0, step=1)})
    return table_counts(rows, table)


def verdict_box(pe: Session, p: Proposal, verdict: Verdict, joint: Proposal | None) -> None:
    (st.success if verdict.ok else st.warning)(verdict_text(verdict))
    if joint is not None:
        st.info(joint_text(joint))


def metrics(pe: Session, verdict: Verdict | None, pending: int) -> None:
    with st.spinner(f"measuring quality on {pe.quality_source}"):
        quality = pe.quality()  # cached per model version: a spinner only after a change
    cards = metric_cards((pe.params, pe.params_start), (pe.macs, pe.macs_start), pending,
                         verdict, quality, pe.quality_source)
    for column, card in zip(st.columns(len(cards)), cards, strict=True):
        if card is not None:
            column.metric(card.label, card.value, card.delta, help=card.help,
                          delta_color="inverse" if card.inverse else "normal")
    if quality is not None:
        note, command = quality_note(quality, pe.quality_source, pe.spec,
                                     heldout_path())
        st.caption(note, help=command)


def thresholds() -> Thresholds:
    """The cost thresholds (sidebar); they outlive the page."""
    names = [f.name for f in dataclasses.fields(Thresholds)]
    saved: Thresholds = st.session_state.setdefault("pe_thresholds", Thresholds())

    def changed() -> None:
        try:
            st.session_state.pe_thresholds = Thresholds(
                **{n: float(st.session_state[f"cost_{n}"]) for n in names})
        except ValueError as exc:
            st.session_state.cost_error = str(exc)

    with st.sidebar.expander("Cost thresholds (yellow, red)"):
        for n in names:
            st.session_state[f"cost_{n}"] = getattr(saved, n)
        st.number_input("perplexity ×original: yellow above", 1.0, 1e6, step=0.05,
                        key="cost_perplexity_warn", on_change=changed)
        st.number_input("perplexity ×original: red above", 1.0, 1e6, step=0.1,
                        key="cost_perplexity_alarm", on_change=changed)
        st.number_input("agreement with the original: yellow below", 0.0, 1.0, step=0.01,
                        key="cost_agreement_warn", on_change=changed,
                        help="top-1 agreement where the model outputs logits, else cosine")
        st.number_input("agreement with the original: red below", 0.0, 1.0, step=0.01,
                        key="cost_agreement_alarm", on_change=changed)
        if (error := st.session_state.pop("cost_error", None)) is not None:
            st.error(error)
    return st.session_state.pe_thresholds  # type: ignore[no-any-return]


def pick(pe: Session, pending: list[Proposal], t: Thresholds) -> Proposal:
    """The proposal to decide on: the first pending one, or one the user picks (ordered by
    measured cost when asked)."""
    costs = measured(pe, pending)
    c = st.columns([5, 2, 2])
    measurable = pe.quality() is not None  # not on meta: no weights, no cost to show
    order = remembered("groups_by_cost", False) and measurable
    if measurable:
        c[1].toggle("Cheapest first", key="groups_by_cost", on_change=remember,
                    args=("groups_by_cost",), help="order the proposals by their measured cost")
    if order:
        pending = by_cost(pending, costs)
    missing = [p for p in pending if costs.get(p.key) is None]
    if missing and measurable and c[2].button(
            f"Measure all costs ({len(missing)})", key="groups_measure_all",
            help="apply each proposal to a copy with weights and measure its quality"):
        bar = st.progress(0.0, text="measuring costs")
        failed = measure_all(pe, missing, lambda f, text: bar.progress(f, text=text))
        bar.empty()
        for line in failed:
            st.warning(f"could not measure {line}")
        costs = measured(pe, pending)
        if order:
            pending = by_cost(pending, costs)
    keys = [p.key for p in pending]
    state = (id(pe), pe.version, pe.settings(), order)
    picked = st.session_state.get("groups_pick")
    if picked not in keys or st.session_state.get("groups_pick_for") != state:
        picked = keys[0]  # a new model state or settings: the first
    # Set on every run: the browser holds the pick by its label, which changes once its cost
    # is measured; without this it kept showing "not measured" above the measured cost.
    st.session_state.groups_pick = picked
    st.session_state.groups_pick_for = state
    by_key = {p.key: p for p in pending}
    if costs.get(st.session_state.groups_pick) is None and measurable:
        # the proposal on screen: its cost is shown below anyway (and says why it fails)
        with contextlib.suppress(Exception), st.spinner(
                "measuring what accepting the proposal on screen costs (a forward)"):
            costs[st.session_state.groups_pick] = pe.proposal_cost(
                by_key[st.session_state.groups_pick])
    chosen = c[0].selectbox(
        "Proposal", keys, key="groups_pick",
        format_func=lambda k: by_key[k].group.title + (
            f" · {cost_label(costs.get(k), t)}" if measurable else ""))
    return by_key[chosen]


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


def subgraph(pe: Session, p: Proposal, verdict: Verdict) -> None:
    """The proposal's members, coupling chain and one hop of context."""
    groups = pe.graph.groups()
    if p.group.id >= len(groups) or groups[p.group.id].title != p.group.title:
        return
    with st.expander("Subgraph: members, coupling chain and one hop of context",
                     expanded=not layered(p)):
        where = {} if verdict.ok else {
            p.group.id: f"{verdict.module} {short_location(verdict.location)}"}
        sub = build_view(pe.graph, group=p.group.id, unsafe=where).subgraph()
        graph_view(sub.to_component(), key="groups_graph", height=460,
                   model_key=f"{pe.version}:{p.group.id}")


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
    cache = st.session_state.setdefault("pe_uniform", {})
    key = (id(pe), pe.version, tuple(p.keys), tuple(sorted((on_screen or {}).items())))
    if key not in cache:
        try:
            cache[key] = breaks_uniform(pe.model, pe.graph.coupling, p.removal(on_screen))
        except Exception:  # noqa: BLE001 - the pre-flight already said the cut fits
            cache[key] = []
    if not cache[key]:
        return
    same = same_cut_everywhere(p, pending)
    st.warning("Accepting this makes widths differ between layers, so no transformers config "
               "describes the result and the hf export will not be a `from_pretrained` "
               "folder (it falls back to safetensors + plan.json): "
               + "; ".join(f"`{line}`" for line in cache[key][:3])
               + (" ..." if len(cache[key]) > 3 else "") + "."
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


def actions(pe: Session, p: Proposal, counts: dict[int, int], verdict: Verdict,
            joint: Proposal | None) -> None:
    b = st.columns(6)
    on_screen = edited(p, counts)
    b[0].button("Accept", key="groups_accept", type="primary", disabled=not verdict.ok,
                help="apply the counts on screen" if verdict.ok else
                "unsafe alone: see the pre-flight (and the joint proposal, if any)",
                on_click=lambda: pe.accept(p, on_screen))
    if joint is not None and joint.joint:
        b[1].button(f"Accept jointly ({len(joint.keys)} groups)", key="groups_accept_joint",
                    type="primary", on_click=lambda: pe.accept(joint, on_screen))
    elif joint is not None:  # the outer axis, as proposed (the counts on screen are inner)
        b[1].button(f"Accept on the outer axis ({joint.changes[0].width_after} left)",
                    key="groups_accept_joint", type="primary",
                    on_click=lambda: pe.accept(joint))
    b[2].button("Reject", key="groups_reject", on_click=lambda: pe.reject(p))
    b[3].button("Undo", key="groups_undo", on_click=pe.undo, disabled=not pe.can_undo)
    if b[4].button("Accept all", key="groups_accept_all",
                   help="accept every remaining proposal (joint sets included)"):
        bar = st.progress(0.0, text="Accept all")
        pe.accept_all(lambda f, text: bar.progress(f, text=text))
        bar.empty()
        st.rerun()
    b[5].button("Reset", key="groups_reset", on_click=reset,
                help="forget every decision and start again from the unpruned model")


def chart(pe: Session, p: Proposal, counts: dict[int, int]) -> None:
    if pe.on_meta:
        return
    if layered(p):
        rows = axis_rows(pe.graph.coupling, p, counts)
        st.plotly_chart(heatmap_figure(rows, p, counts, pe.importance), key="groups_heatmap",
                        width="stretch")
        return
    removed = removed_for(p, counts)
    cols = st.columns(len(p.axes))
    for n, axis in enumerate(p.axes):
        cols[n].plotly_chart(axis_figure(p.scores[axis], removed[axis],
                                         *chart_words(p, n, pe.importance)),
                             key=f"groups_importance_{n}", width="stretch")


def details(pe: Session, p: Proposal, pending: list[Proposal], t: Thresholds) -> None:
    if p.group.heads is not None:
        st.markdown(f"**Head structure:** {head_structure(p.group)}")
    with st.expander("Why these channels are coupled", expanded=not layered(p)):
        st.markdown("\n".join(f"- {line}" for line in p.group.explanation) or "- (none)")
        st.dataframe(member_table(p.group), key="groups_members", hide_index=True)
    with st.expander(f"All pending proposals ({len(pending)})"):
        costs = measured(pe, pending)
        st.dataframe(pending_rows(pending, {k: cost_label(q, t) for k, q in costs.items()}),
                     key="groups_pending", hide_index=True)


def history(pe: Session) -> None:
    with st.expander(f"Decision history ({len(pe.history)})"):
        st.markdown("\n".join(f"{i + 1}. {h}" for i, h in enumerate(pe.history))
                    or "No decisions yet.")


def main() -> None:
    st.title("Groups")
    if "pe" not in st.session_state:
        st.info("Load a model on the Model page first.")
        st.stop()
    pe: Session = st.session_state.pe
    t = thresholds()
    settings(pe)
    try:
        with st.spinner("scoring the groups (a data-aware criterion: a pass over the "
                        "calibration data after every change)"):
            pending = pe.proposals()  # cached per model state: instant after the first
    except Exception as exc:  # noqa: BLE001 - e.g. a criterion that needs weights on meta
        st.error(f"cannot compute proposals: {exc}")
        st.stop()
    if not pending:
        metrics(pe, None, 0)
        if pe.message is not None:
            show(pe.message)
        st.info("Every prunable group is decided. Undo to revisit, or go to Export.")
        c = st.columns(2)
        c[0].button("Undo", key="groups_undo_done", on_click=pe.undo, disabled=not pe.can_undo)
        c[1].button("Reset", key="groups_reset_done", on_click=reset)
        tradeoff(pe, None, None, t)
        history(pe)
        st.stop()
    p = pick(pe, pending, t)
    st.subheader(f"Group {p.group.id}: {p.group.title}")
    counts = counts_editor(pe, p)
    try:
        with st.spinner("pre-flight: the cut on a weightless copy"):  # cached: shown once
            verdict = pe.preflight(p, edited(p, counts))
    except ValueError as exc:  # a count out of range
        verdict = Verdict(False, error=str(exc))
    # unequal per-layer counts of a group whose layers share tensors: the answer is equal
    # cuts (offered below), not a joint set with other groups (a pre-flight of every group)
    equal = equal_counts(axis_rows(pe.graph.coupling, p, counts)) \
        if layered(p) and not verdict.ok else None
    joint = pe.joint(p) if not verdict.ok and equal is None else None
    metrics(pe, verdict, len(pending))
    if pe.message is not None:
        show(pe.message)
    verdict_box(pe, p, verdict, joint)
    after = cost(pe, p, counts, verdict, t)
    export_aware(pe, p, counts, verdict, pending, equal, t)
    actions(pe, p, counts, verdict, joint)
    tradeoff(pe, verdict, after, t)
    chart(pe, p, counts)
    subgraph(pe, p, verdict)
    details(pe, p, pending, t)
    history(pe)


main()
