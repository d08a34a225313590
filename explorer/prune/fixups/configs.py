"""A module whose forward reads a count through the shared config gets its own copy of it.

Most attention modules read their head counts from their own attributes, which
`fixups.attention` sets per layer. Some read one through the config instead: Phi3's
``query_pos = self.config.num_attention_heads * self.head_dim`` slices the fused ``qkv_proj``
output. A transformers config is one object shared by every layer, so no value written into
it can give one layer its own head count. Such a module is given its own shallow copy of the
config holding the new value (`own`); the change is recorded as the attribute
``config.<field>`` (a plan sets it the same way) and the object the module held before is
kept, so an undo puts the shared object itself back. When every layer ends with the same
counts and the model's config follows them, `rejoin` points the copies back at it.
"""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ...coupling.heads import HEAD_COUNT_ATTRS, HEAD_DIM_ATTRS, HEAD_WIDTH_ATTRS, KV_HEAD_ATTRS
from .reads import config_reads

__all__ = ["CONFIG", "HEAD_FIELDS", "config_field", "own", "read", "rejoin"]

CONFIG = "config."  # the prefix of a recorded attribute that lives on the module's config


def config_field(attr: str) -> str | None:
    """The config field a recorded attribute names (``config.num_attention_heads``), else
    None (a plain module attribute)."""
    return attr[len(CONFIG):] if attr.startswith(CONFIG) else None


def read(module: nn.Module, attr: str, default: Any = None) -> Any:
    """The value of a recorded attribute: on the module, or on its config."""
    field = config_field(attr)
    if field is None:
        return getattr(module, attr, default)
    return getattr(vars(module).get("config"), field, default)


# the fields a cut may set on a module's own config copy
HEAD_FIELDS = frozenset(HEAD_COUNT_ATTRS + HEAD_DIM_ATTRS + HEAD_WIDTH_ATTRS + KV_HEAD_ATTRS)


def own(module: nn.Module, name: str, values: dict[str, Any], previous: dict[str, Any]
        ) -> None:
    """Set ``values`` (config field -> value) on ``module``'s own config.

    The first call for ``name`` in one application gives the module a shallow copy of the
    config it holds and records that object in ``previous`` (for the undo); later calls
    write into the same copy.
    """
    if name not in previous:
        held = vars(module).get("config")
        if held is None:
            raise AttributeError(f"module '{name}' holds no config to copy")
        previous[name] = held
        setattr(module, "config", copy.copy(held))  # noqa: B010 - nn.Module types setattr narrowly
    held = vars(module)["config"]
    for field, value in values.items():
        setattr(held, field, value)


_ABSENT = object()


def _same(a: Any, b: Any) -> bool:
    """``a == b`` as one bool (False where equality is not one: arrays, tensors)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except (ValueError, RuntimeError, TypeError):
        return False


def rejoin(model: nn.Module) -> dict[str, Any]:
    """Point every module whose config is a copy of ``model.config``'s class back at
    ``model.config`` where its forward would read the same from it: every field equal, but
    head fields its forward does not read through the config (it reads its own attributes,
    which the cut set). Returns module -> the copy it held."""
    shared = getattr(model, "config", None)
    out: dict[str, Any] = {}
    if shared is None:
        return out
    for name, module in model.named_modules():
        held = vars(module).get("config")
        if held is None or held is shared or type(held) is not type(shared):
            continue
        free = HEAD_FIELDS - set(config_reads(module))
        if all(key in free or _same(vars(held).get(key, _ABSENT), vars(shared).get(key, _ABSENT))
               for key in set(vars(held)) | set(vars(shared))):
            out[name] = held
            setattr(module, "config", shared)  # noqa: B010 - nn.Module types setattr narrowly
    return out
