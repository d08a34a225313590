"""Pruning plans: plain, versioned JSON that replays a pruning on a fresh copy of a model.

A plan records, per applied step, which indices were REMOVED from which tensor dimension
(kept = the complement, in order) and which module attributes changed. It carries a
fingerprint of the original model (every parameter and buffer name with its shape), so it
can be made on a weightless ``meta`` copy and replayed on the real weights, and so a plan
for another model is refused before anything is touched.

``Plan.apply`` validates everything first and changes the model only when every step can
be applied (all or nothing). Kept values are copied with ``index_select``: bit-identical.

A plan is data and runs no code. It is checked as untrusted input: JSON limits (size, depth,
integer length, UTF-8), a ``sha256`` checksum over the whole plan, attribute names, types and
ranges limited to what the engine itself writes (`explorer.io.plan_rules`), and every step
re-derived by the engine from the coupling of the model it is applied to (on a weightless
copy): the cuts must be whole coupled channels or heads, and the attributes exactly those the
engine sets for them (a width older plans record and the engine no longer sets, because no
code of its module reads it, is checked and skipped). Anything else is one `PlanError` and
the model is left untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coupling.analyze import Coupling
from ..graph.tracer import TraceError, trace
from ..prune.depth import BlockRemoval, remove_blocks
from ..prune.fixups.configs import config_field, own, read, rejoin
from ..prune.fixups.fold import Product, refold, scale_tensor
from ..prune.fixups.patch import resize_tensor
from ..prune.fixups.widths import describes_only
from ..prune.history import EditKind, History
from ..prune.preflight import meta_copy
from ..prune.removal import Applied, PruneError, Removal, apply_removal, removed_atoms, set_tensor
from ..prune.transaction import transaction
from .plan_rules import check_attribute

SCHEMA = 2  # bump when the JSON layout changes (and migrate the old one in `_migrate`)
# 2: steps may remove residual blocks (``blocks``); schema-1 files are read as schema 2.
# 3: steps may fold constants into weights (``constants``); a plan is written as schema 3
#    only when one does, so readers of schema 2 refuse exactly the plans they cannot replay.
FOLD_SCHEMA = 3
# 4: the plan records tensors a reconstruction refit after the cuts (``refit``); written so
#    only when it does (`--compensate`), so older readers refuse exactly those plans.
REFIT_SCHEMA = 4
_HEX64 = re.compile(r"[0-9a-f]{64}")

__all__ = ["FOLD_SCHEMA", "REFIT_SCHEMA", "SCHEMA", "BlockCut", "Plan", "PlanError",
           "PlanStep", "Refit", "Replay", "TensorCut", "checksum", "fingerprint", "redo_step",
           "step_record"]

MAX_PLAN_BYTES = 256 * 2**20  # far above any real plan; a bigger file is refused unread
_MAX_DEPTH = 16  # a plan nests 6 levels deep
_MAX_INT_DIGITS = 18  # indices, sizes and widths fit in 64 bits


class PlanError(ValueError):
    """A plan that cannot be read or does not fit the model; nothing was changed."""


@dataclass(frozen=True)
class TensorCut:
    """Indices removed from one dimension of one parameter or buffer at one step."""

    tensor: str
    dim: int
    size_before: int  # width of ``dim`` when this step starts
    removed: list[int]  # positions in that width, ascending


@dataclass(frozen=True)
class BlockCut:
    """A residual block replaced by identity (depth pruning)."""

    module: str
    tuple_output: bool = False  # the stand-in returns ``(x,)``, as the block returned a tuple


@dataclass
class PlanStep:
    """One application (a pruner step, an accepted interactive change, a block removal)."""

    tensors: list[TensorCut]
    attributes: dict[str, dict[str, list[Any]]]  # module -> attr -> [old, new]
    group: list[int] | None = None  # group ids pruned at this step, for people reading it
    title: str | None = None
    head_mode: str | None = None
    blocks: list[BlockCut] = field(default_factory=list)  # schema 2
    # constants the config derives, folded into the weights after this step's cut so the
    # config describes the model (`explorer.prune.fixups.fold`): module -> attr -> [old, new]
    constants: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # schema 3


@dataclass(frozen=True)
class Refit:
    """Tensors a reconstruction refit after the cuts (`explorer.prune.compensate`).

    The plan holds their names and shapes after the cuts, never their values: those are in a
    safetensors file beside the plan (``file``, checked by its ``sha256``;
    `explorer.io.refit`), or in the weights saved with the plan (an export folder, a streamed
    replay's shards: ``file`` None). `Plan.apply` creates the biases the refit added (Linear
    layers that had none), so those weights load.
    """

    tensors: list[list[Any]]  # sorted [name, [shape...]] of every refit tensor, after cuts
    created: list[str] = field(default_factory=list)  # biases the refit added, sorted
    file: str | None = None  # safetensors file name in the plan's folder
    sha256: str | None = None  # of that file

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(shape) for name, shape in self.tensors}


@dataclass(frozen=True)
class Fingerprint:
    """Names and shapes of the original model's tensors; the hash makes a quick check."""

    tensors: list[list[Any]]  # sorted [name, [shape...]]
    sha256: str


@dataclass
class Replay:
    """What `Plan.apply` changed."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # name -> (before, after)
    attributes: dict[str, dict[str, list[Any]]]  # module -> attr -> [value before, after]
    config: Any | None = None  # `explorer.hfconfig.ConfigUpdate` for transformers models
    blocks: dict[str, nn.Module] = field(default_factory=dict)  # removed blocks (for undo)
    # the recorded folds, in order: (tensor, factor, part or None) and one-element buffers
    # set (`explorer.prune.fixups.fold.refold`): a streamed replay multiplies its tensors so
    folds: list[Product] = field(default_factory=list)
    fills: dict[str, float] = field(default_factory=dict)
    constants: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # [old, new]
    # module -> the config object it held before the replay gave it its own copy
    # (``config.<field>`` attributes: `explorer.prune.fixups.configs`), for the undo
    configs: dict[str, Any] = field(default_factory=dict)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def _hash(entries: list[list[Any]]) -> str:
    text = json.dumps(entries, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(shapes: Mapping[str, Sequence[int]]) -> Fingerprint:
    """Fingerprint of ``name -> shape`` (parameters and buffers of a model)."""
    entries = [[name, [int(s) for s in shape]] for name, shape in sorted(shapes.items())]
    return Fingerprint(entries, _hash(entries))


def _original_shapes(model: nn.Module, applied: Sequence[Applied | BlockRemoval]
                     ) -> dict[str, tuple[int, ...]]:
    """Shapes before ``applied`` (undone in reverse); tied names follow their tensor."""
    tensors = _tensors(model)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    aliases: dict[int, list[str]] = {}
    for name, t in tensors.items():
        aliases.setdefault(id(t), []).append(name)
    for app in reversed(applied):
        if isinstance(app, BlockRemoval):  # its tensors left the model with the block
            shapes.update(app.shapes)
            continue
        for name, (before, _after) in app.shapes.items():
            for alias in aliases.get(id(tensors.get(name)), [name]):
                shapes[alias] = tuple(before)
    return shapes


def _created(model: nn.Module, applied: Sequence[Applied | BlockRemoval]
             ) -> dict[str, tuple[int, ...]]:
    """Tensors the applications added (biases a compensation created) that the model still
    has, with their shapes: not the original model's, so not in the fingerprint."""
    tensors = _tensors(model)
    return {name: tuple(tensors[name].shape) for app in applied if isinstance(app, Applied)
            for name, old in app.previous.items() if old is None and name in tensors}


