"""What the Model page shows, as plain data: headings, captions, table rows.

Streamlit-free, so the wording is tested without a browser and the pages stay drawing only.
The Groups page's words and rows are `explorer.render.proposal_view`'s.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..coupling.groups import Group
from ..coupling.targets import target_of
from ..quality.generate import Continuation
from ..render.proposal_view import part_label

MAX_AXES_SHOWN = 6  # axes listed per group in the Model page's table
NAME_CHARS = 48  # a spec name longer than this is shortened in the heading


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
             "axes": ", ".join(f"{part_label(g, i)} {a.size}"
                               for i, a in enumerate(g.axes[:MAX_AXES_SHOWN]))
             + (f" (+{len(g.axes) - MAX_AXES_SHOWN} more)" if len(g.axes) > MAX_AXES_SHOWN
                else ""),
             "members": len(g.members)} for g in groups]


def unsafe_alone(verdicts: Mapping[int, str]) -> bool:
    """Whether some group is unsafe to cut alone (the page then points at joint proposals)."""
    return any(v.startswith("unsafe alone") for v in verdicts.values())


PROMPT_EXAMPLE = "The capital of France is"  # the prompt a damaged LLM gets wrong first


def continuation_rows(texts: Sequence[Continuation]) -> list[dict[str, str]]:
    """One table row per prompt: its greedy continuation by the original and the pruned
    model."""
    return [{"prompt": c.prompt, "original continues": c.before, "pruned continues": c.after}
            for c in texts]
