"""A three-layer MLP with a residual around its hidden block."""

from __future__ import annotations

import torch
from torch import nn

IN_FEATURES = 20
HIDDEN = 64
OUT_FEATURES = 5


class ResidualMLP(nn.Module):
    """``y = fc3(x + fc2(relu(fc1(x))))``: only the hidden width of fc1/fc2 is free to prune."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(HIDDEN, IN_FEATURES)
        self.fc3 = nn.Linear(IN_FEATURES, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(self.act(self.fc1(x)))
        out: torch.Tensor = self.fc3(x)
        return out


def build() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Residual MLP on a (2, 20) batch, 5 outputs."""
    return ResidualMLP(), (torch.randn(2, IN_FEATURES),)
