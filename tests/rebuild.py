"""The config-fidelity oracle shared by the transformers tests (tests/ is on sys.path)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from explorer.prune.pruner import StepReport

# how a step's report begins the line saying that no transformers config describes the model
CANNOT = "the transformers config cannot describe the pruned model: "


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits, or the last hidden state of a base model."""
    with torch.no_grad():
        out = model(x)
    logits = getattr(out, "logits", None)
    result: torch.Tensor = logits if logits is not None else out.last_hidden_state
    return result


def assert_config_rebuilds(model: nn.Module, report: StepReport, x: torch.Tensor,
                           describes: bool) -> None:
    """``type(model)(model.config)`` with the pruned weights computes what the pruned model
    computes (``describes``), or the step's report says why no config can describe it."""
    said = [n for n in report.notes if n.startswith(CANNOT)]
    if not describes:
        assert said, report.notes
        return
    assert not said, said
    fresh: Any = type(model)(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(output(fresh, x), output(model, x), rtol=1e-4, atol=1e-5)
