"""Plotly figures and tables for the app: importance, widths, costs and head checks.

Every function takes plain data (arrays, dicts, groups) and returns a new figure or rows.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from ..coupling.groups import Group
from ..coupling.heads import AttentionInfo
from ..coupling.places import natural_key
from ..prune.uniform import kind_of
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


@dataclass(frozen=True)
class LayerGrid:
    """Widths of a model with numbered layers as layers x kinds, and the modules outside."""

    layers: list[str]  # ``model.layers.0`` ... in numeric order
    kinds: list[str]  # ``self_attn.q_proj``, ``mlp.gate_proj`` ... in model order
    cells: dict[tuple[str, str], tuple[int, int]]  # (layer, kind) -> (before, after)
    outside: dict[str, tuple[int, int]]  # module -> (before, after): embeddings, lm_head

    def outside_rows(self) -> list[dict[str, object]]:
        """Rows for the modules outside the layers (their widths dwarf the layers')."""
        return [{"module": m, "width before": b, "width after": a}
                for m, (b, a) in self.outside.items()]


def layer_grid(before: Mapping[str, int], after: Mapping[str, int]) -> LayerGrid:
    """Per-module widths sorted into numbered layers x module kinds."""
    cells: dict[tuple[str, str], tuple[int, int]] = {}
    outside: dict[str, tuple[int, int]] = {}
    kinds: dict[str, None] = {}
    for name, b in before.items():
        kind, layer = kind_of(name + ".")
        short = kind.split(".*.", 1)[1].rstrip(".") if layer and ".*." in kind else ""
        if short:
            kinds.setdefault(short)
            cells[layer, short] = (b, after.get(name, 0))
        else:  # outside numbered layers, or a layer module itself
            outside[name] = (b, after.get(name, 0))
    layers = sorted({lay for lay, _k in cells}, key=natural_key)
    return LayerGrid(layers, list(kinds), cells, outside)


def widths_figure(before: Mapping[str, int], after: Mapping[str, int]) -> go.Figure:
    """Output width of each module before and after pruning: a layers x kinds heatmap of the
    fraction kept when the model has numbered layers (readable at 30+ layers; embeddings and
    heads apart, see `layer_grid`), else grouped bars."""
    grid = layer_grid(before, after)
    if len(grid.layers) >= 2:
        return _grid_figure(grid)
    names = list(before)
    fig = go.Figure([
        go.Bar(name="before", x=names, y=[before[n] for n in names], marker_color="#BAB0AC"),
        go.Bar(name="after", x=names, y=[after.get(n, 0) for n in names], marker_color=_KEPT),
    ])
    fig.update_layout(title="per-layer output width", barmode="group", height=380,
                      xaxis_tickangle=-45, margin={"l": 40, "r": 10, "t": 40, "b": 120})
    return fig


def _grid_figure(grid: LayerGrid) -> go.Figure:
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    for layer in grid.layers:
        row_z: list[float | None] = []
        row_t: list[str] = []
        for kind in grid.kinds:
            b, a = grid.cells.get((layer, kind), (0, 0))
            row_z.append(a / b if b else None)
            row_t.append(f"{a}" if a == b else f"{b}→{a}" if b else "")
        z.append(row_z)
        text.append(row_t)
    prefixes = {lay.rsplit(".", 1)[0] for lay in grid.layers}
    labels = [lay.rsplit(".", 1)[-1] if len(prefixes) == 1 else lay for lay in grid.layers]
    fig = go.Figure(go.Heatmap(
        z=z, x=grid.kinds, y=labels, text=text, texttemplate="%{text}", zmin=0, zmax=1,
        colorscale=[[0, "#E45756"], [0.5, "#F2CF5B"], [1, "#BAB0AC"]],
        colorbar={"title": "kept"},
        hovertemplate="layer %{y} · %{x}<br>width %{text}<br>kept %{z:.0%}<extra></extra>"))
    prefix = next(iter(prefixes)) if len(prefixes) == 1 else "layer"
    fig.update_layout(title="output width per layer and kind (grey: unchanged; text: before→after)",
                      xaxis={"side": "top"},
                      yaxis={"title": prefix, "autorange": "reversed", "type": "category"},
                      height=max(300, 22 * len(grid.layers) + 120),
                      margin={"l": 60, "r": 10, "t": 90, "b": 20})
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
        # the verdict first; projections by their names inside the module (the full paths
        # pushed the verdict off screen at 30+ layers)
        rows.append({
            "module": a.module, "heads": a.num_heads, "head_dim": a.head_dim, "kv_heads": kv,
            "ok": not problems,
            "violations": "; ".join(problems),
            "whole-head ratios": ", ".join(r for r in a.legal_head_ratios if r != "0"),
            "projections": " ".join(dict.fromkeys(_inside(a.module, x)
                                                  for x in (a.q, a.k, a.v, a.out) if x)),
            "widths": ", ".join(f"{m.rpartition('.')[2]} {w}" for m, w in a.widths.items()),
            "group": a.group,
        })
    return rows


def _inside(module: str, name: str) -> str:
    """``qkv`` for ``blocks.0.attn.qkv`` inside ``blocks.0.attn``."""
    return name[len(module) + 1:] if name.startswith(module + ".") else name


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
