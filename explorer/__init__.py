"""Pruning Explorer: exact structural pruning of PyTorch models, traced at the ATen level."""
from __future__ import annotations

from .api import ModelGraph as ModelGraph
from .api import trace as trace
from .export import load_pruned as load_pruned
from .groups import Group as Group
from .plan import Plan as Plan
from .pruner import Pruner as Pruner
from .pruner import StepReport as StepReport
from .specs import load_model as load_model

__all__ = ["trace", "ModelGraph", "Group", "Pruner", "StepReport", "Plan", "load_pruned",
           "load_model"]
