"""Quality of pruned models on held-out data: perplexity, cosine similarity, KL, top-1."""
from __future__ import annotations

from .evaluate import Quality as Quality
from .evaluate import evaluate as evaluate
from .probe import QualityProbe as QualityProbe
from .task import Metric as Metric
from .task import Task as Task
from .task import infer_task as infer_task

__all__ = ["Metric", "Quality", "QualityProbe", "Task", "evaluate", "infer_task"]
