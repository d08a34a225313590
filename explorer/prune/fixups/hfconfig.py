"""Bring a pruned transformers model's ``config`` in line with its new widths.

Attention and MLP modules of transformers models read their widths from the config when
they are built. After pruning, the modules hold the new widths (patched attributes and
resized weights) but ``model.config`` still describes the old model, so ``save_pretrained``
would write a folder that ``from_pretrained`` cannot load.

No table of architectures: each integer config field is tied to what it describes by
building the architecture on ``meta`` twice, once from the config and once with the field
doubled. A tensor dim or module attribute that doubles with it (``q_proj.weight`` dim 0 with
``num_attention_heads`` when ``head_dim`` is fixed, ``fc1.weight`` dim 0 with ``ffn_dim``,
``experts.gate_up_proj`` dim 1 with ``intermediate_size``) reads the field's new value off
the pruned model. Every reading votes; the best-voted values are checked by building the
architecture from the new config: it must have exactly the pruned model's tensor shapes and
module attributes, and rotary frequencies recomputed from it must equal the pruned ones.
``ok`` says whether ``from_pretrained`` on a saved folder rebuilds this model exactly.
"""
from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ...graph.collector import paused
from .reads import assignment, reads_attribute

__all__ = ["ConfigUpdate", "cannot_describe", "differing_constants", "real_rotary",
           "update_config"]

Key = tuple[str, ...]  # ("t", tensor, dim) or ("a", module, attr) or ("a", module, attr, i)
Slot = tuple[str, int]  # config field and list index (-1: the field is one integer)
_Values = tuple[tuple[Slot, int | None], ...]  # a set of slot values, as a dict key
_PROBE = 8  # the value a None field is probed with (and twice it)
_MAX_BUILDS = 120  # meta builds per update, at most, while searching for the config
# Config fields that never follow a pruned width (probing them only costs builds).
_NOT_WIDTHS = ("vocab", "token_id", "position", "layers", "n_layer", "num_labels", "seed",
               "image_size", "patch_size", "num_channels", "bucket", "max_", "window",
               "n_positions", "n_ctx", "experts_per_tok", "num_local_experts", "depths",
               "stride", "kernel", "out_indices")

# Fields many transformers models read as ``getattr(config, "head_dim", hidden // heads)``
# although their config class does not define them (Qwen2, Granite, OLMo, Cohere): probed
# like a field left None, so a cut of whole heads that keeps the head width (which the
# default would recompute from the kept heads) is still described by a config.
_IMPLICIT = ("head_dim",)


@dataclass
class ConfigUpdate:
    """What `update_config` did."""

    changed: dict[str, list[Any]] = field(default_factory=dict)  # config key -> [old, new]
    ok: bool = False  # a save_pretrained folder of the model reloads it exactly
    reason: str = ""  # why not, when ``ok`` is False


def cannot_describe(reason: str) -> str:
    """The one wording of why no transformers config describes a pruned model (a step's
    note, the hf export's fall-back, the app), so a run's notes can say it once."""
    return f"the transformers config cannot describe the pruned model: {reason}"


@dataclass
class _Reading:
    """One observable that follows a config field: the value it gives for the field."""

    value: int
    where: str  # the module it was read from (for messages)
    weight: int = 1  # votes it carries


def update_config(model: nn.Module) -> ConfigUpdate:
    """Write the pruned widths into ``model.config`` when one config describes them.

    Returns which config keys changed, and ``ok``/``reason``: whether a ``save_pretrained``
    folder of the model reloads it exactly. The config is left as it was when the widths
    differ between layers or no config can describe the pruned shapes.
    """
    with paused():  # the meta builds are garbage once read: see `explorer.prune.collector`
        return _update_config(model)


