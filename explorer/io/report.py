"""A human-readable pruning report: Markdown and a self-contained HTML page.

The report compares the original and the pruned model: per-layer weight shapes and
parameters, attention heads (from the traced groups' head structure), measured CPU latency
(median of several forwards of the example input) and a summary of the plan. It only
reads models, groups and the plan; the HTML embeds plotly.js, so it opens offline.
"""
from __future__ import annotations

import html
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..coupling.heads import AttentionInfo, HeadChange, head_changes
from ..coupling.places import natural_key
from ..graph.metrics import count_params
from ..graph.rng import evaluating
from ..quality.evaluate import Quality
from ..quality.generate import Continuation
from ..quality.task import Metric
from .plan import Plan

__all__ = ["LayerRow", "Report", "build_report", "measure_latency",
           "measure_latencies", "write_report"]


@dataclass(frozen=True)
class LayerRow:
    """One module with parameters of its own."""

    module: str
    shape_before: tuple[int, ...]  # its weight's shape (or its first tensor's)
    shape_after: tuple[int, ...]
    params_before: int
    params_after: int


@dataclass
class Report:
    """Everything the Markdown and HTML renderings show."""

    title: str
    params_before: int
    params_after: int
    layers: list[LayerRow]
    heads: list[HeadChange]
    latency_ms_before: float | None  # median CPU forward time; None when not measurable
    latency_ms_after: float | None
    plan: dict[str, Any] = field(default_factory=dict)  # summary of the plan
    notes: list[str] = field(default_factory=list)
    quality: Quality | None = None  # measured on held-out data; None when none was given
    generations: list[Continuation] = field(default_factory=list)  # greedy text, before/after

    def to_markdown(self) -> str:
        return _markdown(self)

    def to_html(self) -> str:
        return _html(self)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _main_shape(module: nn.Module) -> tuple[int, ...]:
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        return tuple(w.shape)
    first = next(module.parameters(recurse=False), None)
    return tuple(first.shape) if first is not None else ()


def layer_rows(original: nn.Module, pruned: nn.Module) -> list[LayerRow]:
    """Modules with parameters of their own, in the original's order."""
    after = dict(pruned.named_modules())
    rows = []
    for name, module in original.named_modules():
        before = _params(module)
        if not before or name not in after:
            continue
        rows.append(LayerRow(name or "(root)", _main_shape(module), _main_shape(after[name]),
                             before, _params(after[name])))
    return rows


def measure_latency(model: nn.Module, inputs: Sequence[Any], runs: int = 10,
                    warmup: int = 2) -> float | None:
    """Median wall time in ms of ``model(*inputs)`` (``time.perf_counter``), or None on meta."""
    return measure_latencies([model], inputs, runs, warmup)[0]


def measure_latencies(models: Sequence[nn.Module], inputs: Sequence[Any], runs: int = 10,
                      warmup: int = 2) -> list[float | None]:
    """Median ms per model, runs interleaved so that machine load affects all alike."""
    live = [not any(t.device.type == "meta" for t in m.parameters()) for m in models]
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode(), evaluating(*models, inputs):
        for i in range(warmup + runs):
            for k, m in enumerate(models):
                if not live[k]:
                    continue
                start = time.perf_counter()
                m(*inputs)
                if i >= warmup:
                    times[k].append(time.perf_counter() - start)
    return [statistics.median(t) * 1000.0 if t else None for t in times]


def plan_summary(plan: Plan) -> dict[str, Any]:
    """Counts a reader wants from a plan, without the index lists."""
    return {
        "model": plan.model, "schema": plan.schema, "steps": len(plan.steps),
        "tensors_cut": len({c.tensor for s in plan.steps for c in s.tensors}),
        "indices_removed": plan.removed_count,
        "attributes_changed": sum(len(a) for s in plan.steps for a in s.attributes.values()),
        "fingerprint_sha256": plan.fingerprint.sha256,
        "step_titles": [s.title for s in plan.steps if s.title],
    }


