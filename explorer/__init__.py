"""Pruning Explorer: exact structural pruning of PyTorch models, traced at the ATen level."""
from __future__ import annotations

from .api import ModelGraph as ModelGraph
from .api import trace as trace
from .coupling.groups import Group as Group
from .io.data import load_data as load_data
from .io.export import load_pruned as load_pruned
from .io.plan import Plan as Plan
from .io.specs import load_model as load_model
from .prune.pruner import Pruner as Pruner
from .prune.pruner import StepReport as StepReport
from .quality.evaluate import evaluate as evaluate

__all__ = ["trace", "ModelGraph", "Group", "Pruner", "StepReport", "Plan", "load_pruned",
           "load_model", "load_data", "evaluate"]
