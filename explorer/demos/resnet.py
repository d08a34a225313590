"""Small convolutional demos: a two-stage ResNet and a concat / grouped / depthwise CNN."""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut when the stride or width changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out: torch.Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(out + identity)
        return out


class ResNet(nn.Module):
    """Stem, two stages of two basic blocks (widths 16 and 32), global pool, classifier."""

    def __init__(self, widths: tuple[int, int] = (16, 32), num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        w1, w2 = widths
        self.conv1 = nn.Conv2d(3, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(w1, w1), BasicBlock(w1, w1))
        self.layer2 = nn.Sequential(BasicBlock(w1, w2, stride=2), BasicBlock(w2, w2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        logits: torch.Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits


class ConcatCNN(nn.Module):
    """Two branches concatenated on channels, then a grouped (g=4) and a depthwise conv."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU())
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(32)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pointwise = nn.Conv2d(32, 32, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.relu(self.bn(self.grouped(x)))
        x = self.relu(self.pointwise(self.depthwise(x)))
        logits: torch.Tensor = self.fc(torch.flatten(self.pool(x), 1))
        return logits


def build() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Small ResNet on a (1, 3, 32, 32) image, 10 classes."""
    return ResNet(), (torch.randn(1, 3, 32, 32),)


def build_cnn_concat() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Concat / grouped / depthwise CNN on a (1, 3, 32, 32) image, 10 classes."""
    return ConcatCNN(), (torch.randn(1, 3, 32, 32),)