def build_report(original: nn.Module, pruned: nn.Module, example_inputs: Sequence[Any],
                 plan: Plan | None = None,
                 attention: tuple[Sequence[AttentionInfo], Sequence[AttentionInfo]] | None = None,
                 runs: int = 10,
                 title: str = "Pruning report", quality: Quality | None = None,
                 generations: Sequence[Continuation] = ()) -> Report:
    """Compare ``original`` and ``pruned`` (neither is changed).

    Args:
        original: the unpruned model.
        pruned: the pruned model.
        example_inputs: positional inputs for both (latency).
        plan: the plan, summarised in the report.
        attention: attention modules (before, after); traced here when not given.
        runs: forwards timed per model.
        quality: `explorer.evaluate` of ``pruned`` against ``original`` on held-out data.
        generations: greedy continuations of prompts by both (`explorer.quality.generate`).
    """
    notes: list[str] = []
    inputs = tuple(example_inputs)
    if attention is None:
        attention = _trace_attention(original, pruned, inputs, notes)
    lat = measure_latencies([original, pruned], inputs, runs)
    if lat[0] is None:
        notes.append("latency not measured: the model is on the meta device")
    return Report(title, count_params(original), count_params(pruned), layer_rows(original, pruned),
                  head_changes(*attention), lat[0], lat[1],
                  plan_summary(plan) if plan is not None else {}, notes, quality,
                  list(generations))


def _trace_attention(original: nn.Module, pruned: nn.Module, inputs: tuple[Any, ...],
                     notes: list[str]) -> tuple[list[AttentionInfo], list[AttentionInfo]]:
    from ..api import trace
    try:
        return trace(original, inputs).attention(), trace(pruned, inputs).attention()
    except Exception as e:  # noqa: BLE001 - the report still has the other sections
        notes.append(f"head table empty: tracing failed ({type(e).__name__}: {e})")
        return [], []


def write_report(report: Report, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "report.md", out / "report.html"
    md.write_text(report.to_markdown(), encoding="utf-8")
    page.write_text(report.to_html(), encoding="utf-8")
    return [md, page]


# -- renderings ---------------------------------------------------------------------------
def _pct(before: float, after: float) -> str:
    return f"{100.0 * (after - before) / before:+.1f} %" if before else "n/a"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f} ms"


def _summary_rows(r: Report) -> list[tuple[str, str, str, str]]:
    speed = (f"{r.latency_ms_before / r.latency_ms_after:.2f}x"
             if r.latency_ms_before and r.latency_ms_after else "n/a")
    return [("parameters", f"{r.params_before:,}", f"{r.params_after:,}",
             _pct(r.params_before, r.params_after)),
            ("CPU latency (median)", _ms(r.latency_ms_before), _ms(r.latency_ms_after),
             f"speed-up {speed}")]


def _quality_table(q: Quality) -> tuple[list[str], list[list[str]]]:
    """Headline metric first, then every measure that applies to the model."""
    rows = [[f"{q.metric.value} (headline)", f"{q.before:.4f}", f"{q.after:.4f}"]]
    if q.metric is not Metric.COSINE:
        rows.append(["output cosine similarity", "1.0000", f"{q.cosine:.4f}"])
    if q.kl is not None:
        rows.append(["KL(original || pruned)", "0.0000", f"{q.kl:.4f}"])
    if q.top1 is not None:
        rows.append(["top-1 agreement", "1.0000", f"{q.top1:.4f}"])
    if q.perplexity_before is not None and q.perplexity_after is not None:
        rows.append(["perplexity", f"{q.perplexity_before:.3f}", f"{q.perplexity_after:.3f}"])
    return ["measure", "before", "after"], rows


def _quality_text(r: Report) -> str:
    if r.quality is None:
        return "not measured: give held-out data (`--eval FILE`, or `quality=` to build_report)"
    return (f"{r.quality.task.value} model, {r.quality.samples} held-out samples, never used "
            "for calibration")


def _generation_table(r: Report) -> tuple[list[str], list[list[str]]]:
    """Each prompt with the original's and the pruned model's greedy continuation."""
    rows = [[c.prompt, c.before, c.after] for c in r.generations]
    return ["prompt", "original continues", "pruned continues"], rows


def _generation_text(r: Report) -> str:
    n = r.generations[0].new_tokens if r.generations else 0
    return f"Greedy continuations (no sampling, at most {n} new tokens each):"


def _md_text(text: str) -> str:
    """A continuation on one Markdown table line (line breaks shown as ``⏎``)."""
    return " ".join(text.replace("\n", " ⏎ ").split()) if text.strip() else "(nothing)"


