"""The Groups page as plain data: the words, rows and charts of one proposal.

The page (`pages/3_groups.py`) only draws what this module builds: labels of the count
inputs, the pre-flight verdict, the cost of accepting, the metric cards, the pending table,
the layer table and the score charts. Streamlit-free, so the wording is tested without a
browser.

A group whose axes repeat per layer (an attention group tied across layers by a shared
rotary width has a heads axis and a dims axis per layer) is shown as one row per axis,
labelled by the layer it lives in, with the count to remove editable in place, and one
heatmap of the scores (layer x index), not one widget and one chart per axis.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..coupling.analyze import Coupling
from ..coupling.groups import Group, GroupKey
from ..coupling.places import SHARED, axis_layers, natural_key
from ..coupling.targets import target_of
from ..coupling.vocab import AxisRole, Target
from ..graph.metrics import count_macs
from ..prune.importance import lowest

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from ..prune.joint import Solution
    from ..prune.preflight import Verdict
    from ..prune.proposal import Proposal
    from ..prune.statement import Statement
    from ..quality.evaluate import Quality

_LOCATION = re.compile(r"\S*/\S+:\d+")  # /path/to/file.py:58
MANY_AXES = 4  # more axes than this: the proposal is shown as a layer table
MAX_CHANGES_SHOWN = 3  # changes listed per proposal in the pending table
_TARGET_WORDS = {Target.MLP: "MLP hidden units",
                 Target.RESIDUAL: "hidden-size channels (residual stream)"}


def gqa(group: Group) -> bool:
    """Whether ``group``'s heads are grouped query attention (its heads axis holds key/value
    groups, each with its query heads)."""
    h = group.heads
    return h is not None and h.kv_heads is not None and h.kv_heads != h.num_heads


def part_label(group: Group, axis: int) -> str:
    """A reader's word for axis ``axis`` of ``group``: ``MLP hidden units`` for a feed-forward
    group's channels, ``key/value groups`` for GQA heads, ``dims per head``, ..."""
    ax = group.axes[axis]
    if ax.role is AxisRole.CHANNELS and target_of(group) in _TARGET_WORDS:
        return _TARGET_WORDS[target_of(group)]
    return ax.role.words(ax.size, gqa(group))


def layer_words(layer: str) -> str:
    """A layer as people count it: ``layer 3`` for ``model.layers.3.mlp``, ``block 0`` for
    ``blocks.0``; ``every layer`` for an axis shared by layers; else the module path."""
    if layer == SHARED:
        return "every layer"
    parts = layer.split(".")
    k = next((k for k, p in enumerate(parts) if p.isdigit()), None)
    if k is None or k == 0:
        return layer
    word = parts[k - 1]
    return f"{word[:-1]} {parts[k]}" if len(word) > 2 and word.endswith("s") else \
        ".".join(parts[:k + 1])


@dataclass(frozen=True)
class AxisRow:
    """One pruned axis of a proposal, as a row of the layer table."""

    axis: int
    layer: str  # the module prefix its members share ("all layers" when they span many)
    part: str  # e.g. "heads", "dims per head"
    width: int
    remove: int

    @property
    def keep(self) -> int:
        return self.width - self.remove


def axis_rows(coupling: Coupling, proposal: Proposal,
              counts: Mapping[int, int] | None = None) -> list[AxisRow]:
    """One row per pruned axis, in layer order; ``counts`` overrides the proposed ones."""
    layers = axis_layers(coupling, proposal.group)
    proposed = proposal.counts()
    rows = [AxisRow(a, layers[a], part_label(proposal.group, a), c.width_before,
                    int((counts or {}).get(a, proposed[a])))
            for a, c in zip(proposal.axes, proposal.changes, strict=True)]
    return sorted(rows, key=lambda r: (natural_key(r.layer), r.part))


def layered(proposal: Proposal) -> bool:
    """Whether the proposal needs the layer table (many axes) rather than a few inputs."""
    return len(proposal.axes) > MANY_AXES


