"""Pre-flight: data-dependent output dims are not compared, real forwards are bounded, and
failures are located in the model's own source."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from explorer import Pruner
from explorer.graph.tracer import TraceError, trace
from explorer.prune.preflight import Preflight, data_dependent_dims
from explorer.prune.removal import Removal


class TinyDetector(nn.Module):
    """Scores every position and returns the boxes of those above the mean: (N, 4), N data-
    dependent (boolean indexing runs nonzero), like a detector's post-processing."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.relu(self.body(torch.relu(self.stem(x)))))
        rows = out.flatten(2).transpose(1, 2)[0]  # (H*W, 5)
        return rows[rows[:, 4] > rows[:, 4].mean()][:, :4]


def _detector() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return TinyDetector().eval(), (torch.randn(1, 3, 8, 8),)


def test_number_of_detections_is_not_compared() -> None:
    model, x = _detector()
    with torch.no_grad():
        count = model(*x).shape[0]
    pruner = Pruner(model, x, ratio=0.5, ignored=["head"])
    assert data_dependent_dims(pruner.coupling) == [(True, False)]
    report = pruner.step()
    assert not report.unsafe and report.forward_ok and report.output_shape_ok
    assert [c.width_after for c in report.changes] == [8, 8]
    assert any("dim 0 depends on the data" in n for n in report.notes), report.notes
    with torch.no_grad():
        out = model(*x)
    assert out.shape[1] == 4 and 0 <= out.shape[0] <= 64 and count > 0


def test_forward_budget_reports_unchecked() -> None:
    model, x = _detector()
    pruner = Pruner(model, x, ratio=0.5, ignored=["head"])
    flight = Preflight(model, x, pruner.coupling, max_forwards=1)
    removal = Removal()
    removal.add(0, 0, [0, 1])
    first = flight.check(removal)  # meta cannot run nonzero: one real forward
    assert first.ok and flight.device == "cpu" and flight.forwards == 1
    second = flight.check(removal)
    assert not second.ok and second.error.startswith("not checked: the pre-flight budget of "
                                                     "1 full forwards is spent")
    assert pruner.model.stem.out_channels == 16  # never touched


class _CallsLibrary(nn.Module):
    """Its forward fails inside torchvision's channel_shuffle (library code)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.models.shufflenetv2 import channel_shuffle
        return channel_shuffle(x, 3)  # 4 channels do not split into 3 groups


def test_location_is_the_models_own_line() -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(TraceError) as info:
        trace(_CallsLibrary(), torch.randn(1, 4, 2, 2))
    line = inspect.getsourcelines(_CallsLibrary.forward)[1] + 2
    assert info.value.location == f"{__file__}:{line}"


def test_location_falls_back_to_the_modules_forward() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(9, 2))  # only torch frames fail
    with pytest.raises(TraceError) as info:
        trace(model, torch.randn(1, 4))
    assert info.value.module == "1"
    path = inspect.getsourcefile(nn.Linear.forward)
    line = inspect.getsourcelines(nn.Linear.forward)[1]
    assert info.value.location == f"{path}:{line}"