def _layer_table(r: Report) -> tuple[list[str], list[list[str]]]:
    head = ["module", "shape before", "shape after", "params before", "params after"]
    rows = [[x.module, "x".join(map(str, x.shape_before)), "x".join(map(str, x.shape_after)),
             f"{x.params_before:,}", f"{x.params_after:,}"] for x in r.layers]
    return head, rows


def _head_table(r: Report) -> tuple[list[str], list[list[str]]]:
    head = ["module", "group", "heads", "head dim", "kv heads", "heads after",
            "head dim after", "kv heads after"]
    rows = [[h.module, str(h.group), str(h.heads_before), str(h.head_dim_before),
             str(h.kv_heads_before or h.heads_before), _opt(h.heads_after),
             _opt(h.head_dim_after), _opt(h.kv_heads_after or h.heads_after)]
            for h in sorted(r.heads, key=lambda h: natural_key(h.module))]
    return head, rows


def _opt(x: int | None) -> str:
    return "?" if x is None else str(x)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(r: Report) -> str:
    parts = [f"# {r.title}", "",
             _md_table(["", "before", "after", "change"], [list(x) for x in _summary_rows(r)]),
             "", "## Quality", "", _quality_text(r), ""]
    if r.quality is not None:
        parts += [_md_table(*_quality_table(r.quality))]
    if r.generations:
        head, rows = _generation_table(r)
        parts += ["", _generation_text(r), "",
                  _md_table(head, [[_md_text(c) for c in row] for row in rows])]
    parts += ["", "## Plan", ""]
    if r.plan:
        parts += [f"- {k.replace('_', ' ')}: {v}" for k, v in r.plan.items() if k != "step_titles"]
        parts += [f"- step {i}: {t}" for i, t in enumerate(r.plan.get("step_titles", []))]
    else:
        parts.append("no plan recorded")
    parts += ["", "## Attention heads", ""]
    parts.append(_md_table(*_head_table(r)) if r.heads else "no attention groups")
    parts += ["", "## Layers", "", _md_table(*_layer_table(r))]
    if r.notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in r.notes]
    return "\n".join(parts) + "\n"


def _html_table(head: list[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _figures(r: Report) -> str:
    """Per-layer widths and params as plotly figures, plotly.js inlined once."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        return "<p>(plotly is not installed: no figures)</p>"
    names = [x.module for x in r.layers]
    widths = go.Figure([
        go.Bar(name="before", x=names, y=[x.shape_before[0] if x.shape_before else 0
                                          for x in r.layers], marker_color="#BAB0AC"),
        go.Bar(name="after", x=names, y=[x.shape_after[0] if x.shape_after else 0
                                         for x in r.layers], marker_color="#4C78A8")])
    widths.update_layout(title="per-layer output width (dim 0 of the weight)", barmode="group",
                         height=380, xaxis_tickangle=-45)
    params = go.Figure([
        go.Bar(name="before", x=names, y=[x.params_before for x in r.layers],
               marker_color="#BAB0AC"),
        go.Bar(name="after", x=names, y=[x.params_after for x in r.layers],
               marker_color="#72B7B2")])
    params.update_layout(title="parameters per layer", barmode="group", height=380,
                         xaxis_tickangle=-45)
    html: str = (widths.to_html(full_html=False, include_plotlyjs=True)
                 + params.to_html(full_html=False, include_plotlyjs=False))
    return html


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "td:first-child,td:nth-child(2){text-align:left}")


def _html(r: Report) -> str:
    plan = (_html_table(["field", "value"], [[k.replace("_", " "), str(v)]
                                              for k, v in r.plan.items()])
            if r.plan else "<p>no plan recorded</p>")
    heads = _html_table(*_head_table(r)) if r.heads else "<p>no attention groups</p>"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in r.notes)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(r.title)}"
            f"</title><style>{_CSS}</style></head><body><h1>{html.escape(r.title)}</h1>"
            + _html_table(["", "before", "after", "change"], _summary_rows(r))
            + f"<h2>Quality</h2><p>{html.escape(_quality_text(r))}</p>"
            + (_html_table(*_quality_table(r.quality)) if r.quality is not None else "")
            + (f"<p>{html.escape(_generation_text(r))}</p>"
               + _html_table(*_generation_table(r)) if r.generations else "")
            + f"<h2>Plan</h2>{plan}<h2>Attention heads</h2>{heads}<h2>Layers</h2>"
            + _figures(r) + _html_table(*_layer_table(r))
            + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "") + "</body></html>\n")