def _update_config(model: nn.Module) -> ConfigUpdate:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return ConfigUpdate(reason="not a transformers model (it has no config object)")
    base = _build(model, config)
    if isinstance(base, str):
        return ConfigUpdate(reason=base)
    shape_problem, problem = _mismatch(model, config, base)
    if not shape_problem:  # the config already fits the shapes
        problem = _refusal(config) or _follow_descriptive(model, config, base, problem)
        return ConfigUpdate(ok=not problem, reason=problem)
    ours = _observe(model)
    doubled = _doublings(model, config, _observe(base))
    readings, candidates = _readings(model, config, base, ours)
    values, fresh = _search(model, config, ours, readings, candidates)
    if isinstance(fresh, str) or _mismatch(model, _with(config, values), fresh)[0]:
        again = _implicit_search(model, config, base, ours)
        if again is not None:
            values, fresh, readings, doubled = again
    candidate = _with(config, values)
    if not isinstance(fresh, str):
        _explain_constants(model, candidate, fresh, doubled)
        shape_problem, found = _mismatch(model, candidate, fresh)
        refused = _refusal(candidate)
        if not shape_problem and refused:
            return ConfigUpdate(reason=refused)  # the config is left as it was
        if not shape_problem:
            found = _follow_descriptive(model, candidate, fresh, found, base)
            changed = {f: [getattr(config, f, None), getattr(candidate, f, None)]
                       for f in dict.fromkeys(n for n, _ in values)
                       if getattr(config, f, None) != getattr(candidate, f, None)}
            for f, (_, new) in changed.items():
                setattr(config, f, new)
            return ConfigUpdate(changed, ok=not found, reason=found)
    return ConfigUpdate(reason=_disagreement(model, readings) or
                        _unsized(model, config, base, doubled) or
                        f"no config of {type(config).__name__} describes the pruned model: "
                        f"{problem}")


def differing_constants(model: nn.Module) -> dict[tuple[str, str], float] | None:
    """Real-valued module attributes (``scaling``) whose value in a build of ``model.config``
    differs from the pruned model's: ``(module, attr) -> the config's value``. None when the
    config does not build the model's tensor shapes, or it differs in anything else."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    fresh = _build(model, config)
    if isinstance(fresh, str) or _mismatch(model, config, fresh)[0]:
        return None
    fresh_modules = dict(fresh.named_modules())
    out: dict[tuple[str, str], float] = {}
    for name, module in model.named_modules():
        other = fresh_modules.get(name)
        for attr, value in vars(module).items():
            if other is None or attr.startswith("_") or attr in _SHAPE_ATTRS or \
                    not isinstance(value, (int, float, bool, tuple)):
                continue
            theirs = getattr(other, attr, value)
            if theirs == value:
                continue
            if not (isinstance(value, float) and isinstance(theirs, float) and theirs > 0):
                return None
            out[(name, attr)] = theirs
    return out


# Weight initialisers a build calls (as `torch.nn.init` functions or tensor methods).
_INITS = frozenset(id(f) for f in (
    *(getattr(torch.nn.init, n) for n in (
        "constant_", "dirac_", "eye_", "kaiming_normal_", "kaiming_uniform_", "normal_",
        "ones_", "orthogonal_", "sparse_", "trunc_normal_", "uniform_", "xavier_normal_",
        "xavier_uniform_", "zeros_") if hasattr(torch.nn.init, n)),
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_))


class _NoInit(TorchFunctionMode):
    """Skips weight initialisers on meta tensors, in this thread only, while a build runs.

    A meta tensor holds no values, so filling one changes nothing a build is read for (tensor
    shapes and module attributes); the calls only cost time (about 40 % of a 7B-shape
    build, and an update makes up to `_MAX_BUILDS` of them).
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if id(func) in _INITS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _build(model: nn.Module, config: Any) -> nn.Module | str:
    """``type(model)(config)`` on meta, or why it cannot be built."""
    if config is None:
        return "the config refuses the value"
    try:
        with torch.device("meta"), _NoInit():
            return type(model)(config)
    except Exception as e:  # noqa: BLE001 - any build error means "config cannot say this"
        return (f"building {type(model).__name__} from the config raised "
                f"{type(e).__name__}: {e}")


def _observe(model: nn.Module) -> dict[Key, float]:
    """Tensor dims and numeric module attributes: what a config decides about a model."""
    obs: dict[Key, float] = {}
    tensors = dict(model.state_dict(keep_vars=True))
    tensors.update(dict(model.named_buffers()))
    for name, t in tensors.items():
        for d, n in enumerate(t.shape):
            obs[("t", name, str(d))] = int(n)
    for mname, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr.startswith("_") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                obs[("a", mname, attr)] = value
            elif isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool)
                                                  for v in value):
                for i, v in enumerate(value):
                    obs[("a", mname, attr, str(i))] = v
    return obs