def removed_for(proposal: Proposal, counts: Mapping[int, int]) -> dict[int, list[int]]:
    """Axis -> the indices ``counts`` removes (lowest scores first)."""
    return {a: lowest(proposal.scores[a], int(counts.get(a, 0))) for a in proposal.axes}


def statement_lines(said: Statement) -> list[str]:
    """The statement of what the settings cut, as Markdown list items (one per target, then
    one per group the pre-flight refuses)."""
    return [*(f"- **{loss.target}**: {loss.details()}" for loss in said.losses),
            *(f"- **refused by the pre-flight**: {r}" for r in said.refused)]


def pending_rows(pending: Sequence[Proposal], costs: Mapping[GroupKey, str] | None = None
                 ) -> list[dict[str, str]]:
    """One row per pending proposal: its group, the widths it would change and (``costs``:
    group key -> a cell, see `explorer.app.cost.cost_label`) what accepting it costs."""
    return [{"group": q.group.title, **({"cost": costs.get(q.key, "")} if costs else {}),
             "change": "; ".join(f"{part_label(q.group, a)} {ch.width_before}→"
                                 f"{ch.width_after}"
                                 for a, ch in zip(q.axes[:MAX_CHANGES_SHOWN],
                                                  q.changes[:MAX_CHANGES_SHOWN], strict=True))
             + (f" (+{len(q.changes) - MAX_CHANGES_SHOWN} layers)"
                if len(q.changes) > MAX_CHANGES_SHOWN else "")}
            for q in pending]


def short_reason(joint: Proposal) -> str:
    """The joint proposal's reason with every location shortened to ``file:line``."""
    text = joint.reason
    for word in text.split("`"):
        if _LOCATION.fullmatch(word):  # not the quoted code line, whatever it holds
            text = text.replace(word, short_location(word))
    return text


def head_structure(group: Group) -> str:
    """``6 heads × 16 dims, 2 key/value heads`` ("" for a group without heads)."""
    h = group.heads
    if h is None:
        return ""
    return f"{h.num_heads} heads × {h.head_dim} dims" + (f", {h.kv_heads} key/value heads"
                                                        if h.kv_heads else "")


def edited(proposal: Proposal, counts: Mapping[int, int]) -> Mapping[int, int] | None:
    """The counts on screen when they differ from the proposal's, else None (as proposed)."""
    return counts if dict(counts) != proposal.counts() else None


def layer_table(rows: Sequence[AxisRow]) -> list[dict[str, Any]]:
    """The editable layer table of a proposal spanning layers (one row per axis)."""
    return [{"layer": r.layer, "part": r.part, "width": r.width, "remove": r.remove}
            for r in rows]


def table_counts(rows: Sequence[AxisRow], table: Sequence[Mapping[str, Any]]
                 ) -> dict[int, int]:
    """Axis index -> the count in the (edited) ``table`` made by `layer_table` from ``rows``."""
    return {r.axis: int(e["remove"]) for r, e in zip(rows, table, strict=True)}


def verdict_text(verdict: Verdict) -> str:
    """The pre-flight verdict in one line: the output shapes, or where the forward breaks."""
    if verdict.ok:
        return f"Pre-flight: the pruned copy runs, output shapes {verdict.output_shapes}"
    where = short_location(verdict.location) if verdict.location else "the model"
    return (f"Pre-flight: accepting this alone breaks the forward at {where} "
            f"({verdict.module or 'the model'}): {verdict.error}")


def after_accept(verdict: Verdict | None, macs_now: int) -> tuple[int, int] | None:
    """(parameters after Accept, change in MACs) from a passing pre-flight, else None."""
    if verdict is None or not verdict.ok or verdict.graph is None:
        return None
    return verdict.params, count_macs(verdict.graph) - macs_now


def count_label(coupling: Coupling, proposal: Proposal, n: int) -> str:
    """The label of the count input of the proposal's ``n``-th axis, in a reader's words,
    e.g. ``Remove MLP hidden units of layer 3 (of 1536)``."""
    axis, change = proposal.axes[n], proposal.changes[n]
    where = layer_words(axis_layers(coupling, proposal.group)[axis])
    return f"Remove {part_label(proposal.group, axis)} of {where} (of {change.width_before})"


