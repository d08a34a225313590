"""Export a pruned model: pickle, safetensors + plan, transformers folder, report.

Formats (``export(..., formats=...)``):

* ``pt``: ``model.pt`` from ``torch.save(model)``. A pickle: loading it runs code from the
  file (``torch.load(path, weights_only=False)``); load only files you trust.
* ``safetensors``: ``model.safetensors`` (weights only) and ``plan.json``. `load_pruned`
  builds the original architecture, replays the plan and loads the weights; no pickle is
  read and no code named by the folder is imported (a plan made from a ``file.py:fn``
  factory loads only when the caller passes that spec or a model), so these files are data.
* ``hf``: for transformers models, a ``save_pretrained`` folder ``hf/`` whose config holds
  the pruned widths; ``AutoModel*.from_pretrained`` loads it. Only when the widths are the
  same in every layer and the config rebuilds the pruned model exactly; otherwise the
  export falls back to ``safetensors`` and says why.
* ``report``: ``report.md`` and a self-contained ``report.html`` (see `explorer.report`).

Each export writes a ``README.md`` listing the files and how to load them. An export is
written into a temporary folder beside ``out_dir`` and renamed into place, so a folder holds
one complete export or nothing; a non-empty ``out_dir`` is refused unless ``force=True``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..coupling.heads import AttentionInfo
from ..prune.fixups.fold import folded
from ..prune.fixups.hfconfig import (
    ConfigUpdate,
    cannot_describe,
    differing_constants,
    update_config,
)
from ..prune.preflight import clone_model
from ..prune.transaction import left_as_found
from ..quality.evaluate import Quality
from ..quality.generate import Continuation
from .paths import check_out_apart
from .plan import Plan
from .pruned import ExportError, load_into, read_weights
from .quiet import quiet_transformers
from .specs import SentenceFolder, write_sentence_files

FORMATS = ("pt", "safetensors", "hf", "report")
DEFAULT_FORMATS = ("pt", "safetensors", "report")

__all__ = ["DEFAULT_FORMATS", "FORMATS", "ExportError", "ExportResult", "check_out_dir", "export",
           "load_pruned", "parse_formats"]


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
           quality: Quality | None = None, tokenizer: Any | None = None,
           force: bool = False, sources: Sequence[str | os.PathLike[str]] = (),
           sentence: SentenceFolder | None = None,
           generations: Sequence[Continuation] = ()) -> ExportResult:
    """Write the pruned ``model`` to ``out_dir`` in each of ``formats``.

    Args:
        model: the pruned model, left exactly as it was (config included): the config
            brought in line with the pruned widths and folded constants go only into the
            written ``hf`` folder.
        out_dir: created if missing.
        formats: names from `FORMATS`.
        plan: the plan that pruned it; needed by ``safetensors`` (and summarised by the
            report).
        original: the unpruned model, for the report; rebuilt from ``plan.model`` if None.
        example_inputs: inputs for the report's latency; from the plan's spec if None.
        attention: attention modules (before, after) for the report's head table.
        quality: `explorer.evaluate` on held-out data, for the report's quality section.
        tokenizer: saved into the ``hf`` folder, so it is a complete checkpoint again.
        force: replace a non-empty ``out_dir`` (its old content is removed).
        sources: files and folders the caller read (weights, data, the plan file);
            ``out_dir`` must keep clear of them, and of the model's own checkpoint folder
            and the plan's spec paths, which are added here.
        sentence: the sentence-transformers pipeline the model came with
            (`explorer.LoadedModel.sentence`): its files go into the ``hf`` folder, so
            ``SentenceTransformer`` loads it.
        generations: prompts continued before and after (`explorer.quality.generate`),
            for the report.

    Raises:
        ExportError: an unknown format, ``safetensors`` without a plan, ``out_dir`` is not
            empty (and ``force`` is False) or not a folder, or it is, lies inside or holds
            a source (`explorer.io.paths.check_out_apart`).
    """
    wanted = list(parse_formats(formats))
    if "safetensors" in wanted and plan is None:
        raise ExportError("the safetensors format needs the plan that pruned the model (to "
                          "rebuild its architecture on load); pass plan=, or use 'pt'")
    target = Path(out_dir)
    check_out_apart(target, [*sources, *read_from(model, plan)], ExportError)
    check_out_dir(target, force)
    with _staging(target, force) as out:
        result = _write(model, out, wanted, plan, original, example_inputs, attention,
                        quality, tokenizer, sentence, generations)
    result.directory = str(target)
    result.files = {f: [str(target / Path(p).relative_to(out)) for p in paths]
                    for f, paths in result.files.items()}
    return result


def read_from(model: nn.Module | None, plan: Plan | None) -> list[str]:
    """What a pruned model came from: its transformers checkpoint folder (the config's
    ``_name_or_path``, when it is a local folder) and the local paths of the plan's spec."""
    found = []
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if isinstance(name, str) and name and os.path.isdir(name):
        found.append(name)
    if plan is not None:
        from .specs import spec_paths
        found += [str(p) for p in spec_paths(plan.model)]
    return found


