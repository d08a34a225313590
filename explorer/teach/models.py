"""The teaching path's data and models: sklearn's 8x8 digits, a small CNN and a small ViT.

Everything here runs on CPU in seconds and is seeded, so two runs with the same settings
give the same weights and the same accuracies.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..demos.dino import Attention, SafeAttention, VisionTransformer


class TeachModel(str, enum.Enum):
    """The teaching path's models (str values: settings and cached results keep the text)."""

    CNN = "cnn"  # `DigitsCNN`
    VIT = "vit"  # a small ViT whose attention keeps its head size in ``self.head_dim``
    VIT_DINO = "vit-dino"  # the same with DINO's attention (``C // num_heads``)

    def __str__(self) -> str:
        return self.value


MODEL_KINDS = tuple(m.value for m in TeachModel)
NUM_CLASSES = 10


@dataclass(frozen=True)
class Digits:
    """The digits split: images are (N, 1, 8, 8) floats in [0, 1], labels are class ids."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """sklearn's bundled digits (1797 images, no download), split by a seeded permutation."""
    from sklearn.datasets import load_digits as _sk_load

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = _sk_load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


class DigitsCNN(nn.Module):
    """conv(1->16)-BN-ReLU, conv(16->32)-BN-ReLU, 2x2 max-pool, linear classifier."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(2 * width * 16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        logits: torch.Tensor = self.classifier(x.flatten(1))
        return logits


def build_model(kind: str, seed: int = 0) -> nn.Module:
    """A fresh, seeded model: ``"cnn"``, ``"vit"`` (head size in ``self.head_dim``) or
    ``"vit-dino"`` (DINO's attention, head size recomputed as ``C // num_heads``)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind '{kind}'; choose one of {MODEL_KINDS}")
    model = TeachModel(kind)
    with torch.random.fork_rng(devices=[]):  # seeded, the caller's random state kept
        torch.manual_seed(seed)
        if model is TeachModel.CNN:
            return DigitsCNN()
        attn: type[Attention] = SafeAttention if model is TeachModel.VIT else Attention
        return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=NUM_CLASSES,
                                 embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0,
                                 attn_cls=attn)


def classifier_name(kind: str) -> str:
    """The module left unpruned: its outputs are the 10 classes."""
    return "classifier" if kind == TeachModel.CNN else "head"


def train(model: nn.Module, data: Digits, epochs: int, lr: float = 3e-3, batch_size: int = 64,
          seed: int = 0) -> list[float]:
    """Adam with cosine decay on the training split, in place; returns the mean loss per epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * -(-len(data.y_train) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(order))
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] (the model is put in eval mode and left there)."""
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out: torch.Tensor = model(x)
    return out


def calibration_batches(data: Digits, batches: int, batch_size: int,
                        seed: int = 0) -> tuple[list[tuple[torch.Tensor]], list[torch.Tensor]]:
    """A few seeded batches of real training images with their labels (for taylor/fisher)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.y_train), generator=gen)[:batches * batch_size]
    xs = [(data.x_train[idx[i:i + batch_size]],) for i in range(0, len(idx), batch_size)]
    ys = [data.y_train[idx[i:i + batch_size]] for i in range(0, len(idx), batch_size)]
    return xs, ys