def _step_from_applied(app: Applied | BlockRemoval, head_mode: str | None,
                       group: list[int] | None, title: str | None) -> PlanStep:
    if isinstance(app, BlockRemoval):
        return PlanStep([], {}, None, title or "removed " + ", ".join(app.modules), None,
                        [BlockCut(m, t) for m, t in app.tuple_output.items()])
    cuts = []
    for (name, dim), keep in sorted(app.keeps.items()):
        size = app.shapes[name][0][dim] if name in app.shapes else None
        if size is None:
            raise PlanError(f"applied change keeps indices of '{name}' but does not record "
                            f"its shape; pass the Applied records of apply_removal unchanged")
        kept = [int(i) for i in keep]
        removed = sorted(set(range(size)) - set(kept))
        if kept != sorted(kept):
            raise PlanError(f"applied change reorders '{name}' dim {dim}; plans record "
                            f"removals only (kept indices must stay in order)")
        if removed:
            cuts.append(TensorCut(name, int(dim), int(size), removed))
    constants: dict[str, dict[str, list[float]]] = {}
    for (module, attr), (old, new) in app.constants.items():
        constants.setdefault(module, {})[attr] = [float(old), float(new)]
    return PlanStep(cuts, _jsonable(app.attributes), group, title, head_mode,
                    constants=constants)


def _jsonable(attributes: Mapping[str, Mapping[str, Sequence[Any]]]
              ) -> dict[str, dict[str, list[Any]]]:
    out: dict[str, dict[str, list[Any]]] = {}
    for module, attrs in attributes.items():
        for attr, values in attrs.items():
            vals = [list(v) if isinstance(v, tuple) else v for v in values]
            try:
                json.dumps(vals)
            except TypeError as e:
                raise PlanError(f"attribute {module}.{attr} changed to a value that is not "
                                f"plain JSON ({values!r}); plans hold ints, floats, bools, "
                                f"strings and lists only") from e
            out.setdefault(module, {})[attr] = vals
    return out


