"""Which module attributes a plan may set, with their types and ranges.

Exactly the attributes the engine itself writes when it prunes: the width and shape fields of
the module handlers (`explorer.prune.fixups.patch.WRITES`), the head fields of attention
modules (`explorer.coupling.heads`), width-named integers (`explorer.prune.fixups.widths`)
and ``fused_attn`` (switched off, never on, when head dims change), and the head fields of a
module's own config copy (``config.num_attention_heads``: `explorer.prune.fixups.configs`).
Widths and head counts are positive integers, shapes tuples of them. Anything else
(``training``, ``_modules``, an epsilon, a string) is refused before the model is touched.
"""
from __future__ import annotations

from typing import Any

from ..coupling.heads import (
    HEAD_COUNT_ATTRS,
    HEAD_DIM_ATTRS,
    HEAD_WIDTH_ATTRS,
    KV_HEAD_ATTRS,
    ROTARY_DIM_ATTRS,
)
from ..prune.fixups.configs import config_field
from ..prune.fixups.patch import TUPLE_WRITES, WRITES
from ..prune.fixups.scoped import SPLIT_LISTS
from ..prune.fixups.widths import width_name

__all__ = ["check_attribute", "plan_attribute"]

MAX_WIDTH = 2**40  # far above any real width; catches absurd values early

_INT_ATTRS = (WRITES - TUPLE_WRITES) | set(HEAD_COUNT_ATTRS) | set(HEAD_DIM_ATTRS) \
    | set(HEAD_WIDTH_ATTRS) | set(KV_HEAD_ATTRS) | set(ROTARY_DIM_ATTRS) | {"num_key_value_groups"}
# config fields a cut sets on a module's own config copy (`explorer.prune.fixups.attention`)
_CONFIG_ATTRS = set(HEAD_COUNT_ATTRS) | set(HEAD_DIM_ATTRS) | set(HEAD_WIDTH_ATTRS) \
    | set(KV_HEAD_ATTRS)


def plan_attribute(name: str) -> bool:
    """Whether a plan may set an attribute called ``name`` at all."""
    field = config_field(name) if isinstance(name, str) else None
    if field is not None:
        return field in _CONFIG_ATTRS
    return name in _INT_ATTRS or name in TUPLE_WRITES or name == "fused_attn" or \
        (not name.startswith("_") and (width_name(name) or name.endswith(SPLIT_LISTS)))


def _width(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WIDTH


def check_attribute(name: str, old: Any, new: Any) -> str:
    """What is wrong with a plan setting ``name`` from ``old`` to ``new`` ("" if nothing)."""
    if not isinstance(name, str) or not plan_attribute(name):
        return ("is not an attribute the pruner writes (plans may set widths, head counts "
                "and shapes only)")
    if name == "fused_attn":
        return "" if old is True and new is False else "may only change from true to false"
    if name in TUPLE_WRITES or name.endswith(SPLIT_LISTS):  # shapes, split sizes
        ok = all(isinstance(v, list) and v and all(_width(x) for x in v) for v in (old, new))
        return "" if ok else "must be [old, new] lists of positive integers"
    ok = all(_width(v) for v in (old, new))
    return "" if ok else f"must be [old, new] positive integers (at most {MAX_WIDTH})"
