"""Export a pruned model: pickle, safetensors + plan, transformers folder, report.

Formats (``export(..., formats=...)``):

* ``pt``: ``model.pt`` from ``torch.save(model)``. A pickle: loading it runs code from the
  file (``torch.load(path, weights_only=False)``); load only files you trust.
* ``safetensors``: ``model.safetensors`` (weights only) and ``plan.json``. `load_pruned`
  builds the original architecture, replays the plan and loads the weights; no pickle is
  read anywhere, so these files are safe to load from anyone.
* ``hf``: for transformers models, a ``save_pretrained`` folder ``hf/`` whose config holds
  the pruned widths; ``AutoModel*.from_pretrained`` loads it. Only when the widths are the
  same in every layer and the config rebuilds the pruned model exactly; otherwise the
  export falls back to ``safetensors`` and says why.
* ``report``: ``report.md`` and a self-contained ``report.html`` (see `explorer.report`).

Each export writes a ``README.md`` listing the files and how to load them.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..coupling.heads import AttentionInfo
from ..prune.fixups.hfconfig import ConfigUpdate, update_config
from ..prune.preflight import clone_model
from ..quality.evaluate import Quality
from .plan import Plan

FORMATS = ("pt", "safetensors", "hf", "report")
DEFAULT_FORMATS = ("pt", "safetensors", "report")

__all__ = ["DEFAULT_FORMATS", "FORMATS", "ExportError", "ExportResult", "export",
           "load_pruned", "parse_formats"]


class ExportError(ValueError):
    """An export or reload that cannot be done as asked."""


@dataclass
class ExportResult:
    """What `export` wrote."""

    directory: str
    files: dict[str, list[str]] = field(default_factory=dict)  # format -> paths written
    messages: list[str] = field(default_factory=list)  # fall-backs and skips, for people
    config: ConfigUpdate | None = None  # the transformers config update, when tried


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"pt,hf"`` or a sequence -> checked tuple of format names."""
    items = [f.strip() for f in (text.split(",") if isinstance(text, str) else text)]
    items = [f for f in items if f]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise ExportError(f"unknown export format(s) {bad or items!r}; use a comma-separated "
                          f"list of {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def export(model: nn.Module, out_dir: str | os.PathLike[str],
           formats: str | Sequence[str] = DEFAULT_FORMATS, plan: Plan | None = None,
           original: nn.Module | None = None, example_inputs: Sequence[Any] | None = None,
           attention: tuple[Sequence[AttentionInfo], Sequence[AttentionInfo]] | None = None,
           quality: Quality | None = None, tokenizer: Any | None = None) -> ExportResult:
    """Write the pruned ``model`` to ``out_dir`` in each of ``formats``.

    Args:
        model: the pruned model (not changed, except that a transformers ``config`` is
            brought in line with the pruned widths).
        out_dir: created if missing.
        formats: names from `FORMATS`.
        plan: the plan that pruned it; needed by ``safetensors`` (and summarised by the
            report).
        original: the unpruned model, for the report; rebuilt from ``plan.model`` if None.
        example_inputs: inputs for the report's latency; from the plan's spec if None.
        attention: attention modules (before, after) for the report's head table.
        quality: `explorer.evaluate` on held-out data, for the report's quality section.
        tokenizer: saved into the ``hf`` folder, so it is a complete checkpoint again.

    Raises:
        ExportError: an unknown format, or ``safetensors`` without a plan.
    """
    wanted = list(parse_formats(formats))
    if "safetensors" in wanted and plan is None:
        raise ExportError("the safetensors format needs the plan that pruned the model (to "
                          "rebuild its architecture on load); pass plan=, or use 'pt'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(str(out))
    if "hf" in wanted:
        _export_hf(model, out, result)
        if "hf" in result.files and tokenizer is not None:
            tokenizer.save_pretrained(result.files["hf"][0])
        if "hf" not in result.files and plan is not None and "safetensors" not in wanted:
            wanted.append("safetensors")
            result.messages.append("wrote model.safetensors + plan.json instead (load with "
                                   "explorer.load_pruned)")
    if "pt" in wanted:
        torch.save(model, out / "model.pt")
        result.files["pt"] = [str(out / "model.pt")]
    if "safetensors" in wanted and plan is not None:
        result.files["safetensors"] = _export_safetensors(model, plan, out)
    if "report" in wanted:
        result.files["report"] = _export_report(model, out, plan, original, example_inputs,
                                                attention, quality)
    _write_readme(out, result, plan)
    return result


def _export_safetensors(model: nn.Module, plan: Plan, out: Path) -> list[str]:
    from safetensors.torch import save_model
    save_model(model, str(out / "model.safetensors"), force_contiguous=True)
    plan.save(out / "plan.json")
    return [str(out / "model.safetensors"), str(out / "plan.json")]


def _export_hf(model: nn.Module, out: Path, result: ExportResult) -> None:
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        result.messages.append("hf: not a transformers model; no transformers folder written")
        return
    update = update_config(model)
    result.config = update
    if not update.ok:
        result.messages.append(f"hf: no transformers folder: {update.reason}")
        return
    folder = out / "hf"
    from transformers import PreTrainedModel  # only models with a config reach this point

    if not isinstance(model, PreTrainedModel):
        result.messages.append("hf: no transformers folder: the model is not a transformers "
                               "PreTrainedModel")
        return
    model.save_pretrained(str(folder))
    result.files["hf"] = [str(folder)]


def _export_report(model: nn.Module, out: Path, plan: Plan | None,
                   original: nn.Module | None, example_inputs: Sequence[Any] | None,
                   attention: tuple[Sequence[AttentionInfo], Sequence[AttentionInfo]] | None,
                   quality: Quality | None = None) -> list[str]:
    from .report import build_report, write_report
    if original is None or example_inputs is None:
        if plan is None:
            raise ExportError("the report needs the original model and example inputs, or a "
                              "plan whose spec rebuilds them; pass original= and "
                              "example_inputs=, or plan=")
        lm = _load_spec(plan)
        original = original if original is not None else lm.model
        example_inputs = example_inputs if example_inputs is not None else lm.example_inputs
    report = build_report(original, model, example_inputs, plan, attention,
                          title=f"Pruning report: {plan.model}" if plan else "Pruning report",
                          quality=quality)
    return [str(p) for p in write_report(report, out)]


def _load_spec(plan: Plan) -> Any:
    from .specs import load_model
    first = plan.input_shapes[0] if plan.input_shapes else None
    return load_model(plan.model, input_shape=tuple(first) if first else None)


_README = """# Pruned model: {spec}

Made by Pruning Explorer. Files:

{files}
"""
_HOWTO = {
    "pt": ("`model.pt`: the whole module, `torch.save`d. **This is a pickle: loading it runs "
           "code from the file; load only files you trust**: "
           "`torch.load('model.pt', weights_only=False)`."),
    "safetensors": ("`model.safetensors` + `plan.json`: weights and the pruning plan, no "
                    "pickle. `explorer.load_pruned(None, '<this folder>')` rebuilds the "
                    "original architecture from the plan's spec, replays the plan and loads "
                    "the weights."),
    "hf": ("`hf/`: a transformers folder with the pruned widths in `config.json`: "
           "`AutoModelForCausalLM.from_pretrained('<this folder>/hf')` (or `AutoModel`)."),
    "report": "`report.md`, `report.html`: what changed, per layer, heads, latency, the plan.",
}


def _write_readme(out: Path, result: ExportResult, plan: Plan | None) -> None:
    lines = [f"- {_HOWTO[f]}" for f in FORMATS if f in result.files]
    lines += [f"- note: {m}" for m in result.messages]
    text = _README.format(spec=plan.model if plan else "(no spec)", files="\n".join(lines))
    (out / "README.md").write_text(text, encoding="utf-8")


def load_pruned(source: str | nn.Module | None, directory: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model exported with ``safetensors``: no pickle is read.

    Args:
        source: a fresh, unpruned model of the plan's architecture, or a spec string, or
            None to use the spec recorded in the plan.
        directory: the export folder (``plan.json`` and ``model.safetensors``).

    Returns:
        The pruned model with the exported weights, in eval mode.

    Raises:
        explorer.PlanError: the plan is unreadable or does not fit the model.
        ExportError: the weights file is missing or does not fit the replayed model.
    """
    from safetensors.torch import load_model as load_weights
    folder = Path(directory)
    plan = Plan.load(folder / "plan.json")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"'{weights}' does not exist; export with the safetensors format")
    if isinstance(source, nn.Module):
        model = source
    else:
        from .specs import load_model
        model = load_model(source or plan.model).model
    plan.apply(model)
    try:
        load_weights(model, str(weights), strict=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise ExportError(f"weights '{weights}' do not fit the replayed model: "
                          f"{str(e).splitlines()[0]}") from e
    return model.eval()


def snapshot(model: nn.Module) -> nn.Module:
    """A deep copy to keep as the report's "before" model while ``model`` is pruned."""
    return clone_model(model)
