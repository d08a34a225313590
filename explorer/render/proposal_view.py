"""View models of one proposal for the Groups page: a layer x part table and one chart.

A group whose axes repeat per layer (an attention group tied across layers by a shared
rotary width has a heads axis and a dims axis per layer) is shown as one row per axis,
labelled by the layer it lives in, with the count to remove editable in place, and one
heatmap of the scores (layer x index), not one widget and one chart per axis.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..coupling.analyze import Coupling
from ..coupling.groups import GroupKey
from ..coupling.places import axis_layers, natural_key

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from ..prune.joint import Solution
    from ..prune.proposal import Proposal

MANY_AXES = 4  # more axes than this: the proposal is shown as a layer table
_ROLE_WORDS = {"channels": "channels", "heads": "heads", "kv-heads": "key/value heads",
               "head-repeat": "query heads per key/value head", "head-dim": "dims per head",
               "groups": "groups"}


def part_label(role: str, size: int) -> str:
    """A reader's word for an axis role (``q/k/v`` for the fixed axis of width 3)."""
    if role == "fixed":
        return "q/k/v" if size == 3 else "fixed"
    return _ROLE_WORDS.get(role, role)


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
    rows = [AxisRow(a, layers[a], part_label(proposal.group.axes[a].role, c.width_before),
                    c.width_before, int((counts or {}).get(a, proposed[a])))
            for a, c in zip(proposal.axes, proposal.changes, strict=True)]
    return sorted(rows, key=lambda r: (natural_key(r.layer), r.part))


def layered(proposal: Proposal) -> bool:
    """Whether the proposal needs the layer table (many axes) rather than a few inputs."""
    return len(proposal.axes) > MANY_AXES


def removed_for(proposal: Proposal, counts: Mapping[int, int]) -> dict[int, list[int]]:
    """Axis -> the indices ``counts`` removes (lowest scores first)."""
    from ..prune.proposal import lowest
    return {a: lowest(proposal.scores[a], int(counts.get(a, 0))) for a in proposal.axes}


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
    part), or None when the rows already cut each part alike."""
    most: dict[str, int] = {}
    for r in rows:
        most[r.part] = max(most.get(r.part, 0), r.remove)
    if all(r.remove == most[r.part] for r in rows):
        return None
    return {r.axis: most[r.part] for r in rows}