@dataclass
class Plan:
    """A replayable pruning: see the module docstring. ``schema`` is the JSON version."""

    model: str  # the spec it was made on, e.g. "timm:vit_tiny_patch16_224?img_size=64"
    input_shapes: list[list[int] | None]  # example input shapes (None: not a tensor)
    fingerprint: Fingerprint
    steps: list[PlanStep] = field(default_factory=list)
    schema: int = SCHEMA
    refit: Refit | None = None  # schema 4: tensors refit after the cuts

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_applied(cls, applied: Sequence[Applied | BlockRemoval], model: nn.Module, spec: str,
                     input_shapes: Sequence[Sequence[int] | None] = (),
                     head_mode: str | None = None,
                     groups: Sequence[list[int] | None] | None = None,
                     titles: Sequence[str | None] | None = None) -> Plan:
        """A plan from `Applied` records, in order, of ``model`` (already pruned by them).

        Args:
            applied: what `explorer.prune.removal.apply_removal` (channel cuts) and
                `explorer.prune.depth.remove_blocks_recorded` (block removals) returned,
                oldest first.
            model: the pruned model; its original shapes are recovered from ``applied``.
            spec: the model spec the plan is replayed from.
            input_shapes: shapes of the example inputs.
            head_mode: the pruner's head mode, recorded for readers.
            groups, titles: optional per-step metadata (same length as ``applied``).
        """
        created = _created(model, applied)
        fp = fingerprint({n: s for n, s in _original_shapes(model, applied).items()
                          if n not in created})
        steps = [_step_from_applied(a, head_mode, groups[i] if groups else None,
                                    titles[i] if titles else None)
                 for i, a in enumerate(applied)]
        shapes = [None if s is None else [int(x) for x in s] for s in input_shapes]
        refit = Refit([[n, list(s)] for n, s in sorted(created.items())], sorted(created)) \
            if created else None
        return cls(spec, shapes, fp, steps, refit=refit)

    @classmethod
    def from_history(cls, history: History, spec: str,
                     input_shapes: Sequence[Sequence[int] | None] = (),
                     head_mode: str | None = None) -> Plan:
        """A plan from a timeline's edits, in order: its cuts and block removals (each cut
        titled by its group when every cut accepted one group).

        Raises:
            ValueError: the timeline replayed a plan (that plan is its record; reload the
                model to make a new one).
        """
        if history.replayed:
            raise ValueError("this session replayed a plan: that plan is its record; reload "
                             "the model to export a new one")
        steps: list[Applied | BlockRemoval] = [
            e.applied if e.kind is EditKind.CUT else e.blocks for e in history.edits]
        cuts = [e for e in history.edits if e.kind is EditKind.CUT]
        named = bool(cuts) and all(len(e.titles) == 1 for e in cuts)
        titles: list[str | None] = [e.titles[0] if named and e.kind is EditKind.CUT else None
                                    for e in history.edits]
        return cls.from_applied(steps, history.model, spec, input_shapes,
                                head_mode=head_mode, titles=titles)

    @classmethod
    def from_pruner(cls, pruner: Any, spec: str,
                    input_shapes: Sequence[Sequence[int] | None] | None = None,
                    reports: Sequence[Any] | None = None) -> Plan:
        """A plan from an `explorer.Pruner` after its steps.

        Args:
            pruner: the pruner; its ``applied`` list is recorded.
            spec: the model spec.
            input_shapes: defaults to the shapes of the pruner's example inputs.
            reports: the `StepReport`s its steps returned, to record group ids and titles.
        """
        if input_shapes is None:
            input_shapes = [list(x.shape) if isinstance(x, torch.Tensor) else None
                            for x in pruner.inputs]
        groups = titles = None
        useful = [r for r in reports or () if r]
        if len(useful) == len(pruner.applied) and useful:
            groups = [[c.group for c in r.changes] for r in useful]
            titles = ["; ".join(dict.fromkeys(c.title for c in r.changes)) for r in useful]
        return cls.from_applied(pruner.applied, pruner.model, spec, input_shapes,
                                head_mode=pruner.heads, groups=groups, titles=titles)

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data, sealed with its ``sha256`` checksum."""
        data = asdict(self)
        if data["refit"] is None:
            del data["refit"]
        else:
            data["schema"] = REFIT_SCHEMA
        for step in data["steps"]:
            if not step["constants"]:
                del step["constants"]  # a plan without folds reads as schema 2
            else:
                data["schema"] = max(data["schema"], FOLD_SCHEMA)
        out = {"schema": data.pop("schema"), **data}
        out["sha256"] = checksum(out)
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as indented JSON (removed-index lists on one line each)."""
        Path(path).write_text(_dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan file. Raises `PlanError` on unreadable JSON or a wrong layout."""
        try:
            size = Path(path).stat().st_size
            if size > MAX_PLAN_BYTES:
                raise PlanError(f"plan file '{path}' is {size:,} bytes, more than a plan can "
                                f"be ({MAX_PLAN_BYTES:,}); is it the right file?")
            raw = Path(path).read_bytes()
        except OSError as e:
            raise PlanError(f"cannot read plan file '{path}': {e.strerror or e}") from e
        return cls.loads(raw, where=f"plan file '{path}'")

    @classmethod
    def loads(cls, text: str | bytes, where: str = "plan") -> Plan:
        """Parse plan JSON text (from an upload, say) with the same checks as `load`."""
        return cls.from_dict(_json(text, where), where=where)

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> Plan:
        """Build a plan from parsed JSON, checking every field."""
        return _parse(data, where)

    # -- replay ---------------------------------------------------------------------------
    def apply(self, model: nn.Module, update_config: bool = True,
              example_inputs: Sequence[Any] | None = None,
              refit: Mapping[str, torch.Tensor] | None = None) -> Replay:
        """Prune ``model`` in place as recorded; all or nothing.

        Everything is checked before the first change: the model's tensors against the
        fingerprint, every tensor, dimension and index of every step, every attribute, and
        every step against the coupling of ``model`` (re-derived by the engine on a
        weightless copy). A failure while committing restores the model exactly.

        Args:
            model: a fresh, unpruned copy of the plan's model (cpu or meta).
            update_config: bring a transformers ``model.config`` in line with the new widths
                (see `explorer.hfconfig`); modules the plan gave their own config copy read
                it again where it now says the same (`explorer.prune.fixups.configs.rejoin`).
            example_inputs: inputs to trace ``model`` with; by default zeros of the plan's
                input shapes (float, or token ids when the model does not take floats).
            refit: the values of the plan's refit tensors (`Refit`; `explorer.io.refit`
                reads them from the plan's file), set after the cuts. Without them the biases
                the refit added are created as zeros (weights loaded next fill them, as
                `explorer.load_pruned` does); a plan whose refit values are in a file needs
                them, except on a ``meta`` model.

        Raises:
            PlanError: the plan does not fit ``model``; the model is unchanged.
        """
        staged = _check(self, model)
        _check_coupling(self, model, example_inputs)
        _check_refit_given(self, model, refit)
        cuts = {b.module: b.tuple_output for step in self.steps for b in step.blocks}
        with transaction(model):
            replay = _commit(model, staged)
            if self.refit is not None:
                _install_refit(self.refit, model, refit)
            if cuts:
                replay.blocks = remove_blocks(model, list(cuts), cuts)
            if any(step.constants for step in self.steps):
                replay.folds, replay.fills, replay.constants = _refold(self, model,
                                                                       example_inputs)
            if update_config and hasattr(model, "config"):
                from ..prune.fixups.hfconfig import update_config as _update
                replay.config = _update(model)
                for name, held in rejoin(model).items():  # the config says it for every layer
                    replay.configs.setdefault(name, held)
        return replay

    def keeps(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, dict[int, torch.Tensor]]:
        """Kept positions per tensor name and dim after every step, checked against ``shapes``.

        Each name is followed on its own (tied names are cut alike by the plan), so this
        needs no model: `explorer.io.stream` cuts checkpoint tensors with it.

        Args:
            shapes: original shape of every tensor the plan may cut (e.g. the fingerprint).

        Raises:
            PlanError: a cut names an unknown tensor or does not fit its shape.
        """
        current = {n: list(s) for n, s in shapes.items()}
        out: dict[str, dict[int, torch.Tensor]] = {}
        for i, step in enumerate(self.steps):
            done: dict[tuple[str, int], list[int]] = {}
            for cut in step.tensors:
                if cut.tensor not in current:
                    raise PlanError(f"step {i}: there is no tensor '{cut.tensor}'")
                if (cut.tensor, cut.dim) in done:  # listed twice, as `_check` allows
                    if done[cut.tensor, cut.dim] != sorted(cut.removed):
                        raise PlanError(f"step {i}: tensor '{cut.tensor}' is cut twice "
                                        f"with different indices")
                    continue
                done[cut.tensor, cut.dim] = sorted(cut.removed)
                keep = _check_cut(cut, current[cut.tensor], f"step {i}")
                dims = out.setdefault(cut.tensor, {})
                dims[cut.dim] = keep if cut.dim not in dims else dims[cut.dim][keep]
                current[cut.tensor][cut.dim] = len(keep)
        return out

    def refit_in_weights(self) -> Plan:
        """This plan as saved beside weights that hold its refit values (an export folder, a
        streamed replay's shards): its `Refit` names no file."""
        if self.refit is None or self.refit.file is None:
            return self
        import dataclasses
        return dataclasses.replace(self, refit=dataclasses.replace(self.refit, file=None,
                                                                   sha256=None))

    @property
    def removed_count(self) -> int:
        return sum(len(c.removed) for s in self.steps for c in s.tensors)


def step_record(applied: Applied, title: str | None = None) -> dict[str, Any] | None:
    """One cut (``applied``) as a plan step's JSON, which `redo_step` cuts again exactly: what
    a saved session keeps per accept, so reopening it replays indices instead of choosing them
    again. None when a step cannot say the cut (it folded constants into weights or created
    tensors; a refit's new values are not in it either, so the caller leaves those out)."""
    if applied.constants or any(t is None for t in applied.previous.values()):
        return None
    try:
        step = _step_from_applied(applied, None, None, title)
    except PlanError:
        return None
    data = asdict(step)
    del data["constants"], data["blocks"]
    return data


def redo_step(model: nn.Module, data: Any, where: str = "recorded cut") -> Applied:
    """Cut ``model`` in place as the step JSON ``data`` (`step_record`) says, all or nothing.

    The step is checked as untrusted data like a plan's (its JSON, every tensor, dim, index
    and attribute against the model as it is) but not re-derived from the model's coupling:
    the caller analyses the result (a saved session's replay traces the model it ends with,
    and a recorded cut that breaks the forward fails there). Returns what changed, as
    `explorer.prune.removal.apply_removal` does, for an exact undo and for plans.

    Raises:
        PlanError: the step is malformed or does not fit the model; nothing is changed.
    """
    step = _parse_step(data, where)
    _need(not step.blocks and not step.constants, where,
          "a recorded cut removes no block and folds no constant")
    tensors = _tensors(model)
    plan = Plan("", [], fingerprint({n: t.shape for n, t in tensors.items()}), [step])
    staged = _check(plan, model)
    previous: dict[str, torch.Tensor | None] = {
        alias: tensors[alias] for name in staged.new for alias in staged.aliases[name]}
    with transaction(model):
        replay = _commit(model, staged)
    keeps: dict[tuple[str, int], list[int]] = {}
    for c in step.tensors:
        dead = set(c.removed)
        keeps[(c.tensor, c.dim)] = [i for i in range(c.size_before) if i not in dead]
    return Applied(replay.shapes, replay.attributes, keeps, previous, configs=replay.configs)


def _dumps(data: dict[str, Any]) -> str:
    """Indented JSON with flat number lists (indices, shapes, [old, new]) on one line."""
    text = json.dumps(data, indent=1)
    text = _FLAT.sub(lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
                     text)
    return _PAIR.sub(r"[\1, \2]", text) + "\n"


_FLAT = re.compile(r"\[([-\d.,\s]*?)\]")  # a list of numbers
_PAIR = re.compile(r'\[\s*("(?:[^"\\]|\\.)*"),\s*(\[[^\[\]]*\])\s*\]')  # ["name", [shape]]


# -- parsing ------------------------------------------------------------------------------
def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise PlanError(f"{where}: {what}; the plan file is malformed (write it with "
                        f"Plan.save, or fix that field)")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_list(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(i) for i in x)


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 plan as schema 2 (its steps remove no blocks)."""
    if data.get("schema") != 1 or not isinstance(data.get("steps"), list):
        return data
    steps = [{**s, "blocks": []} if isinstance(s, dict) else s for s in data["steps"]]
    return {**data, "schema": 2, "steps": steps}


class _HugeInt(ValueError):
    """An integer literal longer than any index or width (raised while parsing)."""


def _parse_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS and len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _HugeInt(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _parse_constant(text: str) -> Any:
    raise _HugeInt(f"the non-JSON number {text}")


def _json(text: str | bytes, where: str) -> Any:
    """Parse plan JSON with limits: UTF-8, size, nesting depth, integer length."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PlanError(f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); a plan "
                            f"is JSON written by Plan.save") from None
    if len(text) > MAX_PLAN_BYTES:
        raise PlanError(f"{where} is longer than a plan can be ({MAX_PLAN_BYTES:,} bytes)")
    try:
        data = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
    except json.JSONDecodeError as e:
        raise PlanError(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column "
                        f"{e.colno}; write it with Plan.save or fix the file") from None
    except _HugeInt as e:
        raise PlanError(f"{where} holds {e}; plans hold indices and widths of at most "
                        f"{_MAX_INT_DIGITS} digits") from None
    except RecursionError:
        raise PlanError(f"{where} nests JSON deeper than Python can parse; a plan nests "
                        f"{_MAX_DEPTH} levels at most") from None
    return data  # `_parse` checks the depth


def _check_depth(data: Any, where: str) -> None:
    if not isinstance(data, (dict, list)):
        return
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise PlanError(f"{where} nests JSON {depth} levels deep; a plan nests "
                            f"{_MAX_DEPTH} levels at most")
        items = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))


