"""Local weights: a ``.safetensors`` file or a ``torch.save``-d state dict, fit to the model.

Pickles load with ``weights_only=True`` unless the caller trusts the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ._types import SpecError


def load_weights(model: nn.Module, path: Path, trust: bool) -> None:
    """Load the state dict at ``path`` into ``model``, strictly.

    Raises:
        SpecError: if the file is missing or unreadable, or its keys or shapes do not fit.
    """
    state = _read_state_dict(path, trust)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise SpecError(
            f"weights {str(path)!r} do not fit the model: " + "; ".join(problems)
            + ". Check that the spec and its options build the same architecture"
        )
    model.load_state_dict(state, strict=True)


def _read_state_dict(path: Path, trust: bool) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise SpecError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ... per cause
        hint = "" if trust else "; if you trust this file, pass trust_weights=True"
        raise SpecError(f"cannot load weights {str(path)!r}: {type(e).__name__}: {e}{hint}") from e
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            nested = obj.get(key)
            if isinstance(nested, Mapping):
                return nested
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise SpecError(
        f"weights {str(path)!r} hold a {type(obj).__name__}, not a state dict; save "
        "model.state_dict() (or a dict with it under 'state_dict' or 'model')"
    )