def check_out_dir(target: Path, force: bool) -> None:
    """Refuse an ``out_dir`` that is a file, or not empty unless ``force`` (ExportError)."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"'{target}' exists and is not a folder; choose a folder for --out")
    if force:
        return
    try:
        filled = target.is_dir() and any(target.iterdir())
    except FileNotFoundError:  # removed meanwhile (another export swapping it): empty
        filled = False
    if filled:
        raise ExportError(f"'{target}' is not empty; choose a new folder, or pass --force "
                          f"(force=True) to replace its content")


@contextmanager
def _staging(target: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside ``target``, renamed onto it when the body succeeds."""
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise ExportError(f"cannot write to '{parent}': {e.strerror or e}") from e
    try:
        yield tmp
        _swap_in(tmp, target, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, target: Path, force: bool) -> None:
    old = None
    if target.is_dir() and force:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=tmp.parent))
        try:
            os.rename(target, old / "content")
        except FileNotFoundError:
            pass  # another export moved it away meanwhile: nothing to set aside
        except OSError as e:
            shutil.rmtree(old, ignore_errors=True)
            raise ExportError(f"cannot replace '{target}': {e.strerror or e}; nothing was "
                              f"written") from e
    elif target.is_dir():
        try:
            target.rmdir()  # empty: replace it (fails if another export filled it meanwhile)
        except OSError as e:
            raise ExportError(f"'{target}' was filled while exporting; nothing was "
                              f"written") from e
    try:
        os.rename(tmp, target)
    except OSError as e:
        raise ExportError(f"cannot move the export into '{target}': {e.strerror or e}; "
                          f"nothing was written") from e
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _write(model: nn.Module, out: Path, wanted: list[str], plan: Plan | None,
           original: nn.Module | None, example_inputs: Sequence[Any] | None,
           attention: tuple[Sequence[AttentionInfo], Sequence[AttentionInfo]] | None,
           quality: Quality | None, tokenizer: Any | None,
           sentence: SentenceFolder | None = None,
           generations: Sequence[Continuation] = ()) -> ExportResult:
    """Write every wanted format into the (staging) folder ``out``."""
    result = ExportResult(str(out))
    fallback = -1  # the message saying why no hf folder was written, when a fall-back follows
    if "hf" in wanted:
        with left_as_found(model):  # config updates and save_pretrained's own writes
            _export_hf(model, out, result, _fold_inputs(plan, example_inputs))
            hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if "hf" not in result.files and plan is not None:
            fallback = len(result.messages) - 1
            if "safetensors" not in wanted:
                wanted.append("safetensors")
        if "hf" in result.files and tokenizer is not None:
            tokenizer.save_pretrained(result.files["hf"][0])
        if sentence is not None:
            _export_sentence(sentence, result, hidden)
    if "pt" in wanted:
        torch.save(model, out / "model.pt")
        result.files["pt"] = [str(out / "model.pt")]
    if "safetensors" in wanted and plan is not None:
        result.files["safetensors"] = _export_safetensors(model, plan, out)
    if fallback >= 0:  # one message: why no folder, and what stands in for it
        config, said = _fallback_config(model, out)
        result.files["safetensors"] += config
        result.messages[fallback] += said
    if "report" in wanted:
        result.files["report"] = _export_report(model, out, plan, original, example_inputs,
                                                attention, quality, generations)
    _write_readme(out, result, plan)
    return result


# files zipped as they are (float weights deflate by a few percent at tens of MB/s: minutes
# for a 135 M model on a busy CPU, for almost nothing)
_STORED = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npy", ".npz"})