def layer_caption(rows: Sequence[AxisRow]) -> str:
    """The caption above the editable layer table."""
    return (f"{len(rows)} layer rows: edit **remove** per layer (0 keeps that layer as it "
            f"is); Accept uses the counts in this table.")


def joint_text(joint: Proposal) -> str:
    """The joint (or outer-axis) proposal offered beside an unsafe one, in one line."""
    kind = "Joint proposal" if joint.joint else "Outer-axis proposal"
    return f"{kind}: {short_reason(joint)}"


def chart_words(proposal: Proposal, n: int, criterion: str) -> tuple[str, str]:
    """(title, unit) of the importance chart of the proposal's ``n``-th axis."""
    axis = proposal.axes[n]
    return (f"{criterion} importance of the {part_label(proposal.group, axis)}",
            "head" if proposal.group.axes[axis].role is AxisRole.HEADS else "channel")


@dataclass(frozen=True)
class Card:
    """One metric card of the Groups page (label, value, delta and hover text)."""

    label: str
    value: str | int
    delta: str | None = None
    help: str | None = None
    inverse: bool = False  # a fall is good (sizes)


def signed(n: int, unit: str) -> str | None:
    """A metric card's delta: ``-18.6 M params``; None when nothing changed (a bare ``0``
    under a count reads as a fault). Short: a longer chip is cut off in its column."""
    from .figures import compact
    if n == 0:
        return None
    return f"{'+' if n > 0 else ''}{compact(n)} {unit}"


def _share(n: int, start: int) -> str:
    return f" ({n / start:+.1%})" if start and n else ""


def metric_cards(params: tuple[int, int], macs: tuple[int, int], pending: int,
                 verdict: Verdict | None, quality: Quality | None, source: str
                 ) -> list[Card | None]:
    """The five metric cards: parameters and MACs (now, and the change since the start), pending
    groups, the parameters Accept leaves (None without a passing pre-flight; the change in
    MACs in its hover text) and the quality (None when not measured)."""
    from .figures import compact, quality_text

    (p_now, p_start), (m_now, m_start) = params, macs
    after = after_accept(verdict, m_now)
    return [
        Card("parameters", compact(p_now), signed(p_now - p_start, "params"),
             f"{p_now:,} (start {p_start:,}{_share(p_now - p_start, p_start)})", True),
        Card("MACs", compact(m_now), signed(m_now - m_start, "MACs"),
             f"{m_now:,} (start {m_start:,}{_share(m_now - m_start, m_start)})", True),
        Card("pending groups", pending),
        None if after is None else Card(
            "params after Accept", compact(after[0]), signed(after[0] - p_now, "params"),
            f"{after[0]:,} parameters{_share(after[0] - p_now, p_now)}; MACs "
            f"{signed(after[1], 'MACs') or 'unchanged'}", True),
        None if quality is None else Card(*quality_text(quality),
                                          help=f"against the original, on {source}"),
    ]


def quality_note(quality: Quality, source: str, spec: str, heldout: str = ""
                 ) -> tuple[str, str]:
    """One line under a quality figure (and its hover text): what it was measured on and how
    to get the figure on the whole held-out file (the app measures a few samples, so its
    perplexity differs from the CLI's)."""
    from .figures import quality_text
    label = quality_text(quality)[0].capitalize()
    if source.startswith("random"):
        return (f"{label} on {source}: give held-out data on the Model page for a figure on "
                f"real samples.", "under Local checkpoint and data")
    return (f"{label} on {source}: quick, to compare decisions; on the whole held-out file it "
            f"reads differently. For that figure export `hf`, then run `explorer evaluate`.",
            f"`python -m explorer evaluate --model hf:EXPORT --reference {spec} --eval "
            f"{heldout or 'HELDOUT'}`")


def member_table(group: Group) -> list[dict[str, Any]]:
    """The group's members, one row each (`explorer.render.figures.member_rows`)."""
    from .figures import member_rows
    return [dict(r) for r in member_rows(group)]


