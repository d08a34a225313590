"""The bf16 retry of a trace on meta runs only for a dtype complaint, and leaves the model as
it was; any other failure (a deadline, a shape) is final after one forward."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from explorer.app.cli import CliError, _deadline
from explorer.graph.tracer import TraceError, trace


class _Counted(nn.Module):
    """A Linear on meta that counts its forwards, optionally sleeping or failing."""

    def __init__(self, sleep: float = 0.0, fail: Exception | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8, device="meta")
        self.calls = 0
        self.sleep = sleep
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        if self.fail is not None and x.dtype == torch.float32:
            raise self.fail
        return self.fc(x)


def test_a_deadline_during_a_meta_trace_is_final() -> None:
    model = _Counted(sleep=1.0)
    with pytest.raises(TraceError, match="took longer than --timeout") as err, \
            _deadline(0.2, "tracing the model"):
        trace(model, torch.zeros(2, 8, device="meta"))
    assert isinstance(err.value.__cause__, CliError)
    assert model.calls == 1  # not run again in bf16 after the alarm


def test_a_shape_error_on_meta_is_traced_once() -> None:
    model = _Counted(fail=RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(TraceError, match="shapes cannot be multiplied"):
        trace(model, torch.zeros(2, 8, device="meta"))
    assert model.calls == 1


def test_a_dtype_complaint_on_meta_is_traced_again_in_bf16_and_put_back() -> None:
    model = _Counted(fail=RuntimeError("Expected mat_a to be BFloat16 or supported "
                                       "Float16 matrix, got torch.float32."))
    weight = model.fc.weight
    graph = trace(model, torch.zeros(2, 8, device="meta"))
    assert model.calls == 2 and graph.ops
    assert model.fc.weight is weight and weight.dtype == torch.float32
    assert model.fc.bias.dtype == torch.float32
    # on a model with real weights the complaint stands (a cast would change the values)
    cpu = _Counted(fail=RuntimeError("Expected mat_a to be BFloat16, got torch.float32."))
    cpu.fc = nn.Linear(8, 8)
    with pytest.raises(TraceError, match="BFloat16"):
        trace(cpu, torch.zeros(2, 8))
    assert cpu.calls == 1