def export_downloads(model: nn.Module, formats: Sequence[str], dest: str | Path,
                     plan: Plan | None = None, original: nn.Module | None = None,
                     example_inputs: Any = None, tokenizer: Any | None = None,
                     sentence: SentenceFolder | None = None, quality: Quality | None = None,
                     generations: Sequence[Continuation] = ()
                     ) -> tuple[dict[str, Path], list[str]]:
    """`export` into files for downloads (the app's Export page): file name -> path under
    ``dest``, and the exporter's messages.

    ``pt`` and ``report`` files come as they are; every other format (a folder or a set of
    files) as one ``pruned_<format>.zip``. The files stay on disk (a download streams them
    from there), so a server holds no export in memory. ``dest`` must be an empty or new
    folder of the caller's (for example a session's temporary folder). ``quality`` and
    ``generations`` go into the report, as in `export`.
    """
    import shutil
    import tempfile
    import zipfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        result = export(model, tmp, formats=formats, plan=plan, original=original,
                        example_inputs=example_inputs, tokenizer=tokenizer, sentence=sentence,
                        quality=quality, generations=generations)
        for fmt, paths in result.files.items():
            if fmt in ("pt", "report"):
                for name in map(Path, paths):
                    target = dest / name.name
                    shutil.move(name, target)
                    out[name.name] = target
                continue
            target = dest / f"pruned_{fmt}.zip"
            with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
                for folder in map(Path, paths):
                    files = sorted(folder.rglob("*")) if folder.is_dir() else [folder]
                    for f in files:
                        if f.is_file():  # weights barely deflate: stored, not squeezed
                            zf.write(f, f.relative_to(Path(tmp)), None if f.suffix not in
                                     _STORED else zipfile.ZIP_STORED)
                readme = Path(tmp) / "README.md"  # how to load it, and the exporter's notes
                if readme.is_file():
                    zf.write(readme, readme.name)
            out[target.name] = target
    return out, list(result.messages)


def _export_safetensors(model: nn.Module, plan: Plan, out: Path) -> list[str]:
    from safetensors.torch import save_model
    save_model(model, str(out / "model.safetensors"), force_contiguous=True)
    plan.refit_in_weights().save(out / "plan.json")  # refit values: in model.safetensors
    return [str(out / "model.safetensors"), str(out / "plan.json")]


def _fallback_config(model: nn.Module, out: Path) -> tuple[list[str], str]:
    """Beside the safetensors + plan that stand in for an ``hf`` folder: the model's
    transformers config as far as one describes the pruned model (the fields the cuts left
    uniform are updated, the rest keep their original values). Returns the file, and the
    words that finish the message saying why no folder was written (the reason is said
    there, once)."""
    instead = ". Wrote model.safetensors + plan.json instead"
    config: Any = getattr(model, "config", None)
    if not hasattr(config, "to_json_file"):
        return [], f"{instead} (load with explorer.load_pruned)"
    with left_as_found(model):
        update = update_config(model)  # brings what one config can say in line
        config.to_json_file(str(out / "config.json"))
    changed = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in update.changed.items())
    return [str(out / "config.json")], (
        f"{instead}, with config.json: the transformers config with the fields every layer "
        f"shares brought in line with the cuts ({changed or 'none changed'}), the rest at "
        f"their original values. plan.json holds every cut per layer; load with "
        f"explorer.load_pruned, not from_pretrained")


def _export_hf(model: nn.Module, out: Path, result: ExportResult,
               inputs: list[tuple[Any, ...]]) -> None:
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        result.messages.append("hf: no transformers folder: not a transformers model")
        return
    update = update_config(model)
    result.config = update
    constants = None if update.ok else differing_constants(model)
    if constants:  # only constants such as the attention scaling differ: fold them
        for candidate in inputs:
            with folded(model, constants, candidate) as fold:
                if fold.reason.startswith("cannot trace"):
                    continue
                if not fold.reason:
                    again = update_config(model)
                    if again.ok:
                        result.config = again
                        result.messages.append(
                            "hf: " + ", ".join(f"{k} {v[0]:.6g} -> {v[1]:.6g}"
                                               for k, v in fold.constants.items())
                            + f" as the config derives them; the ratios are folded into "
                              f"{len(fold.scaled)} weights (same outputs)")
                        _save_hf(model, out, result)
                        return
                    update.reason = (f"{again.reason} (after folding "
                                     f"{', '.join(fold.constants)} into the weights)")
                else:
                    update.reason += f"; not folded: {fold.reason}"
                break
    if not update.ok:
        result.messages.append(f"hf: no transformers folder: {cannot_describe(update.reason)}")
        return
    _save_hf(model, out, result)


