"""Apply a plan to a sharded transformers checkpoint, shard by shard, without the model.

``replay_checkpoint(folder, plan, out)`` reads a transformers folder (``config.json`` and
``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards with their
``model.safetensors.index.json``) and writes the pruned checkpoint next to it, the same
tensors and config an in-memory `explorer.io.export.export` of the pruned model writes:

1. **Check first, write nothing until every check passes.** The shards' headers give every
   tensor's name and shape (``safe_open`` reads no weights for that); they must match the
   plan's fingerprint. The architecture is built on ``meta`` from the config (no weights)
   and the plan is replayed on it: every step, index and attribute is validated, and
   `explorer.prune.fixups.hfconfig.update_config` says whether a config can describe the
   pruned widths.
2. **Cut one shard at a time, one tensor at a time.** The output shard's header is
   written first (its shapes follow from the plan), then each tensor is read, its kept
   indices selected (``index_select``: bit-identical to `Plan.apply`) and appended. The file
   is renamed into place when complete, then marked done (``OUT/.stream/<shard>.done``).
   Peak memory is about the largest tensor (read and cut), below the largest shard.
3. **Resumable.** A shard whose done marker matches this plan and source is skipped, so an
   interrupted run picks up where it stopped.
4. **Loadable output.** Uniform widths: ``config.json`` with the pruned widths, new shards
   and index; ``from_pretrained(out)`` loads it. Where only constants the constructor
   derives from the config differ (the attention scaling after a head-dim cut), they are
   folded into the weights as the export folds them (`explorer.prune.fixups.fold`, planned
   on the trace of the weightless copy; the export also checks it with a forward, which a
   streamed replay has no weights for), each scaled tensor multiplied as it is cut.
   Otherwise (widths differ between layers, a fold that cannot be made): the shards,
   ``plan.json`` and the unpruned ``original_config.json``;
   `explorer.load_pruned` rebuilds the model from them (like the in-memory
   ``safetensors`` export).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import os
import shutil
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..graph.tracer import TraceError, trace
from ..prune.fixups.fold import Fold, plan_fold, scale_tensor
from ..prune.fixups.hfconfig import (
    ConfigUpdate,
    differing_constants,
    real_rotary,
    update_config,
)
from .jsonfile import read_json
from .names import checkpoint_names, dropped_on_load
from .own_code import refuse_own_code
from .paths import check_out_apart, inside, shard_files
from .plan import Plan, Replay
from .refit import DTYPE_BYTES, check_refit, header_entry
from .specs._files import architecture_class, safetensors_shapes
from .specs._pruned_folder import ORIGINAL_CONFIG
from .specs._types import one_line

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16}  # the dtypes a refit value may be written as
_MARKERS = ".stream"  # folder in the output: one done marker per finished shard

__all__ = ["Checkpoint", "OutputKind", "StreamError", "StreamResult", "read_checkpoint",
           "replay_checkpoint"]


class StreamError(ValueError):
    """A checkpoint folder that cannot be read or pruned as asked; nothing was written."""


class OutputKind(enum.Enum):
    """What the output folder holds."""

    HF = "hf"  # config.json with the pruned widths: from_pretrained loads it
    SAFETENSORS = "safetensors"  # shards + plan.json + original_config.json: load_pruned


@dataclass(frozen=True)
class Checkpoint:
    """A transformers folder as read from its headers (no weights loaded)."""

    folder: Path
    shards: dict[str, list[str]]  # shard file name -> its tensor names, in file order
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    sharded: bool  # an index file names the shards (else one model.safetensors)
    # checkpoint name -> the model's name where they differ (see `_model_names`)
    renamed: dict[str, str] = field(default_factory=dict)

    def shard_bytes(self, shard: str) -> int:
        return (self.folder / shard).stat().st_size

    def model_name(self, name: str) -> str:
        """The model's name of checkpoint tensor ``name``."""
        return self.renamed.get(name, name)

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor shapes under the model's names."""
        return {self.model_name(n): shape for n, shape in self.shapes.items()}


