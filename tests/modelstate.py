"""Exact model state for all-or-nothing tests: bitwise state_dict, every module's
``training`` flag, every attribute the engine may patch, and a transformers config (the
object each module holds and the fields of each)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from explorer.io.plan_rules import plan_attribute


@dataclass
class ModelState:
    tensors: dict[str, torch.Tensor]  # state_dict and non-persistent buffers, cloned
    ids: dict[str, int]  # id() of every parameter and buffer object
    training: dict[str, bool]
    attributes: dict[str, dict[str, Any]]  # module -> patchable attribute -> value
    config: dict[str, Any] | None
    configs: dict[str, tuple[int, dict[str, Any]]]  # module -> id and fields of its config


def capture(model: nn.Module, clone: bool = True) -> ModelState:
    """The model's state; ``clone=False`` keeps references (to compare, never to keep)."""
    def own(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone() if clone else t.detach()

    tensors = {k: own(v) for k, v in model.state_dict().items()}
    for name, b in model.named_buffers(remove_duplicate=False):
        tensors.setdefault(name, own(b))
    ids = {n: id(t) for n, t in model.named_parameters(remove_duplicate=False)}
    ids.update({n: id(t) for n, t in model.named_buffers(remove_duplicate=False)})
    attrs = {name: {k: v for k, v in vars(m).items() if plan_attribute(k)}
             for name, m in model.named_modules()}
    config: Any = getattr(model, "config", None)
    configs = {name: (id(c), c.to_dict()) for name, m in model.named_modules()
               if hasattr(c := vars(m).get("config"), "to_dict")}
    return ModelState(tensors, ids, {n: m.training for n, m in model.named_modules()}, attrs,
                      config.to_dict() if hasattr(config, "to_dict") else None, configs)


def assert_same(before: ModelState, model: nn.Module) -> None:
    """``model`` is exactly as captured in ``before`` (values bit for bit)."""
    after = capture(model, clone=False)
    assert after.tensors.keys() == before.tensors.keys()
    for name, t in before.tensors.items():
        other = after.tensors[name]
        assert other.shape == t.shape and other.dtype == t.dtype, name
        if t.device.type != "meta":
            assert torch.equal(other, t), name
    assert after.ids == before.ids
    assert after.training == before.training
    assert after.attributes == before.attributes
    assert after.config == before.config
    assert after.configs == before.configs
