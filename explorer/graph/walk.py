"""The one walker over nested structures (tuples, lists, dicts, dataclasses, ModelOutput).

Model inputs and outputs come in any shape: a tensor, a tuple of tensors and caches, a
``ModelOutput``, a dict. Every place that needs their tensors uses these two functions.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

MAX_DEPTH = 8  # deeper structures are not model inputs or outputs


def tensor_leaves(obj: Any, path: str = "out",
                  max_depth: int = MAX_DEPTH) -> list[tuple[str, torch.Tensor]]:
    """Tensor leaves of any nested structure, with a readable path for each."""
    found: list[tuple[str, torch.Tensor]] = []
    _walk(obj, path, found, 0, max_depth)
    return found


def _walk(obj: Any, path: str, found: list[tuple[str, torch.Tensor]], depth: int,
          max_depth: int) -> None:
    if depth > max_depth or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        found.append((path, obj))
    elif isinstance(obj, Mapping):
        for key, item in obj.items():
            _walk(item, f"{path}[{key!r}]", found, depth + 1, max_depth)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _walk(item, f"{path}[{i}]", found, depth + 1, max_depth)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _walk(getattr(obj, f.name), f"{path}.{f.name}", found, depth + 1, max_depth)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor leaf of its tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: str | torch.device) -> Any:
    """``obj`` with every tensor leaf moved to ``device``."""
    return map_tensors(obj, lambda t: t.to(device))


def flat_floats(obj: Any) -> torch.Tensor:
    """Every floating tensor leaf of ``obj``, detached, as one flat float32 vector."""
    leaves = [t.detach().float().reshape(-1) for _p, t in tensor_leaves(obj)
              if t.is_floating_point()]
    return torch.cat(leaves) if leaves else torch.zeros(0)