def _implicit_search(model: nn.Module, config: Any, base: nn.Module, ours: dict[Key, float]
                     ) -> tuple[dict[Slot, int | None], nn.Module,
                                dict[Slot, list[_Reading]], dict[Slot, Any]] | None:
    """When no config of the config's own fields describes the pruned model: the search
    again with the absent `_IMPLICIT` fields as slots, starting from their values made
    explicit (heads and the head width move together, which one slot at a time cannot
    cross). Its values, build, readings and doublings when its build has the pruned model's
    shapes, else None."""
    if all(hasattr(config, k) for k in _IMPLICIT):
        return None
    readings, candidates = _readings(model, config, base, ours, implicit=True)
    explicit = dict(candidates)
    for slot, cands in candidates.items():
        if slot[0] in _IMPLICIT and not hasattr(config, slot[0]) and len(cands) > 1:
            explicit[slot] = [*cands[1:], None]
    if explicit == candidates:
        return None
    values, fresh = _search(model, config, ours, readings, explicit)
    if isinstance(fresh, str) or _mismatch(model, _with(config, values), fresh)[0]:
        return None
    return values, fresh, readings, _doublings(model, config, _observe(base), implicit=True)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _slots(config: Any, implicit: bool = False) -> list[Slot]:
    """Integer config fields (and integers in list fields) that may describe a width; a
    field left None (GPT-2's ``n_inner``: derived from another) is one too, and with
    ``implicit`` the absent `_IMPLICIT` fields."""
    out: list[Slot] = []
    for k, v in config.to_dict().items():
        if any(n in k for n in _NOT_WIDTHS) or not hasattr(config, k):
            continue
        if _is_int(v) or v is None:
            out.append((k, -1))
        elif isinstance(v, list) and v and all(_is_int(x) for x in v):
            out.extend((k, i) for i in range(len(v)))
    if implicit:
        out.extend((k, -1) for k in _IMPLICIT if not hasattr(config, k))
    return out


def _get(config: Any, slot: Slot) -> int | None:
    value: Any = getattr(config, slot[0], None)  # an `_IMPLICIT` field may be absent
    if slot[1] >= 0:
        value = value[slot[1]]
    return None if value is None else int(value)


def _with(config: Any, values: dict[Slot, int | None]) -> Any:
    """A copy of ``config`` with the slots set, or None when the config refuses a value
    (validated fields)."""
    out = copy.deepcopy(config)
    try:
        for (name, index), value in values.items():
            if value is None and not hasattr(out, name):
                continue  # an absent `_IMPLICIT` field stays absent (derived)
            if index < 0:
                setattr(out, name, value)
            else:
                items = list(getattr(out, name))
                items[index] = value
                setattr(out, name, items)
    except Exception:  # noqa: BLE001 - a config that refuses the value cannot describe it
        return None
    return out