@dataclass
class StreamResult:
    """What `replay_checkpoint` did."""

    out: str
    kind: OutputKind
    written: list[str] = field(default_factory=list)  # shards cut in this run
    skipped: list[str] = field(default_factory=list)  # shards an earlier run finished
    tensors_cut: int = 0  # checkpoint tensors whose shape the plan changes
    config_changed: dict[str, list[int]] = field(default_factory=dict)  # key -> [old, new]
    messages: list[str] = field(default_factory=list)  # why the fall-back, for people
    largest_shard_bytes: int = 0  # of the input


def read_checkpoint(folder: str | os.PathLike[str]) -> Checkpoint:
    """Names and shapes of every tensor of a safetensors checkpoint folder.

    Raises:
        StreamError: no safetensors weights, or an index naming missing shards.
    """
    from safetensors import SafetensorError

    root = Path(folder)
    if (root / INDEX).is_file():
        files = sorted(shard_files(root / INDEX, StreamError))  # inside the folder, or refused
        odd = [name for name in files if not name.endswith(".safetensors")]
        if odd:
            raise StreamError(f"'{root / INDEX}' names shard '{odd[0]}', which is not a "
                              f".safetensors file; streaming replay reads safetensors shards")
        sharded = True
    elif (root / SINGLE).is_file():
        files, sharded = [SINGLE], False
    else:
        raise StreamError(f"'{root}' holds no {SINGLE} or {INDEX}; streaming replay reads "
                          f"safetensors checkpoints (save_pretrained(..., "
                          f"safe_serialization=True))")
    shards: dict[str, list[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        path = inside(root, name, root, "weights file", StreamError)
        try:
            found = safetensors_shapes(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise StreamError(f"shard '{path}' is not a readable safetensors file "
                              f"({' '.join(str(e).split())[:200]}); is it complete?") from e
        shards[name] = list(found)
        shapes.update(found)
    return Checkpoint(root, shards, shapes, sharded)


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, "the checkpoint's", StreamError)
    if not isinstance(data, dict):
        raise StreamError(f"'{path}' must hold a JSON object")
    return data


def _meta_model(folder: Path) -> nn.Module:
    """The checkpoint's architecture on ``meta`` (no weights), from its config."""
    import transformers
    from transformers import AutoConfig

    refuse_own_code(folder, StreamError)  # and transformers is told never to run any
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - config classes validate with many error types
        raise StreamError(f"transformers cannot read '{folder / 'config.json'}': "
                          f"{type(e).__name__}: {one_line(e)}") from e
    arch, cls = architecture_class(config)
    if cls is None:
        raise StreamError(f"config '{folder / 'config.json'}' names architecture {arch!r}, "
                          f"which transformers {transformers.__version__} does not have; "
                          f"set 'architectures' to a transformers model class")
    try:
        with torch.device("meta"):
            model: nn.Module = cls(config)
    except Exception as e:  # noqa: BLE001 - model constructors reject odd configs in any type
        raise StreamError(f"transformers cannot build {arch} from '{folder / 'config.json'}': "
                          f"{type(e).__name__}: {one_line(e)}") from e
    real_rotary(model)  # so a head-dim cut's frequencies are checked against the config's
    return model


def _model_names(meta: nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Checkpoint tensor name -> the model's name where transformers renames it on load.

    Raises:
        StreamError: a tensor transformers *converts* on load (per-expert weights fused
            into one tensor, say): it has no single model tensor to cut.
    """
    names = checkpoint_names(meta, ckpt.shapes)
    if names.converted:
        name, target = next(iter(names.converted.items()))
        raise StreamError(f"the checkpoint's tensor '{name}' is converted when transformers "
                          f"loads it (into '{target}', with others), so it cannot be cut "
                          f"tensor by tensor; replay the plan in memory (`replay --model "
                          f"hf:{ckpt.folder}`), with --device meta for the structure")
    return names.renamed


def _check_fingerprint(plan: Plan, ckpt: Checkpoint, meta: nn.Module) -> None:
    """Shard tensors against the plan's fingerprint; absent ones must be ties or buffers
    that checkpoints do not hold."""
    theirs = {name: tuple(shape) for name, shape in plan.fingerprint.tensors}
    hint = (f"; the plan was made for another model (or this checkpoint is already pruned): "
            f"use a plan made on '{ckpt.folder}'s architecture")
    shapes = ckpt.model_shapes()
    dropped = dropped_on_load(meta, shapes)  # not the model's: copied through uncut
    for name, shape in shapes.items():
        if name in dropped:
            continue
        if name not in theirs:
            raise StreamError(f"the checkpoint has tensor '{name}', which the plan's model "
                              f"'{plan.model}' did not{hint}")
        if shape != theirs[name]:
            raise StreamError(f"tensor '{name}' has shape {shape} in the checkpoint but "
                              f"{theirs[name]} in the plan's model '{plan.model}'{hint}")
    persistent = set(meta.state_dict(keep_vars=True))
    first_of: dict[int, list[str]] = {}
    for name, t in [*meta.named_parameters(remove_duplicate=False),
                    *meta.named_buffers(remove_duplicate=False)]:
        first_of.setdefault(id(t), []).append(name)
    stored = {n for names in first_of.values() for n in names
              if any(a in shapes for a in names)}
    for name in theirs:
        if name not in shapes and name in persistent and name not in stored:
            raise StreamError(f"the checkpoint has no tensor '{name}', which the plan's model "
                              f"'{plan.model}' had{hint}")


def _stamp(plan: Plan, ckpt: Checkpoint, shard: str, fold: Fold | None) -> str:
    """What a done marker holds: this plan (its recorded folds too), this source shard (name
    and size), the export's fold."""
    folds = None if fold is None else [fold.scaled, fold.elements]
    text = json.dumps([plan.to_dict(), shard, ckpt.shard_bytes(shard), folds], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _fold(meta: nn.Module, plan: Plan, update: ConfigUpdate | None, names: Collection[str]
          ) -> tuple[Fold | None, ConfigUpdate | None, str]:
    """The fold an export would make on the pruned model, planned on the weightless
    ``meta`` copy: the fold (None if none), the config update, and a note for people."""
    constants = None if update is None or update.ok else differing_constants(meta)
    if update is None or not constants:
        return None, update, ""
    graph = None
    for dtype in (torch.float32, torch.long):  # float inputs, then token ids
        inputs = tuple(torch.zeros(s, dtype=dtype, device="meta")
                       for s in plan.input_shapes if s is not None)
        try:
            graph = trace(meta, inputs)
            break
        except TraceError:
            continue
    fold = plan_fold(graph, meta, constants) if graph is not None else \
        Fold(reason="cannot trace the weightless model to fold constants")
    missing = [n for n in fold.scaled if n not in names]
    if not fold.reason and missing:  # tied or renamed in the checkpoint: it cannot be scaled
        fold.reason = (f"the weight '{missing[0]}' the ratio would be folded into is not a "
                       f"tensor of the checkpoint (tied or saved under another name)")
    if not fold.reason and fold.unread:
        fold.reason = (f"{', '.join(fold.unread)} is read by no op of the weightless trace; "
                       f"only a forward with weights could confirm that it just follows the "
                       f"config (export the pruned model in memory)")
    if fold.reason:
        update.reason += f"; not folded: {fold.reason}"
        return None, update, ""
    for (mod, attr), new in constants.items():
        setattr(meta.get_submodule(mod), attr, new)
    again = update_config(meta)
    if not again.ok:
        update.reason = f"{again.reason} (after folding {', '.join(fold.constants)} into the " \
                        f"weights)"
        return None, update, ""
    note = (", ".join(f"{k} {v[0]:.6g} -> {v[1]:.6g}" for k, v in fold.constants.items())
            + f" as the config derives them; the ratios are folded into {len(fold.scaled)} "
              f"weights (planned on the weightless trace, as the export plans it; the export "
              f"also checks it with a forward)")
    return fold, ConfigUpdate({**update.changed, **again.changed}, ok=True), note


@dataclass
class _Refits:
    """The plan's refit tensors (`explorer.io.refit`): each replaces its cut tensor, and the
    biases the refit added go into the shard of their layer's weight."""

    path: Path | None = None  # the checked refit file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # model name -> shape
    added: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # shard -> [(name
    # in the output, the weight whose dtype it takes)]

    def names(self, shard: str, ckpt: Checkpoint) -> list[str]:
        return [*ckpt.shards[shard], *(n for n, _w in self.added.get(shard, []))]


def _refits(plan: Plan, ckpt: Checkpoint, refit: Path | None,
            keeps: Mapping[str, dict[int, torch.Tensor]]) -> _Refits:
    """Where the plan's refit tensors go, checked against the cut checkpoint's shapes."""
    if plan.refit is None:
        return _Refits()
    if refit is None:
        raise StreamError(f"the plan refits {len(plan.refit.tensors)} tensor(s) whose values "
                          f"are not in a file beside it (a plan exported with its model keeps "
                          f"them in the export's weights): load that export, or make the plan "
                          f"with prune --device meta --max-memory ... --compensate lstsq")
    shapes = plan.refit.shapes()
    checkpoint_of = {ckpt.model_name(n): n for n in ckpt.shapes}
    shard_of = {n: s for s, names in ckpt.shards.items() for n in names}
    out = _Refits(refit, shapes)
    for name, shape in shapes.items():
        if name in plan.refit.created:
            weight = name.rpartition(".")[0] + ".weight"
            if weight not in checkpoint_of:
                raise StreamError(f"the plan adds bias '{name}', but the checkpoint has no "
                                  f"weight '{weight}' to put it beside")
            stored = checkpoint_of[weight]
            out.added.setdefault(shard_of[stored], []).append(
                (stored.rpartition(".")[0] + ".bias", stored))
            continue
        if name not in checkpoint_of:
            raise StreamError(f"the plan refits '{name}', which is not a tensor of the "
                              f"checkpoint")
        cut = list(ckpt.shapes[checkpoint_of[name]])
        for dim, keep in keeps.get(name, {}).items():
            cut[dim] = len(keep)
        if tuple(cut) != shape:
            raise StreamError(f"the plan refits '{name}' with shape {shape}, but its cut is "
                              f"{tuple(cut)}; the refit file belongs to another plan")
    return out


def _cut_shard(ckpt: Checkpoint, shard: str, keeps: Mapping[str, dict[int, torch.Tensor]],
               target: Path, fold: Fold | None = None, replay: Replay | None = None,
               refits: _Refits | None = None) -> int:
    """Write ``shard`` with the plan's cuts to ``target`` (atomically); bytes of tensors.

    The output's safetensors header is known before any weight is read (shapes from the
    plan, dtypes from the input header), so it is written first and each tensor follows
    as soon as it is cut: one input tensor and its cut copy are in memory at a time.
    """
    from safetensors import safe_open

    refits = refits or _Refits()
    added = dict(refits.added.get(shard, []))  # output name -> the weight it sits beside
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a half-written one (or a link planted there): never followed
    with safe_open(str(ckpt.folder / shard), framework="pt") as f, \
            (safe_open(str(refits.path), framework="pt") if refits.path is not None
             else contextlib.nullcontext()) as new:
        entries: dict[str, Any] = {}
        offset = 0
        for name in refits.names(shard, ckpt):
            sl = f.get_slice(added.get(name, name))
            shape = [int(x) for x in sl.get_shape()]
            for dim, keep in keeps.get(ckpt.model_name(name), {}).items():
                shape[dim] = len(keep)
            if name in added:
                shape = list(refits.shapes[ckpt.model_name(added[name]).rpartition(".")[0]
                                           + ".bias"])
            dtype = sl.get_dtype()
            if dtype not in DTYPE_BYTES:
                raise StreamError(f"tensor '{name}' of '{shard}' has dtype {dtype}, which "
                                  f"streaming replay does not handle")
            entries[name], offset = header_entry(dtype, shape, offset)
        metadata = f.metadata()
        if metadata:
            entries = {"__metadata__": metadata, **entries}
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # tensors start 8-byte aligned
        with open(tmp, "xb") as out:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            for name in refits.names(shard, ckpt):
                if name in added:  # a bias the refit added: the model's name of it
                    known = ckpt.model_name(added[name]).rpartition(".")[0] + ".bias"
                else:
                    known = ckpt.model_name(name)  # the output keeps the checkpoint's names
                if known in refits.shapes and new is not None:  # refit: replaces the cut
                    dtype = f.get_slice(added.get(name, name)).get_dtype()
                    t = new.get_tensor(known).to(_TORCH_DTYPES[dtype])
                else:
                    t = f.get_tensor(name)
                    for dim, idx in sorted(keeps.get(known, {}).items()):
                        t = t.index_select(dim, idx)  # as resize_tensor, without a copy
                for scaled, factor, part in replay.folds if replay is not None else ():
                    if scaled == known:  # the plan's folds, in order, as Plan.apply makes them
                        scale_tensor(t, factor, part)
                if replay is not None and known in replay.fills:
                    t = torch.full_like(t, replay.fills[known])
                if fold is not None and known in fold.scaled:  # as the export folds it
                    scale_tensor(t, fold.scaled[known], fold.elements.get(known))
                out.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del t
    os.replace(tmp, target)
    return offset


def _output_bytes(ckpt: Checkpoint, shard: str, out: Path) -> int:
    """Bytes of tensors in a finished output shard, from its header."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(out / shard), framework="pt") as f:
        names = f.keys()
        for name in names:
            sl = f.get_slice(name)
            total += DTYPE_BYTES[sl.get_dtype()] * math.prod(int(x) for x in sl.get_shape())
    return total




def replay_checkpoint(checkpoint: str | os.PathLike[str], plan: Plan,
                      out: str | os.PathLike[str], force: bool = False,
                      refit: str | os.PathLike[str] | None = None) -> StreamResult:
    """Prune a safetensors checkpoint folder as ``plan`` says, shard by shard.

    Args:
        checkpoint: a transformers folder (config + safetensors, sharded or not).
        plan: a plan made on this architecture (e.g. on a ``meta`` copy).
        out: the output folder; created if missing. It may not be the checkpoint folder, lie
            inside it or hold it. A folder that holds an earlier streamed replay is resumed:
            shards it finished with the same plan are kept.
        force: write into a non-empty ``out`` that holds no earlier streamed replay (files
            of the same names are replaced); otherwise such a folder is refused.
        refit: the plan's refit file, checked (`explorer.io.refit.check_refit`): its
            tensors replace the cut ones, and the biases it adds join their layers' shards.

    Returns:
        What was written and skipped, and the output kind.

    Raises:
        StreamError: unreadable folder, or a plan for another checkpoint; nothing written.
        explorer.PlanError: a step that does not fit; nothing written.
    """
    src, dst = Path(checkpoint), Path(out)
    check_out_apart(dst, [src], StreamError)
    _check_out(dst, force)
    if not (src / "config.json").is_file():
        raise StreamError(f"'{src}' has no config.json; pass a transformers checkpoint "
                          f"folder (save_pretrained output)")
    ckpt = read_checkpoint(src)
    extras = _other_files(src)
    meta = _meta_model(src)
    ckpt = dataclasses.replace(ckpt, renamed=_model_names(meta, ckpt))
    _check_fingerprint(plan, ckpt, meta)
    replay = plan.apply(meta)  # validates every step and attribute on the weightless copy
    keeps = plan.keeps(dict(plan.fingerprint.tensors))
    absent = [n for n, _f, _p in replay.folds if n not in ckpt.model_shapes()]
    if absent:
        raise StreamError(f"the plan folds a constant into '{absent[0]}', which is not a tensor "
                          f"of the checkpoint (tied or saved under another name); replay it "
                          f"in memory (explorer replay --model hf:{src})")
    refits = _refits(plan, ckpt, None if refit is None else Path(refit), keeps)
    fold, update, note = _fold(meta, plan, replay.config, ckpt.model_shapes())
    if plan.refit is not None and plan.refit.created and update is not None:
        update = ConfigUpdate(update.changed, ok=False, reason=(
            f"the refit added biases to {len(plan.refit.created)} layer(s), which the config's "
            f"bias switches (one per kind of projection) cannot describe"))
        fold = None
    kind = OutputKind.HF if update is not None and update.ok else OutputKind.SAFETENSORS
    result = StreamResult(str(dst), kind, largest_shard_bytes=max(
        ckpt.shard_bytes(s) for s in ckpt.shards))
    result.tensors_cut = sum(1 for name in ckpt.shapes if ckpt.model_name(name) in keeps)
    if plan.refit is not None:
        result.messages.append(f"{len(plan.refit.tensors)} refit tensor(s) written from "
                               f"'{refit}' ({len(plan.refit.created)} bias(es) added)")
    if kind is OutputKind.SAFETENSORS:
        reason = update.reason if update is not None else "the model has no config"
        result.messages.append(f"no config describes the pruned model ({reason}); wrote the "
                               f"shards with plan.json and {ORIGINAL_CONFIG} (load with "
                               f"explorer.load_pruned)")
    elif update is not None:
        result.config_changed = dict(update.changed)
        if note:
            result.messages.append(note)
    if replay.constants:
        result.messages.append(
            ", ".join(f"{m}.{a} {v[0]:.6g} -> {v[1]:.6g}" for (m, a), v in
                      replay.constants.items())
            + f" as the plan folded them after its cuts; the ratios are folded into "
              f"{len({n for n, _f, _p in replay.folds})} weights")

    (dst / _MARKERS).mkdir(parents=True, exist_ok=True)
    total = 0
    for shard in ckpt.shards:
        target, marker = dst / shard, dst / _MARKERS / (shard + ".done")
        stamp = _stamp(plan, ckpt, shard, fold)
        if target.is_file() and marker.is_file() and marker.read_text() == stamp:
            result.skipped.append(shard)
            total += _output_bytes(ckpt, shard, dst)
            continue
        marker.unlink(missing_ok=True)
        total += _cut_shard(ckpt, shard, keeps, target, fold, replay, refits)
        marker.write_text(stamp)
        result.written.append(shard)
    _finish(ckpt, plan, dst, result, total, extras, refits)
    return result


def _check_out(dst: Path, force: bool) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder that holds no earlier
    streamed replay (to resume) unless ``force``."""
    if dst.exists() and not dst.is_dir():
        raise StreamError(f"--out '{dst}' exists and is not a folder; choose a folder")
    if (dst / _MARKERS).is_symlink():
        raise StreamError(f"'{dst / _MARKERS}' is a link; the done markers of a streamed "
                          f"replay are written there: remove it")
    if force or not dst.is_dir() or (dst / _MARKERS).is_dir():
        return
    if any(dst.iterdir()):
        raise StreamError(f"--out '{dst}' is not empty and holds no earlier streamed replay to "
                          f"resume; choose a new folder, or pass --force (force=True) to write "
                          f"into it")


def _other_files(folder: Path) -> list[Path]:
    """The checkpoint's files that are copied as they are (tokenizer, generation config ...),
    each checked to stay inside the folder (a link out is refused: its target would be
    copied into the output)."""
    files = []
    for path in sorted(folder.iterdir()):
        inside(folder, path.name, folder, "file", StreamError)
        if path.is_file() and not _is_weights_or_config(path.name):
            files.append(path)
    return files


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # never write through a link left there
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _finish(ckpt: Checkpoint, plan: Plan, dst: Path, result: StreamResult, total: int,
            extras: list[Path], refits: _Refits) -> None:
    """Index, config (or plan + original config), the checkpoint's other files, README."""
    if ckpt.sharded:
        index = _read_json(ckpt.folder / INDEX)
        metadata = index.get("metadata")  # an object, unless hand-edited
        index["metadata"] = {**(metadata if isinstance(metadata, dict) else {}),
                             "total_size": total}
        if refits.added and isinstance(index.get("weight_map"), dict):
            index["weight_map"] = {**index["weight_map"], **{
                name: shard for shard, names in refits.added.items() for name, _w in names}}
        _write_atomic(dst / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = _read_json(ckpt.folder / "config.json")
    if result.kind is OutputKind.HF:
        for key, (_old, new) in result.config_changed.items():
            config[key] = new
        _write_atomic(dst / "config.json", json.dumps(config, indent=2) + "\n")
    else:
        (dst / "config.json").unlink(missing_ok=True)  # from an earlier run with another plan
        _write_atomic(dst / ORIGINAL_CONFIG, json.dumps(config, indent=2) + "\n")
        (dst / "plan.json").unlink(missing_ok=True)  # never write through a link
        plan.refit_in_weights().save(dst / "plan.json")  # refit values: in the shards
    for path in extras:
        (dst / path.name).unlink(missing_ok=True)  # copyfile would write through a link
        shutil.copyfile(path, dst / path.name)
    _write_atomic(dst / "README.md", _readme(plan, result))


def _is_weights_or_config(name: str) -> bool:
    return (name == "config.json" or name.endswith(_WEIGHT_SUFFIXES)
            or name.endswith(".index.json"))


def _readme(plan: Plan, result: StreamResult) -> str:
    if result.kind is OutputKind.HF:
        how = ("`config.json` holds the pruned widths: "
               "`AutoModelForCausalLM.from_pretrained('<this folder>')`.")
    else:
        how = (f"no transformers config describes the pruned model, so `{ORIGINAL_CONFIG}` "
               f"keeps the unpruned one and `plan.json` the pruning: "
               f"`explorer.load_pruned('hf:<this folder>/{ORIGINAL_CONFIG}', "
               f"'<this folder>')` builds it, replays the plan and loads the shards.")
    notes = "".join(f"\n- note: {m}" for m in result.messages)
    return (f"# Pruned checkpoint: {plan.model}\n\nMade by Pruning Explorer's streaming "
            f"replay ({len(plan.steps)} plan step(s)). {how}{notes}\n")


def replay_command(checkpoint: str, plan_file: str, out: str, force: bool = False
                   ) -> dict[str, Any]:
    """``python -m explorer replay --checkpoint DIR --plan FILE --out OUT [--force]``: the
    JSON summary (``_text`` for people)."""

    plan = Plan.load(plan_file)
    refit = check_refit(plan, plan_file) if plan.refit is not None and plan.refit.file \
        else None
    res = replay_checkpoint(checkpoint, plan, out, force, refit)
    summary: dict[str, Any] = {
        "checkpoint": checkpoint, "plan": plan_file, "out": res.out, "kind": res.kind.value,
        "written": res.written, "skipped": res.skipped, "tensors_cut": res.tensors_cut,
        "config_changed": res.config_changed, "messages": res.messages}
    summary["_text"] = (f"{checkpoint}: cut {res.tensors_cut} tensor(s) in "
                        f"{len(res.written)} shard(s) ({len(res.skipped)} already done) -> "
                        f"{res.out} ({res.kind.value})"
                        + "".join(f"\n  note: {m}" for m in res.messages))
    return summary
