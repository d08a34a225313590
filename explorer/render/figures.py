"""Plotly figures and tables for the app: importance, widths, costs and head checks.

Every function takes plain data (arrays, dicts, groups) and returns a new figure or rows.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ..coupling.groups import Group
from ..coupling.heads import AttentionInfo
from ..quality.evaluate import Quality
from ..quality.task import Metric

_KEPT, _REMOVED = "#4C78A8", "#E45756"


def importance_figure(scores: np.ndarray, removed: Sequence[int], title: str = "") -> go.Figure:
    """Scores of one axis sorted ascending, removed indices in red, the cut as a line."""
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(scores, kind="stable")
    dead = {int(i) for i in removed}
    rank = np.arange(len(order))
    is_dead = np.array([int(i) in dead for i in order], dtype=bool)
    fig = go.Figure()
    for name, mask, colour in (("kept", ~is_dead, _KEPT), ("removed", is_dead, _REMOVED)):
        fig.add_trace(go.Bar(name=name, x=rank[mask].tolist(), y=scores[order][mask].tolist(),
                             marker_color=colour,
                             customdata=order[mask].tolist(),
                             hovertemplate="index %{customdata}<br>score %{y:.4g}"))
    if dead:
        fig.add_vline(x=len(dead) - 0.5, line_dash="dash", line_color="black",
                      annotation_text=f"cut: {len(dead)} of {len(scores)}")
    fig.update_layout(title=title or "importance (sorted, lower = less important)",
                      xaxis_title="rank", yaxis_title="score", barmode="overlay",
                      bargap=0.05, height=320, margin={"l": 40, "r": 10, "t": 40, "b": 40})
    return fig


def widths_figure(before: Mapping[str, int], after: Mapping[str, int]) -> go.Figure:
    """Output width of each layer before and after pruning, as grouped bars."""
    names = list(before)
    fig = go.Figure([
        go.Bar(name="before", x=names, y=[before[n] for n in names], marker_color="#BAB0AC"),
        go.Bar(name="after", x=names, y=[after.get(n, 0) for n in names], marker_color=_KEPT),
    ])
    fig.update_layout(title="per-layer output width", barmode="group", height=380,
                      xaxis_tickangle=-45, margin={"l": 40, "r": 10, "t": 40, "b": 120})
    return fig


def cost_figure(params: Mapping[str, int], macs: Mapping[str, int]) -> go.Figure:
    """Parameters and MACs per module (two bar traces on two y axes)."""
    names = list(dict.fromkeys([*params, *macs]))
    fig = go.Figure([
        go.Bar(name="params", x=names, y=[params.get(n, 0) for n in names],
               offsetgroup="p", marker_color="#72B7B2"),
        go.Bar(name="MACs", x=names, y=[macs.get(n, 0) for n in names],
               offsetgroup="m", yaxis="y2", marker_color="#F58518"),
    ])
    fig.update_layout(title="parameters and MACs per module", height=380, xaxis_tickangle=-45,
                      yaxis={"title": "params"},
                      yaxis2={"title": "MACs", "overlaying": "y", "side": "right"},
                      margin={"l": 40, "r": 40, "t": 40, "b": 120})
    return fig


def params_by_module(model_params: Mapping[str, int], owner: Mapping[str, str]) -> dict[str, int]:
    """Sum parameter element counts per owning module (``owner``: param name -> module)."""
    out: dict[str, int] = {}
    for name, count in model_params.items():
        mod = owner.get(name, name.rpartition(".")[0])
        out[mod] = out.get(mod, 0) + count
    return out


def attention_rows(infos: Sequence[AttentionInfo]) -> list[dict[str, object]]:
    """One row per attention module from `ModelGraph.attention()`, violations flagged.

    A violation is a projection width not divisible by its head count, or query heads not
    divisible by key/value heads (GQA).
    """
    rows: list[dict[str, object]] = []
    for a in infos:
        kv = a.kv_heads or a.num_heads
        bad = [m for m, ok in a.divisible.items() if not ok]
        problems = [f"{m} width {a.widths.get(m)} not divisible by heads" for m in bad]
        if a.num_heads % max(kv, 1):
            problems.append(f"{a.num_heads} heads not divisible by {kv} kv heads")
        rows.append({
            "module": a.module, "group": a.group, "heads": a.num_heads, "head_dim": a.head_dim,
            "kv_heads": kv,
            "q / k / v / out": " / ".join(dict.fromkeys(x for x in (a.q, a.k, a.v, a.out) if x)),
            "widths": ", ".join(f"{m.rpartition('.')[2]} {w}" for m, w in a.widths.items()),
            "ok": not problems,
            "violations": "; ".join(problems),
            "whole-head ratios": ", ".join(r for r in a.legal_head_ratios if r != "0"),
        })
    return rows


def axes_rows(group: Group) -> list[dict[str, object]]:
    """The axes of one group (role, size, prunable, why not)."""
    return [{"axis": i, "role": a.role, "size": a.size, "prunable": a.prunable,
             "reason": a.reason} for i, a in enumerate(group.axes)]


def member_rows(group: Group) -> list[dict[str, object]]:
    """The member parameters of one group."""
    return [{"module": m.module, "parameter": m.param, "dim": m.dim, "size": m.size}
            for m in group.members]


def search_modules(modules: Mapping[str, str], text: str, limit: int = 200) -> list[str]:
    """Module names (or class names) containing ``text``, case-insensitive, in model order."""
    needle = text.strip().lower()
    if not needle:
        return []
    return [n for n, cls in modules.items()
            if n and (needle in n.lower() or needle in cls.lower())][:limit]


def _number(value: object) -> float:
    if not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def sensitivity_figure(rows: Sequence[Mapping[str, object]]) -> go.Figure:
    """Output change vs ratio, one line per group axis (`explorer.sensitivity.as_table`)."""
    fig = go.Figure()
    by_title: dict[str, list[Mapping[str, object]]] = {}
    for r in rows:
        by_title.setdefault(str(r["title"]), []).append(r)
    for title, pts in by_title.items():
        pts = sorted(pts, key=lambda r: _number(r["ratio"]))
        fig.add_trace(go.Scatter(
            name=title, x=[r["ratio"] for r in pts], mode="lines+markers",
            y=[min(_number(r["output_change"]), 1e6) for r in pts],
            customdata=[r["params_removed"] for r in pts],
            hovertemplate="ratio %{x}<br>change %{y:.4g}<br>params removed %{customdata:,}"))
    fig.update_layout(title="sensitivity: relative output change when one group is pruned",
                      xaxis_title="ratio", yaxis_title="relative L2 change", height=380,
                      margin={"l": 40, "r": 10, "t": 40, "b": 40})
    return fig


def compact(n: int) -> str:
    """``n`` exactly while it fits a metric column (below ten million: 9,870,123), else in
    three significant digits and a unit (6.74 B, 106 B, 52.9 M), signed when negative."""
    if abs(n) < 10**7:
        return f"{n:,}"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6)):
        if n >= scale:
            value = n / scale
            return f"{sign}{value:.3g} {unit}" if value < 100 else f"{sign}{value:.0f} {unit}"
    return f"{sign}{n:,}"


def quality_text(quality: Quality) -> tuple[str, str]:
    """A metric label and value for the pages, e.g. ``("cosine to original", "0.9734")``."""
    if quality.metric is Metric.PERPLEXITY:
        return "perplexity", f"{quality.after:.3f}"
    label = {Metric.COSINE: "cosine to original", Metric.TOP1: "top-1 agreement"}[quality.metric]
    return label, f"{quality.after:.4f}"
