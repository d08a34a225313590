"""Local weights: a ``.safetensors`` file, a sharded checkpoint's ``*.index.json`` or a
``torch.save``-d state dict, fit to the model.

Pickles load with ``weights_only=True`` unless the caller trusts the file; an index reads only
shards inside its own folder. Keys the model does
not save (non-persistent buffers such as ``position_ids``) and keys that only repeat a tied
parameter are tolerated; any other mismatch is one error naming the first bad key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..paths import shard_files
from ._files import load_pickle
from ._types import SpecError


def load_weights(model: nn.Module, path: Path, trust: bool) -> None:
    """Load the state dict at ``path`` into ``model``, strictly.

    Raises:
        SpecError: if the file is missing or unreadable, or its keys or shapes do not fit.
    """
    state = dict(_read_state_dict(path, trust))
    expected = model.state_dict()
    for key in _non_persistent_buffers(model):
        state.pop(key, None)
    tied = _tied_aliases(model)
    missing = [k for k in expected if k not in state and tied.get(k, k) not in state]
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
        first = (unexpected or missing or mismatched)[0]
        raise SpecError(
            f"weights {str(path)!r} do not fit the model: first bad key {first!r}; "
            + "; ".join(problems)
            + ". Check that the spec and its options build the same architecture"
        )
    for key in [k for k in expected if k not in state]:  # a tied alias: copy its twin
        state[key] = state[tied[key]]
    model.load_state_dict(state, strict=True)


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    """Full names of buffers the model does not save (``register_buffer(persistent=False)``)."""
    return [f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules()
            for name in getattr(module, "_non_persistent_buffers_set", ())]


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Every state-dict key that repeats a tensor already saved under an earlier key -> that key
    (tied embeddings: a checkpoint may hold either name)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta":
            continue
        ident = tensor.data_ptr()
        if ident in first:
            out[key] = first[ident]
            out.setdefault(first[ident], key)
        else:
            first[ident] = key
    return out


def _read_state_dict(path: Path, trust: bool) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise SpecError(f"weights file {str(path)!r} does not exist")
    if path.name.endswith(".index.json"):
        return _read_sharded(path, trust)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise SpecError(
                f"weights {str(path)!r} are not a readable safetensors file "
                f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); is it complete?"
            ) from e
    obj = load_pickle(path, trust)
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


def _read_sharded(index: Path, trust: bool) -> dict[str, torch.Tensor]:
    """Every shard listed in a sharded checkpoint's ``weight_map``, merged.

    Raises:
        SpecError: if the index is unreadable, has no ``weight_map``, or names a shard that
            is missing or not a weights file inside the index's folder (absolute, ``..``, a
            link out: `explorer.io.paths.shard_files`).
    """
    state: dict[str, torch.Tensor] = {}
    for part in shard_files(index, SpecError).values():
        state.update(_read_state_dict(part, trust))
    return state
