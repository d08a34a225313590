"""Renderers: read a traced `ModelGraph` (and session records) and draw them; never mutate."""
from __future__ import annotations

from .dot import dot_to_svg as dot_to_svg
from .dot import graph_to_dot as graph_to_dot

__all__ = ["graph_to_dot", "dot_to_svg"]