def _readings(model: nn.Module, config: Any, base: nn.Module, ours: dict[Key, float],
              implicit: bool = False
              ) -> tuple[dict[Slot, list[_Reading]], dict[Slot, list[int | None]]]:
    """Per config slot: the values the pruned model's observables give for it, and the
    candidate values to try (readings by votes, then the old value scaled by the ratios
    seen between pruned and original observables)."""
    before = _observe(base)
    ratios = Counter(Fraction(ours[k]).limit_denominator(1 << 10) /
                     Fraction(v).limit_denominator(1 << 10)
                     for k, v in before.items() if k[0] == "t" and k in ours and v and
                     ours[k] != v)
    readings: dict[Slot, list[_Reading]] = {}
    candidates: dict[Slot, list[int | None]] = {}
    for slot, probe in _doublings(model, config, before, implicit).items():
        if probe is None:
            continue  # the field cannot be doubled, or doubling it changes nothing we see
        unset = _get(config, slot)
        old = unset if unset is not None else _PROBE
        seen, after = probe
        found: list[_Reading] = []
        derived: Counter[int] = Counter()  # an absent field: the value the original had
        for key, o0 in seen.items():
            o1 = after.get(key)
            if not o0 or o1 is None or o1 != 2 * o0 or key not in ours:
                continue
            value = Fraction(ours[key]).limit_denominator(1 << 20) * old / \
                Fraction(o0).limit_denominator(1 << 20)
            if value.denominator == 1 and value > 0:
                # an attribute holding the field itself is the module saying what it is
                weight = 100 if key[0] == "a" and o0 == old else 1
                found.append(_Reading(int(value), _where(key), weight))
            was = Fraction(before.get(key, 0)).limit_denominator(1 << 20) * old / \
                Fraction(o0).limit_denominator(1 << 20)
            if slot[0] in _IMPLICIT and was.denominator == 1 and was > 0:
                derived[int(was)] += 1
        readings[slot] = found
        tally: Counter[int] = Counter()
        for r in found:
            tally[r.value] += r.weight
        votes: list[int | None] = [v for v, _ in tally.most_common()]
        if unset is None:  # keep it derived unless an explicit value fits better (for an
            # absent field also the original's made explicit: a head width kept while whole
            # heads go, which the default would recompute from the kept heads)
            candidates[slot] = list(dict.fromkeys(
                [None, *votes, *(v for v, _ in derived.most_common(2))]))
            continue
        scaled = [int(old * r) for r, _ in ratios.most_common(3) if (old * r).denominator == 1]
        candidates[slot] = list(dict.fromkeys([*votes, old, *scaled]))
    return readings, candidates


# (model class, config JSON) -> per slot, the observables before and after doubling it.
# Depends only on the config, so repeated updates of one model (accept, undo, the next
# accept at the same widths) reuse the meta builds instead of repeating them.
_DOUBLINGS: dict[tuple[type, str, bool],
                 dict[Slot, tuple[dict[Key, float], dict[Key, float]] | None]]
_DOUBLINGS = {}
_DOUBLINGS_MAX = 8


def _doublings(model: nn.Module, config: Any, before: dict[Key, float],
               implicit: bool = False
               ) -> dict[Slot, tuple[dict[Key, float], dict[Key, float]] | None]:
    """Per config slot (`_slots`): observables of a meta build before and after doubling
    the slot."""
    key = (type(model), config.to_json_string(), implicit)
    cached = _DOUBLINGS.get(key)
    if cached is not None:
        return cached
    out: dict[Slot, tuple[dict[Key, float], dict[Key, float]] | None] = {}
    for slot in _slots(config, implicit):
        out[slot] = None
        unset = _get(config, slot)
        old, seen = (unset, before) if unset is not None else (_PROBE, None)
        if seen is None:  # a None field: compare two values it could take
            first = _build(model, _with(config, {slot: old}))
            if isinstance(first, str):
                continue
            seen = _observe(first)
        built = _build(model, _with(config, {slot: 2 * old}))
        if isinstance(built, str):
            continue
        after = _observe(built)
        if after != seen:
            out[slot] = (seen, after)
    if len(_DOUBLINGS) >= _DOUBLINGS_MAX:
        _DOUBLINGS.pop(next(iter(_DOUBLINGS)))
    _DOUBLINGS[key] = out
    return out


def _distance(ours: dict[Key, float], fresh: nn.Module) -> tuple[int, int]:
    """How many integer observables (shapes, counts) and how many real ones (scales) of
    the pruned model the fresh build gets wrong; integers weigh more."""
    theirs = _observe(fresh)
    wrong = [isinstance(v, int) for k, v in ours.items()
             if k not in theirs or not math.isclose(theirs[k], v, rel_tol=1e-9)]
    return sum(wrong), len(wrong) - sum(wrong)