def axis_figure(scores: np.ndarray, removed: Sequence[int], title: str, unit: str) -> go.Figure:
    """Scores by index (head or channel); removed ones in red, the cut as a dashed line at
    the highest removed score, so it moves with the count."""
    import plotly.graph_objects as go

    s = np.asarray(scores, dtype=float)
    dead = np.zeros(len(s), dtype=bool)
    dead[list(removed)] = True
    idx = np.arange(len(s))
    fig = go.Figure()
    for name, mask, colour in (("kept", ~dead, "#1F77B4"), ("removed", dead, "#D62728")):
        fig.add_bar(name=name, x=idx[mask].tolist(), y=s[mask].tolist(), marker_color=colour,
                    hovertemplate=f"{unit} %{{x}}<br>score %{{y:.4g}}")
    if dead.any():
        fig.add_hline(y=float(s[dead].max()), line_dash="dash", line_color="black",
                      annotation_text=f"cut: {int(dead.sum())} of {len(s)}")
    fig.update_layout(title=title, xaxis_title=f"{unit} index", yaxis_title="score",
                      barmode="overlay", bargap=0.05, height=320,
                      margin={"l": 40, "r": 10, "t": 40, "b": 40})
    return fig


def heatmap_figure(rows: Sequence[AxisRow], proposal: Proposal,
                   counts: Mapping[int, int], criterion: str) -> go.Figure:
    """Scores as a layer x index heatmap; removed cells are outlined by an X marker."""
    import plotly.graph_objects as go

    width = max(r.width for r in rows)
    z = np.full((len(rows), width), np.nan)
    xs, ys = [], []
    removed = removed_for(proposal, counts)
    labels = [f"{r.layer} · {r.part}" for r in rows]
    for k, r in enumerate(rows):
        s = np.asarray(proposal.scores[r.axis], dtype=float)
        z[k, :len(s)] = s
        for i in removed[r.axis]:
            xs.append(i)
            ys.append(labels[k])
    fig = go.Figure(go.Heatmap(z=z.tolist(), y=labels, colorscale="Viridis",
                               colorbar={"title": "score"},
                               hovertemplate="%{y}<br>index %{x}<br>score %{z:.4g}"))
    if xs:
        fig.add_scatter(x=xs, y=ys, mode="markers", name="removed",
                        marker={"symbol": "x", "color": "#D62728", "size": 6})
    fig.update_layout(title=f"{criterion} importance per layer (x = removed)",
                      xaxis_title="index (head or channel)", height=max(260, 18 * len(rows)),
                      margin={"l": 10, "r": 10, "t": 40, "b": 40})
    return fig


def short_location(location: str) -> str:
    """``dino.py:58`` from a full ``/path/to/dino.py:58``."""
    path, _, line = location.rpartition(":")
    return f"{os.path.basename(path)}:{line}" if path else location


def verdict_labels(solution: Solution[GroupKey], titles: Mapping[GroupKey, str]
                   ) -> dict[GroupKey, str]:
    """Group key -> a one-line pre-flight verdict: safe alone, or unsafe alone and what to
    cut with it (the Model page, the heads table and ``trace`` show these up front)."""
    out = dict.fromkeys(solution.safe, "safe alone")
    for js in solution.joint:
        where = short_location(js.location)
        for k in js.parts:
            others = [titles.get(o, str(o)) for o in js.parts if o != k]
            out[k] = (f"unsafe alone ({where}); safe jointly with "
                      + (", ".join(others) if len(others) <= 2 else
                         f"{others[0]} and {len(others) - 1} more groups"))
    for k, v in solution.unsafe.items():
        where = short_location(v.location) if v.location else (v.module or "the model")
        out[k] = f"unsafe ({where})"
    return out


def equal_counts(rows: Sequence[AxisRow]) -> dict[int, int] | None:
    """Axis -> count with every layer of a part cut alike (the largest count asked of that
    part and width: a rotary half shared by every layer is a part of its own width), or None
    when the rows already cut each part alike."""
    most: dict[tuple[str, int], int] = {}
    for r in rows:
        most[r.part, r.width] = max(most.get((r.part, r.width), 0), r.remove)
    if all(r.remove == most[r.part, r.width] for r in rows):
        return None
    return {r.axis: most[r.part, r.width] for r in rows}
