"""A transformers checkpoint larger than memory, placed by accelerate: what fits on the GPUs
or CPU under ``max_memory`` stays there, the rest is offloaded to CPU or disk.

`load_offloaded` builds the model on ``meta`` (``init_empty_weights``), makes a ``device_map``
from ``max_memory`` and loads it with transformers' ``from_pretrained(device_map=...)``
(accelerate's dispatch; checkpoint keys renamed or fused on load are followed). The same code
serves one GPU, several GPUs, or a CPU with a memory cap. `explorer.prune.sequential` scores
the placed model one decoder layer at a time.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...prune.sequential import SequentialError
from ._files import architecture_class, safetensors_shapes
from ._types import ATTENTION


@dataclass
class Offloaded:
    """A model placed by accelerate, and where each part went."""

    model: nn.Module
    device_map: dict[str, Any] = field(default_factory=dict)  # module -> device or "disk"

    @property
    def offloaded(self) -> list[str]:
        """Modules whose weights wait on disk (or in CPU memory while GPUs compute)."""
        gpus = any(not isinstance(d, str) or d not in ("cpu", "disk")
                   for d in self.device_map.values())
        return [m for m, d in self.device_map.items() if d == "disk" or (gpus and d == "cpu")]


def load_offloaded(checkpoint: str | os.PathLike[str],
                   max_memory: Mapping[int | str, int | str] | None = None,
                   offload_folder: str | os.PathLike[str] | None = None,
                   dtype: torch.dtype | None = None) -> Offloaded:
    """A transformers checkpoint folder loaded within ``max_memory``, the rest offloaded.

    Args:
        checkpoint: a ``save_pretrained`` folder (safetensors, sharded or not).
        max_memory: per device caps, e.g. ``{0: "20GiB", "cpu": "60GiB"}`` or
            ``{"cpu": "2GiB"}``; what does not fit goes to ``offload_folder`` on disk.
            None: accelerate's default (what the devices have).
        offload_folder: where weights offloaded to disk are kept.
        dtype: load the weights as this dtype (default: as stored).

    Raises:
        SequentialError: the config names no transformers class.
    """
    import transformers
    from accelerate import infer_auto_device_map, init_empty_weights

    folder = Path(checkpoint)
    # never the folder's own code (``auto_map``): transformers neither imports nor asks
    config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    arch, cls = architecture_class(config)
    if cls is None:
        raise SequentialError(f"config of '{folder}' names architecture {arch!r}, which "
                              f"transformers does not have")
    config.use_cache = False  # calibration keeps no key/value cache
    with init_empty_weights():
        model = cls(config)
    # tied weights (an lm_head sharing the embedding's matrix, which the checkpoint stores
    # once) are placed together only when tied: apart, lm_head could go to disk under a
    # name the checkpoint lacks
    model.tie_weights()
    _check_shapes(folder, model)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=dict(max_memory) if max_memory
                                       else None, no_split_module_classes=no_split,
                                       dtype=dtype)
    if any(d == "disk" for d in device_map.values()) and offload_folder is None:
        raise SequentialError(f"the model does not fit in max_memory={dict(max_memory or {})}"
                              f"; pass offload_folder= for the weights that go to disk")
    # transformers' own loader places the weights by that map (accelerate's dispatch) and
    # follows the checkpoint's names: renamed keys, expert weights fused on load
    # (``dtype=`` is ``torch_dtype=`` before transformers 4.56); nothing is downloaded
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model, info = cls.from_pretrained(
        str(folder), config=config, device_map=device_map, local_files_only=True,
        offload_folder=None if offload_folder is None else str(offload_folder),
        output_loading_info=True, ignore_mismatched_sizes=True,  # refused below, by name
        trust_remote_code=False, attn_implementation=ATTENTION,  # as in memory
        **{key: dtype or "auto"})
    gaps = [f"{what} {', '.join(map(_key_text, names[:3]))}{' ...' if len(names) > 3 else ''}"
            for what, names in (("missing", sorted(info.get("missing_keys") or [], key=str)),
                                ("mismatched", sorted(info.get("mismatched_keys") or [],
                                                      key=str)))
            if names]
    if gaps:  # from_pretrained would fill them with random values: scores of nothing
        raise SequentialError(f"the checkpoint '{folder}' does not hold the model's weights "
                              f"({'; '.join(gaps)}): scores need every weight")
    return Offloaded(model.eval(), dict(device_map))


def _check_shapes(folder: Path, model: nn.Module) -> None:
    """Every checkpoint tensor the model has under the same name has the model's shape (from
    the safetensors headers; offloaded weights would otherwise fail only when a layer runs).

    Raises:
        SequentialError: naming the first tensor whose shape differs, and its file.
    """
    import json

    index = folder / "model.safetensors.index.json"
    try:
        names = (sorted({str(v) for v in json.loads(index.read_text())["weight_map"].values()})
                 if index.is_file() else ["model.safetensors"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return  # an unreadable index: the loader says what is wrong with it
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name in names:
        path = folder / name
        if Path(name).name != name or not path.is_file():
            continue  # a shard outside the folder or missing: refused by the loaders
        for key, shape in safetensors_shapes(path).items():
            if key in ours and shape != ours[key]:
                raise SequentialError(f"tensor '{key}' of '{path}' has shape {shape}, the "
                                      f"model's config gives {ours[key]}; check that "
                                      f"config.json is the one saved with these weights")


def _key_text(key: Any) -> str:
    """A loading-info key: a name, or transformers' ``(name, checkpoint shape, model shape)``."""
    if isinstance(key, tuple) and len(key) == 3:
        return f"{key[0]} (checkpoint {tuple(key[1])}, model {tuple(key[2])})"
    return str(key)