def _search(model: nn.Module, config: Any, ours: dict[Key, float],
            readings: dict[Slot, list[_Reading]], candidates: dict[Slot, list[int | None]]
            ) -> tuple[dict[Slot, int | None], nn.Module | str]:
    """Slot values whose build matches the pruned model best: start from the best-voted
    values and change one slot at a time while that lowers `_distance`. Slots that a
    module attribute states outright (``head_dim``) move last: a shape that disagrees with
    them is fixed on the slots no module states (the head count of a llama attention).

    Returns the values and their build (or why it failed). Each set of values is built once:
    a step comes back to the values it left (a trial of the slot it moved) and the answer
    is built already; the budget `_MAX_BUILDS` counts the trials as before.
    """
    current = {slot: cands[0] for slot, cands in candidates.items()}
    anchored = {slot for slot, found in readings.items()
                if any(r.weight > 1 and r.value == current[slot] for r in found)}
    builds = 0
    measured: dict[_Values, tuple[int, int] | None] = {}
    kept: dict[_Values, nn.Module | str] = {}  # builds of values a step may move to

    def distance(values: dict[Slot, int | None]) -> tuple[int, int] | None:
        nonlocal builds
        builds += 1
        key = tuple(values.items())
        if key not in measured:
            fresh = _build(model, _with(config, values))
            measured[key] = None if isinstance(fresh, str) else _distance(ours, fresh)
            kept[key] = fresh
        return measured[key]

    best = distance(current)
    while best != (0, 0) and builds < _MAX_BUILDS:
        for old in [k for k in kept if k != tuple(current.items())]:
            del kept[old]  # only the current values and this step's moves stay built
        moves: list[tuple[bool, tuple[int, int], dict[Slot, int | None]]] = []
        for slot, cands in candidates.items():
            for value in cands:
                if value == current[slot] or builds >= _MAX_BUILDS:
                    continue
                trial = {**current, slot: value}
                d = distance(trial)
                if d is not None and (best is None or d < best):
                    moves.append((slot in anchored, d, trial))
                else:
                    kept.pop(tuple(trial.items()), None)  # never chosen: free its build
        if not moves:
            break
        _, best, current = min(moves, key=lambda m: (m[0], m[1]))
    key = tuple(current.items())
    return current, kept[key] if key in kept else _build(model, _with(config, current))


def _where(key: Key) -> str:
    """The module an observable describes: a tensor's owner's parent, an attribute's module."""
    if key[0] == "t":
        owner = key[1].rpartition(".")[0]
        return owner.rpartition(".")[0] or owner
    return key[1]


def _layer(where: str) -> str:
    """The layer a module belongs to: its nearest ancestor (or itself) that is an item of a
    module list (``model.layers.0`` for ``model.layers.0.self_attn.q_proj``), else itself."""
    parts = where.split(".")
    for k in range(len(parts), 0, -1):
        if parts[k - 1].isdigit():
            return ".".join(parts[:k])
    return where


def _denest(mods: list[str]) -> list[str]:
    """Name a module, not each of its parts."""
    return [m for m in mods if not any(m.startswith(o + ".") for o in mods)]


def _detail(by_value: dict[int, list[str]]) -> str:
    return "; ".join(f"{v} in {', '.join(mods[:3])}{' ...' if len(mods) > 3 else ''}"
                     for v, mods in sorted(by_value.items()))


def _per_layer(found: list[_Reading]) -> dict[int, list[str]] | None:
    """Value -> the modules saying it, when the layers say different values: each layer's
    value is the one its readings give the most votes (an attribute stating the field
    outright outweighs shapes it only explains in part: ``self_attn.head_dim`` 8 against
    ``q_proj`` rows that halve with the heads). None when every layer says one value, or
    the second value has fewer than 2 votes (one odd reading is no disagreement)."""
    votes: dict[str, Counter[int]] = {}
    for r in found:
        votes.setdefault(_layer(r.where), Counter())[r.value] += r.weight
    said = {layer: tally.most_common(1)[0][0] for layer, tally in votes.items()}
    support: Counter[int] = Counter()
    for layer, value in said.items():
        support[value] += votes[layer][value]
    if len(support) < 2 or support.most_common()[-1][1] < 2:
        return None
    by_value: dict[int, list[str]] = {}
    for r in found:
        if said[_layer(r.where)] == r.value and r.where not in by_value.get(r.value, []):
            by_value.setdefault(r.value, []).append(r.where)
    return {v: _denest(mods) for v, mods in by_value.items()}


