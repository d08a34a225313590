"""Built-in demo models: small, random-init, fast on CPU.

``DEMOS`` maps a demo name to a factory returning ``(model, example_inputs)``; ``KIND`` says what
the inputs are ("vision" images, "lm" token ids, "other" plain feature vectors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from explorer.demos import dino, llama, mlp, resnet

DemoFactory = Callable[[], tuple[nn.Module, tuple[Any, ...]]]

DEMOS: dict[str, DemoFactory] = {
    "dino_vit": dino.build,
    "dino_vit_safe": dino.build_safe,
    "resnet": resnet.build,
    "cnn_concat": resnet.build_cnn_concat,
    "llama": llama.build,
    "mlp": mlp.build,
}

KIND: dict[str, str] = {
    "dino_vit": "vision",
    "dino_vit_safe": "vision",
    "resnet": "vision",
    "cnn_concat": "vision",
    "llama": "lm",
    "mlp": "other",
}

__all__ = ["DEMOS", "KIND", "DemoFactory"]
