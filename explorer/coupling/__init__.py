"""Dimension coupling: element ids per tensor dim, rules per ATen op, and their resolution."""