def _copied(model: nn.Module) -> dict[str, dict[int, list[str]]]:
    """Config field -> value -> modules, for the fields that modules holding their own
    copy of the model's config (`explorer.prune.fixups.configs`) say differently: the head
    counts of a cut some layers only, read through the config. The modules of the same
    class that read the shared config say its value."""
    shared = getattr(model, "config", None)
    mods = [(n, m) for n, m in model.named_modules() if vars(m).get("config") is not None]
    copies = [(n, m) for n, m in mods if vars(m)["config"] is not shared and
              type(vars(m)["config"]) is type(shared)]
    out: dict[str, dict[int, list[str]]] = {}
    for name, module in copies:
        held = vars(module)["config"]
        for key, value in vars(held).items():
            theirs = vars(shared).get(key)
            if _is_int(value) and _is_int(theirs) and value != theirs:
                out.setdefault(key, {}).setdefault(value, []).append(name)
    classes = {type(m) for _n, m in copies}
    for key, by_value in out.items():
        same = [n for n, m in mods if vars(m)["config"] is shared and type(m) in classes]
        by_value.setdefault(getattr(shared, key), []).extend(same or ["model"])
    return out


def _disagreement(model: nn.Module, readings: dict[Slot, list[_Reading]]) -> str:
    """The fields whose value differs between layers, with the layers and values, as a
    message: the counts modules read from their own config copies first, then each field
    whose layers' readings say different values (`_per_layer`), in the config's order."""
    fields = _copied(model)
    for (name, _), found in readings.items():
        by_value = _per_layer(found)
        if by_value is not None and name not in fields:
            fields[name] = by_value
    if not fields:
        return ""
    (name, by_value), *rest = list(fields.items())[:3]
    text = f"{name} differs between layers ({_detail(by_value)})"
    if rest:
        text += ", and " + " and ".join(f"{n} ({_detail(v)})" for n, v in rest)
    return f"{text}; a transformers config holds one value per field"


def _unsized(model: nn.Module, config: Any, base: nn.Module,
             doubled: dict[Slot, tuple[dict[Key, float], dict[Key, float]] | None]) -> str:
    """Why no value of the config's fields sizes the first tensor the cut changed, in words:
    the model line that builds it (``file:line``, `reads.assignment`), the fields sizing
    it (those whose doubling changes it, ``doubled``), a tensor one of them also sizes that
    the cut kept (GPT-NeoX's ``query_key_value`` is ``3 * hidden_size`` rows, and
    ``hidden_size`` is the residual stream's width too), and what to do. '' where any of
    these cannot be found."""
    first = _first_difference(model, base)
    if first is None:
        return ""
    name, ours, theirs = first
    if theirs is None:
        return ""
    owner = name.rpartition(".")[0]
    parent, _, attr = owner.rpartition(".")
    built = assignment(type(model.get_submodule(parent)), attr) if parent else ()
    mine = [("t", name, str(d)) for d in range(len(ours))]
    sizing = {slot[0]: probe for slot, probe in doubled.items() if probe is not None
              and any(probe[0].get(k) != probe[1].get(k) for k in mine)}
    kept = _observe(model)
    also = next(((field, key, value) for field, (seen, after) in sizing.items()
                 for key, value in seen.items() if key[0] == "t" and key not in mine
                 and after.get(key) == 2 * value and kept.get(key) == value), None)
    if not built or also is None:
        return ""
    field, key, value = also
    lines = " or ".join(f"`{b.where}` (`{b.code}`)" for b in built)
    return (f"no {type(config).__name__} sizes {owner} as cut ({_dims(ours)}, was "
            f"{_dims(theirs)}): {lines} builds it from {', '.join(sizing)}, and {field} "
            f"also sizes {key[1]} (dim {key[2]}: {value:g}, kept); for a from_pretrained "
            f"folder leave {owner} out of the cut")


def _dims(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))


def _first_difference(model: nn.Module, fresh: nn.Module
                      ) -> tuple[str, tuple[int, ...], tuple[int, ...] | None] | None:
    """The first tensor whose shape in the pruned model differs from ``fresh``'s: name,
    its shape, and the shape ``fresh`` builds (None: ``fresh`` has no such tensor)."""
    ours = {n: tuple(t.shape) for n, t in _named_tensors(model)}
    theirs = {n: tuple(t.shape) for n, t in _named_tensors(fresh)}
    for name in ours:  # a tensor no build has first (e.g. a bias compensation created)
        if name not in theirs:
            return name, ours[name], None
    for name in ours:
        if theirs[name] != ours[name]:
            return name, ours[name], theirs[name]
    return None


