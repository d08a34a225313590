"""``timm:<name>[?k=v&...]`` (random init) or ``timm:<folder>`` (a local timm checkpoint)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...quality.task import ModelKind, Task
from ..jsonfile import read_json
from ._query import check_counts, split_query
from ._types import Built, ModelFamily, SpecError
from ._weights import load_weights

_TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

_DEFAULT_IMAGE = (3, 224, 224)
# create_model options that read files or download (a spec builds random weights only)
_FILE_OPTIONS = frozenset({"pretrained", "checkpoint_path", "pretrained_cfg",
                           "pretrained_cfg_overlay", "cache_dir"})


def build_timm(text: str, device: str) -> Built:
    """``timm.create_model(name, pretrained=False, **options)`` on ``device``.

    Raises:
        SpecError: if timm does not know the name (with close names) or rejects the options.
    """
    import timm

    name, kwargs = split_query(text, "timm")
    files = sorted(set(kwargs) & _FILE_OPTIONS)
    if files:
        raise SpecError(
            f"timm spec option {files[0]!r} would download or read a file; specs build "
            "random weights only: load local weights with weights= (--weights FILE)"
        )
    check_counts("timm", kwargs)
    if Path(name).is_dir():
        return _build_timm_folder(Path(name), kwargs, device)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SpecError(
            f"unknown timm model {name!r}{hint} (timm {timm.__version__}; "
            f"list names with timm.list_models('*{name[:4]}*'))"
        )
    try:
        with torch.device(device):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm asserts/raises anything on bad options
        detail = str(e).splitlines()[0] if str(e) else "an assertion in its constructor"
        raise SpecError(
            f"timm model {name!r} rejected options {kwargs}: {type(e).__name__}: "
            f"{detail}; check the option values (e.g. widths divisible by the head count)"
        ) from e
    return Built(model, (torch.randn(1, *_timm_input_size(model, kwargs)),), ModelFamily.TIMM,
                 ModelKind.VISION)


def _timm_input_size(model: nn.Module, kwargs: Mapping[str, Any]) -> tuple[int, ...]:
    """(C, H, W) from the model's cfg, with ``img_size`` / ``in_chans`` options applied.

    timm keeps the pretrained cfg's ``input_size`` even when ``img_size`` is overridden.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    chans, height, width = tuple(cfg.get("input_size", _DEFAULT_IMAGE))
    img_size = kwargs.get("img_size")
    if isinstance(img_size, int):
        height = width = img_size
    elif isinstance(img_size, tuple) and len(img_size) == 2:
        height, width = img_size
    chans = kwargs.get("in_chans", chans)
    return (int(chans), int(height), int(width))


def _build_timm_folder(folder: Path, kwargs: dict[str, Any], device: str) -> Built:
    """``timm:<folder>``: a timm checkpoint folder (``config.json`` with ``architecture``, and
    ``model.safetensors`` or ``pytorch_model.bin``, read with ``weights_only=True``).

    Raises:
        SpecError: if the folder has no usable config or its weights do not fit.
    """
    config_file = folder / "config.json"
    config = read_json(config_file, "the timm config", SpecError)
    arch = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(arch, str):
        raise SpecError(f"timm config {str(config_file)!r} has no 'architecture' field")
    import timm

    if not timm.is_model(arch):
        raise SpecError(f"timm {timm.__version__} does not know the architecture {arch!r} "
                        f"named in {str(config_file)!r}")
    options = {"num_classes": config["num_classes"]} if "num_classes" in config else {}
    built = _create(arch, {**options, **kwargs}, device)
    files = [folder / f for f in _TIMM_WEIGHTS if (folder / f).is_file()]
    on_meta = torch.device(device).type == "meta"
    if files and not on_meta:
        load_weights(built.model, files[0], trust=False)
    notes = () if files or on_meta else (f"{folder} holds no weights file: random weights",)
    return Built(built.model, built.example_inputs, ModelFamily.TIMM, ModelKind.VISION,
                 task=Task.IMAGE_CLASSIFICATION, source=str(folder),
                 pretrained=bool(files) and not on_meta, notes=notes)


def _create(arch: str, kwargs: dict[str, Any], device: str) -> Built:
    """``build_timm`` with keyword options given as a dict."""
    import timm

    try:
        with torch.device(device):
            model = timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, RuntimeError) as e:
        raise SpecError(f"timm model {arch!r} rejected options {kwargs}: {e}") from e
    return Built(model, (torch.randn(1, *_timm_input_size(model, kwargs)),), ModelFamily.TIMM,
                 ModelKind.VISION)