def _export_sentence(sentence: SentenceFolder, result: ExportResult, hidden: Any) -> None:
    """The sentence-transformers files next to the exported encoder (or why not)."""
    if "hf" not in result.files:
        result.messages.append("sentence-transformers: no files written: they need the "
                               "transformers folder (hf format), which was not written")
    elif sentence.supported:
        result.messages.append(f"sentence-transformers: no files written: {sentence.supported}")
    else:
        folder = Path(result.files["hf"][0])
        write_sentence_files(sentence, folder,
                             hidden if isinstance(hidden, int) else None)
        result.messages.append(f"hf: with the sentence-transformers pipeline of "
                               f"{sentence.folder} (SentenceTransformer loads the folder)")


def _fold_inputs(plan: Plan | None, example_inputs: Sequence[Any] | None
                 ) -> list[tuple[Any, ...]]:
    """Inputs to check a fold with: the caller's, or random ones of the plan's shapes
    (floats, then token ids)."""
    if example_inputs is not None:
        return [tuple(example_inputs) if isinstance(example_inputs, (tuple, list))
                else (example_inputs,)]
    shapes = [s for s in plan.input_shapes if s is not None] if plan is not None else []
    if not shapes:
        return []
    gen = torch.Generator().manual_seed(0)
    return [tuple(torch.randn(s, generator=gen) for s in shapes),
            tuple(torch.randint(0, 2, s, generator=gen) for s in shapes)]


def _save_hf(model: nn.Module, out: Path, result: ExportResult) -> None:
    folder = out / "hf"
    from transformers import PreTrainedModel  # only models with a config reach this point

    if not isinstance(model, PreTrainedModel):
        result.messages.append("hf: no transformers folder: the model is not a transformers "
                               "PreTrainedModel")
        return
    with quiet_transformers():  # no "Writing model shards" bar on the caller's stderr
        model.save_pretrained(str(folder))
    result.files["hf"] = [str(folder)]


def _export_report(model: nn.Module, out: Path, plan: Plan | None,
                   original: nn.Module | None, example_inputs: Sequence[Any] | None,
                   attention: tuple[Sequence[AttentionInfo], Sequence[AttentionInfo]] | None,
                   quality: Quality | None = None,
                   generations: Sequence[Continuation] = ()) -> list[str]:
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
                          quality=quality, generations=generations)
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
           "`torch.load('model.pt', weights_only=False)` (a model from `file.py:fn` needs "
           "that file's folder on `sys.path`)."),
    "safetensors": ("`model.safetensors` + `plan.json`: weights and the pruning plan, no "
                    "pickle, no code. `explorer.load_pruned(None, '<this folder>')` rebuilds "
                    "the original architecture from the plan's `timm:`/`hf:`/`demo:` spec, "
                    "replays the plan and loads the weights. For a `file.py:fn` spec pass it "
                    "yourself, `explorer.load_pruned('file.py:fn', '<this folder>')`: that "
                    "runs the file, so only for a file you trust."),
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
        directory: the export folder (``plan.json`` and ``model.safetensors``, or the
            shards and index that `explorer.io.stream.replay_checkpoint` writes).

    Returns:
        The pruned model with the exported weights, in eval mode.

    Raises:
        explorer.PlanError: the plan is unreadable or does not fit the model.
        ExportError: the weights file is missing or does not fit the replayed model.
    """
    folder = Path(directory)
    plan = Plan.load(folder / "plan.json")
    weights = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"  # shards from explorer.io.stream
    if not weights.is_file() and not index.is_file():
        raise ExportError(f"'{weights}' does not exist; export with the safetensors format")
    state = read_weights(weights, index)
    inputs: Sequence[Any] | None = None
    if isinstance(source, nn.Module):
        model = source
    else:
        from .specs import is_code_spec, load_model
        spec = source if source is not None else plan.model
        if source is None and is_code_spec(spec):
            raise ExportError(f"the plan in '{folder}' names the factory '{spec}'; loading a "
                              f"folder never runs code it names. If you trust that file, pass "
                              f"it yourself (this imports and runs it): "
                              f"load_pruned('{spec}', '{folder}'), or pass a fresh model")
        lm = load_model(spec)
        model, inputs = lm.model, lm.example_inputs
    return load_into(model, folder, plan, state, weights, inputs)


def snapshot(model: nn.Module) -> nn.Module:
    """A deep copy to keep as the report's "before" model while ``model`` is pruned."""
    return clone_model(model)