def checksum(data: Mapping[str, Any]) -> str:
    """sha256 of a plan's JSON data (every field but ``sha256`` itself, keys sorted)."""
    body = {k: v for k, v in data.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _parse(data: Any, where: str) -> Plan:
    _check_depth(data, where)
    _need(isinstance(data, dict), where, "the top level must be a JSON object")
    version = data.get("schema")
    if not _is_int(version) or version not in (1, SCHEMA, FOLD_SCHEMA, REFIT_SCHEMA):
        raise PlanError(f"{where}: plan schema version {version!r} is not supported; this "
                        f"Pruning Explorer reads schema {SCHEMA} (and {FOLD_SCHEMA}, with "
                        f"folded constants, {REFIT_SCHEMA}, with refit tensors). Re-create the "
                        f"plan with "
                        f"this version (python -m explorer prune ... --plan FILE)")
    for key in ("model", "input_shapes", "fingerprint", "steps", "sha256"):
        _need(key in data, where, f"missing field '{key}'")
    unknown = sorted(set(data) - {"schema", "model", "input_shapes", "fingerprint", "steps",
                                  "sha256", "refit"})
    _need(not unknown, where, f"unknown field '{unknown[0]}'" if unknown else "")
    _need(data["sha256"] == checksum(data), where,
          "the plan's sha256 does not match its content (was the file edited or cut short?)")
    data = _migrate(data)  # after the checksum, which covers the file as it was written
    _need(isinstance(data["model"], str), where, "'model' must be a spec string")
    shapes = data["input_shapes"]
    _need(isinstance(shapes, list) and all(s is None or _int_list(s) for s in shapes), where,
          "'input_shapes' must be a list of integer lists")
    fp = data["fingerprint"]
    _need(isinstance(fp, dict) and isinstance(fp.get("tensors"), list)
          and isinstance(fp.get("sha256"), str), where,
          "'fingerprint' must hold 'tensors' and 'sha256'")
    for i, entry in enumerate(fp["tensors"]):
        _need(isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
              and _int_list(entry[1]), where, f"fingerprint.tensors[{i}] must be [name, shape]")
    _need(_hash(fp["tensors"]) == fp["sha256"], where,
          "the fingerprint's sha256 does not match its tensor list (was the file edited?)")
    _need(isinstance(data["steps"], list), where, "'steps' must be a list")
    steps = [_parse_step(s, f"{where}: steps[{i}]") for i, s in enumerate(data["steps"])]
    _need(version >= FOLD_SCHEMA or not any(s.constants for s in steps), where,
          f"steps fold constants, which needs schema {FOLD_SCHEMA}")
    refit = _parse_refit(data["refit"], f"{where}: refit") if "refit" in data else None
    _need(version == REFIT_SCHEMA or refit is None, where,
          f"'refit' needs schema {REFIT_SCHEMA}")
    return Plan(data["model"], shapes, Fingerprint(fp["tensors"], fp["sha256"]), steps,
                schema=SCHEMA, refit=refit)


def _parse_refit(r: Any, where: str) -> Refit:
    _need(isinstance(r, dict), where, "must be an object")
    unknown = sorted(set(r) - {"tensors", "created", "file", "sha256"})
    _need(not unknown, where, f"unknown field '{unknown[0]}'" if unknown else "")
    tensors = r.get("tensors")
    _need(isinstance(tensors, list) and bool(tensors) and all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and e[0]
        and _int_list(e[1]) and all(x > 0 for x in e[1]) for e in tensors), where,
        "'tensors' must be a non-empty list of [name, shape]")
    names = [e[0] for e in tensors]
    _need(names == sorted(set(names)), where, "'tensors' must name each tensor once, sorted")
    created = r.get("created", [])
    _need(isinstance(created, list) and all(isinstance(n, str) and n in names
                                            and n.endswith(".bias") for n in created)
          and created == sorted(set(created)), where,
          "'created' must list biases named in 'tensors', sorted")
    file, digest = r.get("file"), r.get("sha256")
    _need(file is None or (isinstance(file, str) and file.endswith(".safetensors")), where,
          "'file' must name a .safetensors file")
    _need((file is None) == (digest is None) and (digest is None or (
        isinstance(digest, str) and _HEX64.fullmatch(digest) is not None)), where,
          "'sha256' must be the 64 hex digits of 'file' (both or neither)")
    return Refit([[n, list(s)] for n, s in tensors], list(created), file, digest)


