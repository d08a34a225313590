"""Width attributes that model code reads in its forward (``self.hidden_dim``, ``self.width``).

Custom modules often keep the width they were built with and use it in the forward, e.g.
``x.reshape(-1, self.hidden_dim)`` or ``torch.split(x, self.width, 1)``. After pruning, an
integer attribute whose name says it is a width, on a module that owns (or whose child or
grandchild owns) a resized tensor, is updated when its value equals the old size of exactly one
resized dim mapping to one new size. Ambiguous cases are left alone: the pre-flight then
reports the group unsafe with the failing line, as for any hard-coded width.

An attribute no method of the module's own class reads is left alone (`describes_only`):
it describes, and may describe another width of equal size. ``LlamaDecoderLayer.hidden_size``
is the residual stream's width, which a head cut keeps, though the attention widths under it
shrink from the same 64; the config update sets such attributes from the config that describes
the whole model (`fixups.hfconfig`). Plans recorded before this rule may still name such an
attribute; a replay accepts and skips it (`explorer.io.plan`).
"""
from __future__ import annotations

from torch import nn

from ...coupling.heads import (
    HEAD_COUNT_ATTRS,
    HEAD_DIM_ATTRS,
    HEAD_WIDTH_ATTRS,
    KV_HEAD_ATTRS,
    ROTARY_DIM_ATTRS,
)
from .patch import WRITES, has_patcher
from .reads import reads_attribute

_NAMES = {"hidden_dim", "hidden_size", "dim", "embed_dim", "width", "out_chs", "in_chs",
          "out_channels", "in_channels", "num_features", "channels", "inner_dim",
          "intermediate_size", "d_model", "mid_chs", "split_size", "intermediate_dim"}
_SUFFIXES = ("_dim", "_chs", "_channels", "_features", "_width")
_HEADS = frozenset(HEAD_COUNT_ATTRS + HEAD_DIM_ATTRS + HEAD_WIDTH_ATTRS + KV_HEAD_ATTRS
                   + ROTARY_DIM_ATTRS)  # what `fixups.attention` sets, read or not
_NEVER = ("kernel", "patch", "img", "window", "pool", "stride", "vocab", "position", "head",
          "rotary", "rope", "num_")


def width_name(name: str) -> bool:
    """Whether `patch_widths` may update an integer attribute called ``name``."""
    if name.startswith("_") or any(n in name for n in _NEVER):
        return False
    return name in _NAMES or name.endswith(_SUFFIXES)


def describes_only(module: nn.Module, attr: str) -> bool:
    """Whether ``module.<attr>`` is a width `patch_widths` leaves alone because no code of
    the module's own class reads it. Attributes another fix-up owns (a module type's
    handler, the head fields `fixups.attention` sets) and torch's classes are patched as
    before."""
    cls = type(module)
    return width_name(attr) and attr not in _HEADS and not cls.__module__.startswith("torch.") \
        and not (has_patcher(module) and attr in WRITES) and not reads_attribute(cls, attr)


def patch_widths(model: nn.Module, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
                 already: dict[str, dict[str, list[object]]]) -> dict[str, dict[str, list[object]]]:
    """Update width attributes after tensors changed shape; returns module -> attr changes."""
    sizes: dict[str, dict[int, set[int]]] = {}  # module -> old size -> new sizes
    for name, (before, after) in shapes.items():
        owner = name.rpartition(".")[0]
        ancestors = {owner}
        for _ in range(2):  # parent and grandparent (a block owning a ModuleList of convs)
            owner = owner.rpartition(".")[0] if owner else ""
            ancestors.add(owner)
        for mod in ancestors:
            table = sizes.setdefault(mod, {})
            for old, new in zip(before, after, strict=False):
                if old != new:
                    table.setdefault(old, set()).add(new)
    changes: dict[str, dict[str, list[object]]] = {}
    for mod_name, table in sizes.items():
        module = model.get_submodule(mod_name)
        done = already.get(mod_name, {})
        owned = WRITES if has_patcher(module) else frozenset()  # its type's handler set them
        for attr, value in list(vars(module).items()):
            if attr in done or attr in owned or not width_name(attr) or \
                    isinstance(value, bool) or not isinstance(value, int) or \
                    describes_only(module, attr):
                continue
            options = table.get(value)
            if options is not None and len(options) == 1:
                (target,) = options
                setattr(module, attr, target)
                changes.setdefault(mod_name, {})[attr] = [value, target]
    return changes
