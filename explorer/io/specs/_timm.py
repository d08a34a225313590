"""``timm:<name>[?k=v&...]``: a random-init timm model on one image of its default size."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._query import split_query
from ._types import Built, SpecError

_DEFAULT_IMAGE = (3, 224, 224)


def build_timm(text: str, device: str) -> Built:
    """``timm.create_model(name, pretrained=False, **options)`` on ``device``.

    Raises:
        SpecError: if timm does not know the name (with close names) or rejects the options.
    """
    import timm

    name, kwargs = split_query(text, "timm")
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
    except TypeError as e:
        raise SpecError(f"timm model {name!r} rejected options {kwargs}: {e}") from e
    return Built(model, (torch.randn(1, *_timm_input_size(model, kwargs)),), "timm", "vision")


def _timm_input_size(model: nn.Module, kwargs: Mapping[str, Any]) -> tuple[int, ...]:
    """(C, H, W) from the model's cfg, with ``img_size`` / ``in_chans`` options applied.

    timm keeps the pretrained cfg's ``input_size`` even when ``img_size`` is overridden.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    chans, height, width = tuple(cfg.get("input_size", _DEFAULT_IMAGE))
    img_size = kwargs.get("img_size")
    if isinstance(img_size, int):
        height = width = img_size
    chans = kwargs.get("in_chans", chans)
    return (int(chans), int(height), int(width))