def _check_refit_given(plan: Plan, model: nn.Module,
                       values: Mapping[str, torch.Tensor] | None) -> None:
    """The refit values are there when the plan needs them, with the recorded shapes."""
    r = plan.refit
    if r is None:
        if values:
            raise PlanError("refit values were given, but the plan records no refit tensors")
        return
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    if values is None:
        if r.file is not None and not on_meta:
            raise PlanError(f"the plan's {len(r.tensors)} refit tensor(s) are in '{r.file}' "
                            f"beside it; read them with explorer.io.refit.read_refit(plan "
                            f"file) and pass refit= (the CLI's replay does)")
        return
    for name, shape in r.shapes().items():
        got = values.get(name)
        if got is None:
            raise PlanError(f"the refit values lack '{name}', which the plan refits")
        if tuple(got.shape) != shape:
            raise PlanError(f"refit tensor '{name}' has shape {tuple(got.shape)}, the plan "
                            f"records {shape}")
    extra = sorted(set(values) - set(r.shapes()))
    if extra:
        raise PlanError(f"refit tensor '{extra[0]}' is not one the plan refits")


def _install_refit(r: Refit, model: nn.Module,
                   values: Mapping[str, torch.Tensor] | None) -> None:
    """Create the biases the refit added and set the refit values (inside the caller's
    transaction: a failure puts the model back)."""
    tensors = _tensors(model)
    for name, shape in r.shapes().items():
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            raise PlanError(f"the plan refits '{name}', but the model has no module "
                            f"'{owner_name}'") from None
        if name in r.created:
            weight = getattr(owner, "weight", None)
            if not isinstance(owner, nn.Linear) or owner.bias is not None or \
                    not isinstance(weight, torch.Tensor) or shape != (weight.shape[0],):
                raise PlanError(f"the plan adds bias '{name}' of shape {shape}, which fits no "
                                f"Linear layer without a bias there")
            owner.bias = nn.Parameter(torch.zeros(shape, dtype=weight.dtype,
                                                  device=weight.device),
                                      requires_grad=weight.requires_grad)
            tensors[name] = owner.bias
        current = tensors.get(name)
        if current is None or tuple(current.shape) != shape:
            found = "none" if current is None else f"shape {tuple(current.shape)}"
            raise PlanError(f"the plan refits '{name}' with shape {shape}; after the cuts the "
                            f"model has {found}")
        if values is not None:  # a new tensor: never written into one the caller shares
            value = values[name].detach().to(current.dtype, copy=True).to(current.device)
            set_tensor(model, name, nn.Parameter(value, requires_grad=current.requires_grad)
                       if isinstance(current, nn.Parameter) else value)


def _parse_step(s: Any, where: str) -> PlanStep:
    _need(isinstance(s, dict), where, "a step must be an object")
    _need(isinstance(s.get("tensors"), list), where, "missing list 'tensors'")
    _need(isinstance(s.get("attributes", {}), dict), where, "'attributes' must be an object")
    cuts = []
    for j, c in enumerate(s["tensors"]):
        w = f"{where}.tensors[{j}]"
        _need(isinstance(c, dict), w, "must be an object")
        _need(isinstance(c.get("tensor"), str), w, "'tensor' must be a name")
        for key in ("dim", "size_before"):
            _need(_is_int(c.get(key)), w, f"'{key}' must be an integer")
        _need(_int_list(c.get("removed")), w, "'removed' must be a list of integers")
        _need(c["removed"] == sorted(set(c["removed"])), w,
              "'removed' must list distinct indices in ascending order")
        cuts.append(TensorCut(c["tensor"], c["dim"], c["size_before"], list(c["removed"])))
    attrs = s.get("attributes", {})
    for module, changes in attrs.items():
        _need(isinstance(changes, dict), where, f"attributes of '{module}' must be an object")
        for attr, pair in changes.items():
            _need(isinstance(pair, list) and len(pair) == 2, where,
                  f"attribute {module}.{attr} must be [old, new]")
            problem = check_attribute(attr, pair[0], pair[1])
            _need(not problem, where, f"attribute {module}.{attr}: {problem}")
    group = s.get("group")
    _need(group is None or _int_list(group), where, "'group' must be a list of ids")
    for key in ("title", "head_mode"):
        _need(s.get(key) is None or isinstance(s[key], str), where, f"'{key}' must be text")
    blocks = s.get("blocks", [])
    _need(isinstance(blocks, list) and all(
        isinstance(b, dict) and isinstance(b.get("module"), str) and b["module"]
        and isinstance(b.get("tuple_output", False), bool) for b in blocks), where,
        "'blocks' must be a list of {module, tuple_output}")
    constants = s.get("constants", {})
    _need(isinstance(constants, dict) and all(
        isinstance(attrs, dict) and all(
            isinstance(a, str) and a.isidentifier() and not a.startswith("_") and
            isinstance(pair, list) and len(pair) == 2 and
            all(isinstance(v, float) and 0 < v < 1e6 for v in pair)
            for a, pair in attrs.items()) for attrs in constants.values()), where,
        "'constants' must map module -> attribute -> [old, new] positive reals")
    return PlanStep(cuts, attrs, group, s.get("title"), s.get("head_mode"),
                    [BlockCut(b["module"], b.get("tuple_output", False)) for b in blocks],
                    constants)


