"""Zoo models that are not timm / transformers / demo specs: torchvision factories.

Used by ``tests/zoo.py`` through ``<this file>:<name>`` specs; each returns
``(model, example_inputs)`` in eval mode with random weights (nothing is downloaded).
"""
from __future__ import annotations

import torch
from torch import nn


def fasterrcnn_resnet50_fpn() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """torchvision Faster R-CNN (ResNet-50 FPN) at 128 px: nonzero, nms, data-dependent
    numbers of detections."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn as build
    torch.manual_seed(0)
    model = build(weights=None, weights_backbone=None, min_size=128, max_size=128).eval()
    return model, (torch.rand(1, 3, 128, 128),)


def shufflenet_v2_x1_0() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """torchvision ShuffleNet v2 at 64 px: channel shuffle and chunk(2)."""
    from torchvision.models import shufflenet_v2_x1_0 as build
    torch.manual_seed(0)
    return build(weights=None).eval(), (torch.rand(1, 3, 64, 64),)
