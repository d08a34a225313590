"""Built-in demo models: small, random-init, fast on CPU.

``DEMOS`` maps a demo name to a factory returning ``(model, example_inputs)``; ``KIND`` says what
the inputs are (`ModelKind`: images, token ids, plain feature vectors). `hf_configs` holds the
small built-in transformers configs the ``hf:<family>`` specs and the llama demo build from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from explorer.demos import dino, llama, mlp, resnet

from ..quality.task import ModelKind

DemoFactory = Callable[[], tuple[nn.Module, tuple[Any, ...]]]

DEMOS: dict[str, DemoFactory] = {
    "dino_vit": dino.build,
    "dino_vit_safe": dino.build_safe,
    "resnet": resnet.build,
    "cnn_concat": resnet.build_cnn_concat,
    "llama": llama.build,
    "mlp": mlp.build,
}

KIND: dict[str, ModelKind] = {
    "dino_vit": ModelKind.VISION,
    "dino_vit_safe": ModelKind.VISION,
    "resnet": ModelKind.VISION,
    "cnn_concat": ModelKind.VISION,
    "llama": ModelKind.LM,
    "mlp": ModelKind.OTHER,
}

__all__ = ["DEMOS", "KIND", "DemoFactory"]