# -- replay mechanics: check everything, then commit --------------------------------------
@dataclass
class _Staged:
    """Everything `_commit` needs, computed without touching the model."""

    new: dict[str, torch.Tensor]  # canonical tensor name -> sliced copy
    aliases: dict[str, list[str]]  # canonical name -> every name of that tensor (ties)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    attributes: dict[tuple[str, str], list[Any]]  # (module, attr) -> [current, new]


def _norm(value: Any) -> Any:
    """Compare attribute values as JSON would hold them (tuples as lists)."""
    if isinstance(value, (tuple, list, torch.Size)):
        return [_norm(v) for v in value]
    return value


def _check_fingerprint(plan: Plan, tensors: Mapping[str, torch.Tensor]) -> None:
    mine = fingerprint({n: t.shape for n, t in tensors.items()})
    if mine.sha256 == plan.fingerprint.sha256:
        return
    theirs = {name: tuple(shape) for name, shape in plan.fingerprint.tensors}
    ours = {name: tuple(shape) for name, shape in mine.tensors}
    hint = (f"; the plan was made for another model (or this one is already pruned): "
            f"replay it on a fresh, unpruned '{plan.model}'")
    for name in sorted(set(theirs) | set(ours)):
        kind = "buffer" if name in ours and not isinstance(tensors[name], nn.Parameter) \
            else "parameter"
        if name not in ours:
            raise PlanError(f"the model has no tensor '{name}', which the plan's model "
                            f"'{plan.model}' had{hint}")
        if name not in theirs:
            raise PlanError(f"the model has {kind} '{name}', which the plan's model "
                            f"'{plan.model}' did not{hint}")
        if ours[name] != theirs[name]:
            raise PlanError(f"{kind} '{name}' has shape {ours[name]} in the model but "
                            f"{theirs[name]} in the plan's model '{plan.model}'{hint}")
    raise PlanError("the model's fingerprint differs from the plan's")  # unreachable


def _check_cut(cut: TensorCut, shape: list[int], where: str) -> torch.Tensor:
    """Validate one cut against the current shape; returns the kept positions."""
    if not 0 <= cut.dim < len(shape):
        raise PlanError(f"{where}: tensor '{cut.tensor}' has {len(shape)} dims, the plan "
                        f"cuts dim {cut.dim}")
    size = shape[cut.dim]
    if size != cut.size_before:
        raise PlanError(f"{where}: tensor '{cut.tensor}' dim {cut.dim} has size {size} at "
                        f"this step, the plan expects {cut.size_before}")
    bad = [i for i in cut.removed if not 0 <= i < size]
    if bad:
        raise PlanError(f"{where}: index {bad[0]} is out of range for tensor "
                        f"'{cut.tensor}' dim {cut.dim} of size {size}")
    if len(set(cut.removed)) != len(cut.removed):
        raise PlanError(f"{where}: tensor '{cut.tensor}' dim {cut.dim} lists an index twice")
    if len(cut.removed) >= size:
        raise PlanError(f"{where}: the plan removes all {size} indices of tensor "
                        f"'{cut.tensor}' dim {cut.dim}; at least one must stay")
    dead = set(cut.removed)
    return torch.tensor([i for i in range(size) if i not in dead], dtype=torch.long)


def _check_attributes(plan: Plan, model: nn.Module) -> dict[tuple[str, str], list[Any]]:
    out: dict[tuple[str, str], list[Any]] = {}
    for i, step in enumerate(plan.steps):
        for mod_name, attrs in step.attributes.items():
            try:
                module = model.get_submodule(mod_name)
            except AttributeError as e:
                raise PlanError(f"step {i}: the model has no module '{mod_name}' whose "
                                f"attributes the plan sets") from e
            for attr, (old, new) in attrs.items():
                key = (mod_name, attr)
                if key not in out:
                    if read(module, attr, _ABSENT) is _ABSENT:
                        raise PlanError(f"step {i}: module '{mod_name}' has no attribute "
                                        f"'{attr}' (the plan changes it from {_short(old)})")
                    cur = read(module, attr)
                    if _norm(cur) != _norm(old):
                        raise PlanError(f"step {i}: {mod_name}.{attr} is {_short(cur)} in "
                                        f"the model, the plan expects {_short(old)}")
                    out[key] = [cur, new]
                else:
                    if _norm(out[key][1]) != _norm(old):
                        raise PlanError(f"step {i}: {mod_name}.{attr} is {_short(out[key][1])}"
                                        f" after the steps before, the plan expects "
                                        f"{_short(old)}")
                    out[key][1] = new
    return out


_ABSENT = object()


def _check_blocks(plan: Plan, model: nn.Module) -> None:
    for i, step in enumerate(plan.steps):
        for b in step.blocks:
            try:
                model.get_submodule(b.module)
            except AttributeError:
                raise PlanError(f"step {i}: the model has no module '{b.module}' to remove; "
                                f"is this plan for another model?") from None