def _mismatch(model: nn.Module, config: Any, fresh: nn.Module) -> tuple[bool, str]:
    """(is it a shape difference, the first difference) between the pruned model and
    ``fresh = type(model)(config)``; ``(False, "")`` when they are the same model."""
    first = _first_difference(model, fresh)
    if first is not None:
        name, ours, theirs = first
        return True, (f"'{name}' is {ours} but the config builds "
                      f"{'nothing there' if theirs is None else theirs}")
    fresh_modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        other = fresh_modules.get(name)
        if other is None:
            continue
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr in _SHAPE_ATTRS or \
                    not isinstance(value, (int, float, bool, tuple)):
                continue
            theirs_v = getattr(other, attr, value)
            if theirs_v != value:
                hint = _EXPLAINED.get((type(model), config.to_json_string(), name, attr), "")
                return False, (f"{name}.{attr} is {value!r} in the pruned model but "
                               f"{theirs_v!r} in one built from the config{hint}")
    return False, _rotary_mismatch(model, config)


def _refusal(config: Any) -> str:
    """Why transformers refuses to save ``config`` (its own validation), or ''."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return ""
    try:
        validate()
    except Exception as e:  # noqa: BLE001 - any validation error: the config cannot be saved
        cause = e.__cause__ if e.__cause__ is not None else e
        detail = " ".join(str(cause).split())[:200]
        return (f"transformers refuses a {type(config).__name__} with the pruned widths "
                f"({detail}); round the widths so the config accepts them (round_to / "
                f"--round-to)")
    return ""


def _follow_descriptive(model: nn.Module, config: Any, fresh: nn.Module, problem: str,
                        base: nn.Module | None = None) -> str:
    """Set the integer attributes that only describe a width to the config's values.

    A module may keep a width it took from the config at build time and never read it again
    (``LlamaDecoderLayer.hidden_size``): no traced op reads it, so pruning did not patch it,
    and it is the one thing that differs from the model the config builds. Such an attribute
    follows the config; one that the module's code reads (an embedding scale, a head count)
    is left as it is and the difference stays ``problem``. Returns the difference left ('').

    One the code reads follows too when it is still the value the old config built
    (``base``): a stale copy of a config field. ``FalconModel.num_heads`` is read only on
    the ALiBi branch a rotary Falcon never takes; a count the traced forward read with
    effect would have been patched, or failed the pre-flight forward, once heads were cut.
    """
    before = dict(base.named_modules()) if base is not None else {}
    fresh_modules = dict(fresh.named_modules())
    changed = False
    for name, module in model.named_modules():
        other = fresh_modules.get(name)
        if other is None:
            continue
        for attr, value in list(vars(module).items()):
            if attr.startswith("_") or attr in _SHAPE_ATTRS or not _is_int(value):
                continue
            theirs = getattr(other, attr, value)
            stale = name in before and getattr(before[name], attr, None) == value
            if _is_int(theirs) and theirs != value and \
                    (stale or not reads_attribute(type(module), attr)):
                setattr(module, attr, theirs)
                changed = True
    return _mismatch(model, config, fresh)[1] if changed else problem


# (model class, config JSON, module, attribute) -> why a constant differs (for messages)
_EXPLAINED: dict[tuple[type, str, str, str], str] = {}
_EXPLAINED_MAX = 256
_HEAD_FIELDS = ("head", "n_head")  # config fields a head-dim cut changes


def _explain_constants(model: nn.Module, config: Any, fresh: nn.Module,
                       doubled: dict[Slot, tuple[dict[Key, float], dict[Key, float]] | None]
                       ) -> None:
    """Record why real-valued attributes (an embedding scale, an attention scaling) of the
    pruned model differ from a build of ``config``: they are constants the constructor
    derives from config fields, found like the widths are (the meta builds with one field
    doubled): ``scalar_embed_scale`` grows as ``hidden_size**0.5``, ``scaling`` as
    ``head_dim**-0.5``. The pruned model keeps the value of its original widths; folding
    the ratio into a weight is impossible when that weight is tied to another use."""
    fresh_modules = dict(fresh.named_modules())
    ties = _ties(model)
    for name, module in model.named_modules():
        other = fresh_modules.get(name)
        for attr, value in vars(module).items():
            if other is None or not isinstance(value, float) or attr.startswith("_"):
                continue
            theirs = getattr(other, attr, value)
            if not isinstance(theirs, float) or math.isclose(theirs, value, rel_tol=1e-12):
                continue
            laws = []
            for (field_name, index), probe in doubled.items():
                a, b = (probe[0].get(("a", name, attr)), probe[1].get(("a", name, attr))) \
                    if probe is not None else (None, None)
                if a and b and a > 0 and b > 0 and a != b:
                    slot = field_name if index < 0 else f"{field_name}[{index}]"
                    laws.append(f"{slot}**{math.log2(b / a):.3g}")
            if not laws:
                continue
            text = (f" (a constant the constructor derives from the config, proportional to "
                    f"{' and '.join(laws)}; the pruned model keeps the value of its original "
                    f"widths")
            tied = [f"'{mine}' is tied to '{theirs_name}'" for mine, theirs_name in ties
                    if mine.rpartition(".")[0] == name]
            if tied:
                text += f", and it cannot be folded into the weight: {tied[0]}"
            if any(h in law for law in laws for h in _HEAD_FIELDS):
                text += "; prune whole heads for a transformers export"
            if len(_EXPLAINED) >= _EXPLAINED_MAX:
                _EXPLAINED.pop(next(iter(_EXPLAINED)))
            _EXPLAINED[(type(model), config.to_json_string(), name, attr)] = text + ")"


def _ties(model: nn.Module) -> list[tuple[str, str]]:
    """(name, other name) for parameters shared under two names (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return [(a, b) for group in names.values() for a in group for b in group if a != b]


# Attributes that only restate weight shapes (compared above, as shapes), or state.
_SHAPE_ATTRS = frozenset({"training", "in_features", "out_features", "num_embeddings",
                          "embedding_dim", "nx", "nf", "normalized_shape", "num_features",
                          "in_channels", "out_channels"})


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a checkpoint holds: parameters and persistent buffers (rotary frequencies and
    other non-persistent buffers are recomputed on load; `_rotary_mismatch` checks them)."""
    return list(model.state_dict(keep_vars=True).items())


def real_rotary(model: nn.Module) -> None:
    """Give a model built on ``meta`` its rotary frequencies (``inv_freq`` and the buffers
    beside it), computed on the CPU from its config as its constructor does: they are
    derived, never loaded, so a weightless copy can hold the real values, and a plan's cut
    of them, then the check below, see what a pruned model computes."""
    config = getattr(model, "config", None)
    if config is None:
        return
    for _name, module in model.named_modules():
        inv = module._buffers.get("inv_freq")
        if not isinstance(inv, torch.Tensor) or inv.device.type != "meta":
            continue
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=config)
        except Exception:  # noqa: BLE001 - a rotary class we cannot rebuild stays on meta
            continue  # (`_rotary_mismatch` then says it cannot check it)
        for attr, buf in fresh._buffers.items():
            mine = module._buffers.get(attr)
            if isinstance(buf, torch.Tensor) and isinstance(mine, torch.Tensor) and \
                    mine.device.type == "meta" and mine.shape == buf.shape:
                module._buffers[attr] = buf


def _rotary_mismatch(model: nn.Module, config: Any) -> str:
    """Rotary frequencies are recomputed, not loaded: pruned ones must equal fresh ones."""
    for name, module in model.named_modules():
        inv = getattr(module, "inv_freq", None)
        if not isinstance(inv, torch.Tensor) or inv.device.type == "meta":
            continue
        try:
            fresh = type(module)(config=config)
        except Exception:  # noqa: BLE001 - a rotary class we cannot rebuild: say so
            return f"cannot rebuild rotary embedding '{name}' to check its frequencies"
        if fresh.inv_freq.shape != inv.shape or not torch.allclose(fresh.inv_freq, inv.cpu()):
            return (f"rotary frequencies of '{name}' were pruned (head-dim pruning); "
                    f"transformers recomputes different ones from head_dim="
                    f"{getattr(config, 'head_dim', '?')}; prune whole heads for a "
                    f"transformers export")
    return ""
