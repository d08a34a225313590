"""What the Model and Groups pages show, as plain data: headings, captions, table rows.

Streamlit-free, so the wording is tested without a browser and the pages stay drawing only.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..coupling.groups import Group, GroupKey
from ..coupling.targets import target_of
from ..graph.metrics import count_macs
from ..prune.preflight import Verdict
from ..prune.proposal import Proposal
from ..prune.statement import Statement
from ..quality.generate import Continuation
from ..render.proposal_view import AxisRow, part_label, short_location

MAX_AXES_SHOWN = 6  # axes listed per group in the Model page's table
MAX_CHANGES_SHOWN = 3  # changes listed per proposal in the pending table
NAME_CHARS = 48  # a spec name longer than this is shortened in the heading
_LOCATION = re.compile(r"\S*/\S+:\d+")  # /path/to/file.py:58


@dataclass(frozen=True)
class Heading:
    """The loaded model's name for a heading, and the rest of its spec for a caption."""

    name: str  # e.g. "hf:llama"
    options: str  # e.g. "hidden_size=4096 · num_hidden_layers=32" ("" when none)


def heading(spec: str) -> Heading:
    """A short heading for ``spec``: the kind and name (a path by its last part), options apart.

    ``hf:llama?hidden_size=4096&num_hidden_layers=32`` -> ``hf:llama`` and
    ``hidden_size=4096 · num_hidden_layers=32``.
    """
    name, _, query = spec.strip().partition("?")
    kind, sep, rest = name.partition(":")
    if sep and "/" in rest.rstrip("/"):  # a local folder or file: its last part names it
        rest = "…/" + rest.rstrip("/").rsplit("/", 1)[-1]
    short = f"{kind}{sep}{rest}" if sep else name
    if len(short) > NAME_CHARS:
        short = short[:NAME_CHARS - 1] + "…"
    return Heading(short, " · ".join(filter(None, query.split("&"))))


def input_placeholder(example_inputs: Iterable[Any]) -> str:
    """The shape of the model's first tensor input, as the input-shape field's placeholder."""
    first = next((x for x in example_inputs if hasattr(x, "shape")), None)
    return ",".join(map(str, first.shape)) if first is not None else "default"


def loaded_caption(info: Mapping[str, Any], calibrated: bool) -> str:
    """Where the model's weights, tokenizer and calibration data came from."""
    weights = "loaded from disk" if info.get("pretrained") else "random (or none, on meta)"
    tokenizer = f" · tokenizer: {info['tokenizer']}" if info.get("tokenizer") else ""
    return (f"task: {info.get('task', '?')} · weights: {weights}{tokenizer} · calibration: "
            f"{'file' if calibrated else 'random inputs'}")


def group_rows(groups: Sequence[Group], verdicts: Mapping[int, str]) -> list[dict[str, Any]]:
    """One row per group for the Model page's table (pre-flight verdict when computed)."""
    return [{"id": g.id, "group": g.title, "target": target_of(g).value,
             "prunable": g.prunable, "reason": g.reason,
             "pre-flight": verdicts.get(g.id, "") if g.prunable else "",
             "axes": ", ".join(f"{part_label(a.role, a.size)} {a.size}"
                               for a in g.axes[:MAX_AXES_SHOWN])
             + (f" (+{len(g.axes) - MAX_AXES_SHOWN} more)" if len(g.axes) > MAX_AXES_SHOWN
                else ""),
             "members": len(g.members)} for g in groups]


def statement_lines(said: Statement) -> list[str]:
    """The statement of what the settings cut, as Markdown list items (one per target)."""
    return [f"- **{loss.target}**: {loss.details()}" for loss in said.losses]


def unsafe_alone(verdicts: Mapping[int, str]) -> bool:
    """Whether some group is unsafe to cut alone (the page then points at joint proposals)."""
    return any(v.startswith("unsafe alone") for v in verdicts.values())


def pending_rows(pending: Sequence[Proposal], costs: Mapping[GroupKey, str] | None = None
                 ) -> list[dict[str, str]]:
    """One row per pending proposal: its group, the widths it would change and (``costs``:
    group key -> a cell, see `explorer.app.cost.cost_label`) what accepting it costs."""
    return [{"group": q.group.title, **({"cost": costs.get(q.key, "")} if costs else {}),
             "change": "; ".join(f"{part_label(ch.axis, ch.width_before)} "
                                 f"{ch.width_before}→{ch.width_after}"
                                 for ch in q.changes[:MAX_CHANGES_SHOWN])
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


PROMPT_EXAMPLE = "The capital of France is"  # the prompt a damaged LLM gets wrong first


def continuation_rows(texts: Sequence[Continuation]) -> list[dict[str, str]]:
    """One table row per prompt: its greedy continuation by the original and the pruned
    model."""
    return [{"prompt": c.prompt, "original continues": c.before, "pruned continues": c.after}
            for c in texts]