def _short(value: Any) -> str:
    """A value for a one-line message (a tensor by its shape, long text cut)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(plan: Plan, model: nn.Module) -> _Staged:
    tensors = _tensors(model)
    _check_fingerprint(plan, tensors)
    _check_blocks(plan, model)
    canon: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    first_of: dict[int, str] = {}
    for name, t in tensors.items():
        c = first_of.setdefault(id(t), name)
        canon[name] = c
        aliases.setdefault(c, []).append(name)
    shapes = {n: list(tensors[n].shape) for n in aliases}
    keeps: dict[tuple[str, int], torch.Tensor] = {}
    for i, step in enumerate(plan.steps):
        seen: dict[tuple[str, int], list[int]] = {}
        for cut in step.tensors:
            where = f"step {i}"
            if cut.tensor not in canon:
                raise PlanError(f"{where}: the model has no parameter or buffer "
                                f"'{cut.tensor}'")
            key = (canon[cut.tensor], cut.dim)
            if key in seen:  # the same tied tensor under two names
                if seen[key] != sorted(cut.removed):
                    raise PlanError(f"{where}: tied tensor '{cut.tensor}' is cut twice "
                                    f"with different indices")
                continue
            seen[key] = sorted(cut.removed)
            keep = _check_cut(cut, shapes[key[0]], where)
            base = keeps.get(key)
            keeps[key] = keep if base is None else base[keep]
            shapes[key[0]][cut.dim] = len(keep)
    new: dict[str, torch.Tensor] = {}
    per_tensor: dict[str, dict[int, torch.Tensor]] = {}
    for (name, dim), idx in keeps.items():
        per_tensor.setdefault(name, {})[dim] = idx
    for name, picks in list(per_tensor.items()):  # as `removal._shadow_buffers` cuts them
        owner, _, attr = name.rpartition(".")
        shadow = f"{owner}.original_{attr}" if owner else f"original_{attr}"
        if shadow in tensors and shadow not in per_tensor and \
                tensors[shadow].shape == tensors[name].shape:
            per_tensor[shadow] = picks
            aliases.setdefault(shadow, [shadow])
    out_shapes = {}
    for name, picks in per_tensor.items():
        new[name] = resize_tensor(tensors[name], picks)
        out_shapes[name] = (tuple(tensors[name].shape), tuple(new[name].shape))
    attributes = {(mod, attr): pair for (mod, attr), pair in _check_attributes(plan, model).items()
                  if not describes_only(model.get_submodule(mod), attr)}  # checked, not set
    return _Staged(new, aliases, out_shapes, attributes)


def _commit(model: nn.Module, staged: _Staged) -> Replay:
    """Swap in the sliced tensors (ties kept) and set the recorded attributes."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for name, tensor in staged.new.items():
        owner_name, _, attr = name.rpartition(".")
        old = getattr(model.get_submodule(owner_name), attr)
        value: torch.Tensor = (nn.Parameter(tensor, requires_grad=old.requires_grad)
                               if isinstance(old, nn.Parameter) else tensor)
        for alias in staged.aliases[name]:
            set_tensor(model, alias, value)
            shapes[alias] = staged.shapes[name]
    attributes: dict[str, dict[str, list[Any]]] = {}
    configs: dict[str, Any] = {}
    for (mod_name, attr), (cur, new) in staged.attributes.items():
        module = model.get_submodule(mod_name)
        attr_value = tuple(new) if isinstance(cur, tuple) and isinstance(new, list) else new
        config = config_field(attr)
        if config is None:
            setattr(module, attr, attr_value)
        else:  # a count its forward reads through the shared config: its own copy
            own(module, mod_name, {config: attr_value}, configs)
        attributes.setdefault(mod_name, {})[attr] = [cur, attr_value]
    return Replay(shapes, attributes, configs=configs)


def _refold(plan: Plan, model: nn.Module, example_inputs: Sequence[Any] | None
            ) -> tuple[list[Product], dict[str, float], dict[tuple[str, str], list[float]]]:
    """Fold the plan's recorded constants into ``model`` (all cuts applied), as the pruner
    folded them after each step (`explorer.prune.fixups.fold.refold`). Each constant must
    scale a value linear in weights, which absorb its ratio: the function is kept whatever
    the values."""
    steps = [{(m, a): (pair[0], pair[1]) for m, attrs in step.constants.items()
              for a, pair in attrs.items()} for step in plan.steps]
    work = meta_copy(model)
    graph, error = None, None
    for inputs in _meta_inputs(plan, example_inputs):
        try:
            graph = trace(work, inputs)
            break
        except TraceError as e:
            error = e
    if graph is None:
        raise PlanError(f"cannot trace the pruned model to fold the plan's constants "
                        f"({str(error).splitlines()[0]}); pass example_inputs=")
    found = refold(work, graph, [s for s in steps if s])
    if isinstance(found, str):
        raise PlanError(f"the plan folds constants into weights, but {found}; re-create the "
                        f"plan")
    products, fills = found
    tensors: dict[str, torch.Tensor] = {**dict(model.named_parameters(remove_duplicate=False)),
                                        **dict(model.named_buffers(remove_duplicate=False))}
    new: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, factor, part in products:
            if name not in new:
                new[name] = tensors[name].detach().clone()
            scale_tensor(new[name], factor, part)
        for name, value in fills.items():
            new[name] = torch.full_like(tensors[name], value)
    for name, tensor in new.items():
        old = tensors[name]
        swapped: torch.Tensor = nn.Parameter(tensor, requires_grad=old.requires_grad) \
            if isinstance(old, nn.Parameter) else tensor
        for alias, t in tensors.items():
            if t is old:
                set_tensor(model, alias, swapped)
    changed: dict[tuple[str, str], list[float]] = {}
    for step in steps:
        for key, (first, last) in step.items():
            changed.setdefault(key, [first, last])[1] = last
    for (mod, attr), (_first, last) in changed.items():
        setattr(model.get_submodule(mod), attr, last)
    return products, fills, changed


# -- every step against the coupling: the engine re-derives it on a weightless copy ------
def _check_coupling(plan: Plan, model: nn.Module, example_inputs: Sequence[Any] | None) -> None:
    """Replay ``plan`` with the engine on a meta copy of ``model``; its cuts must be whole
    coupled channels/heads of each step's coupling, its attributes exactly the engine's."""
    if not plan.steps:
        return
    work = meta_copy(model)
    candidates = _meta_inputs(plan, example_inputs)
    for i, step in enumerate(plan.steps):
        if step.blocks:  # depth pruning: the next steps see the model without the blocks
            cuts = {b.module: b.tuple_output for b in step.blocks}
            remove_blocks(work, list(cuts), cuts)
            if not step.tensors:
                continue
        coupling, candidates = _coupling(work, candidates, i)
        removal = _removal_of(step, coupling, i)
        try:
            applied = apply_removal(work, coupling, removal)
        except PruneError as e:
            raise PlanError(f"step {i}: {e}") from None
        _compare(step, applied, i, work)


def _meta_inputs(plan: Plan, example_inputs: Sequence[Any] | None) -> list[tuple[Any, ...]]:
    """Input tuples to try, on meta: the caller's, or zeros of the plan's shapes (float,
    then token ids)."""
    if example_inputs is not None:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) \
            else (example_inputs,)
        return [tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)]
    shapes = [s for s in plan.input_shapes if s is not None]
    _need(bool(shapes), "plan", "'input_shapes' holds no tensor shape to trace the model with")
    return [tuple(torch.zeros(s, dtype=dtype, device="meta") for s in shapes)
            for dtype in (torch.float32, torch.long)]


_CACHE_SIZE = 4  # couplings of unpruned models kept for repeated replays (app, tests)
_COUPLINGS: OrderedDict[tuple[Any, ...], Coupling] = OrderedDict()


def _structure_key(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a trace depends on besides code: module types, scalar attributes and configs,
    tensor names, shapes and dtypes, input shapes and dtypes."""
    parts: list[Any] = []
    for name, module in model.named_modules():
        scalars = sorted((k, repr(v)) for k, v in vars(module).items()
                         if isinstance(v, (int, float, str, bool, tuple, type(None))))
        config: Any = getattr(module, "config", None)
        parts.append((name, id(type(module)), tuple(scalars),
                      config.to_json_string() if hasattr(config, "to_json_string") else None))
    for name, t in _tensors(model).items():
        parts.append((name, tuple(t.shape), str(t.dtype)))
    parts.extend((tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else repr(a)
                 for a in inputs)
    return tuple(parts)


def _coupling(work: nn.Module, candidates: list[tuple[Any, ...]], step: int
              ) -> tuple[Coupling, list[tuple[Any, ...]]]:
    """The coupling of ``work`` as it is now, from the first inputs that trace (the
    coupling of an unpruned model comes from a small cache when it was traced before)."""
    error: Exception | None = None
    for k, inputs in enumerate(candidates):  # (a weightless MoE is traced in bf16 by trace)
        key = _structure_key(work, inputs) if step == 0 else None
        if key is not None and key in _COUPLINGS:
            _COUPLINGS.move_to_end(key)
            return _COUPLINGS[key], candidates[k:k + 1]
        try:
            coupling = Coupling(trace(work, inputs))
        except TraceError as e:
            error = e
            continue
        if key is not None:
            _COUPLINGS[key] = coupling
            while len(_COUPLINGS) > _CACHE_SIZE:
                _COUPLINGS.popitem(last=False)
        return coupling, candidates[k:k + 1]
    raise PlanError(f"step {step}: cannot trace the model to check the plan against its "
                    f"coupling ({str(error).splitlines()[0]}); pass example_inputs=")


def _removal_of(step: PlanStep, coupling: Coupling, i: int) -> Removal:
    """The group/axis indices whose removal cuts exactly what ``step`` cuts."""
    cuts = {(c.tensor, c.dim): set(c.removed) for c in step.tensors}
    members = {(m.param, m.dim): atoms for m, atoms in coupling.member_atoms()}
    for key in cuts:
        if key not in members:
            raise PlanError(f"step {i}: tensor '{key[0]}' dim {key[1]} is in no coupled "
                            f"group of the model, the plan cuts it")
    size = coupling.res.num_classes + 1
    alive = np.zeros(size, dtype=bool)
    hit = np.zeros(size, dtype=bool)
    for key, atoms in members.items():
        gone = np.zeros(atoms.shape[0], dtype=bool)
        gone[[j for j in cuts.get(key, ()) if 0 <= j < atoms.shape[0]]] = True
        hit[atoms[gone][atoms[gone] >= 0]] = True
        alive[atoms[~gone][atoms[~gone] >= 0]] = True
    dead = hit & ~alive
    removal = Removal()
    for group in coupling.groups:
        for k, axis in enumerate(group.axes):
            picks = np.nonzero(dead[coupling.family_atoms[axis.family]])[0]
            if len(picks):
                removal.add(group.id, k, [int(j) for j in picks])
    try:
        got = np.zeros(size, dtype=bool)
        got[removed_atoms(coupling, removal)] = True
    except PruneError as e:
        raise PlanError(f"step {i}: {e}") from None
    if not np.array_equal(got, dead) or (not dead.any() and any(cuts.values())):
        raise PlanError(f"step {i}: the plan's cuts are not whole coupled channels or heads "
                        f"of the model (a member's cut is missing, shifted or of another "
                        f"size); re-create the plan")
    return removal


def _compare(step: PlanStep, applied: Applied, i: int, work: nn.Module) -> None:
    """The engine's cuts and attributes for this step must be the plan's. One exception: a
    width the plan records and the engine no longer sets because no code of its module reads
    it (`explorer.prune.fixups.widths.describes_only`; plans made before that rule set
    ``LlamaDecoderLayer.hidden_size`` on head cuts) is accepted, and the replay skips it."""
    ours = {(c.tensor, c.dim): c.removed for c in step.tensors}
    engine = {}
    for (name, dim), keep in applied.keeps.items():
        size = applied.shapes[name][0][dim]
        engine[(name, dim)] = sorted(set(range(size)) - {int(k) for k in keep})
    for key in sorted(set(ours) | set(engine)):
        if ours.get(key) != engine.get(key):
            raise PlanError(f"step {i}: the coupled channels this step removes cut tensor "
                            f"'{key[0]}' dim {key[1]} at {_short(engine.get(key, []))}, the "
                            f"plan at {_short(ours.get(key, []))}; re-create the plan")
    derived = _jsonable(applied.attributes)
    keys = {(m, a) for m, attrs in step.attributes.items() for a in attrs} | \
        {(m, a) for m, attrs in derived.items() for a in attrs}
    for mod, attr in sorted(keys):
        want = derived.get(mod, {}).get(attr)
        got = step.attributes.get(mod, {}).get(attr)
        if want is None and got is not None and describes_only(work.get_submodule(mod), attr):
            continue
        if _norm(want) != _norm(got):
            raise PlanError(f"step {i}: this step sets {mod}.{attr} to "
                            f"{_short(None if want is None else want[1])}, the plan to "
                            f"{_short(None if got is None else got[1])}; re-create the plan")
