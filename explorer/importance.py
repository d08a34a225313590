"""Importance of every index of every axis of a group, aggregated over all its members.

A criterion maps (model, coupling, group) to one score array per axis; lower means less
important. Element scores of each member (a row of a Linear, a channel of a norm, a slice
of a fused qkv) are summed into every atom the element is made of, so a head's score is
the total over its q, k, v rows and its output-projection columns.

Add a criterion by decorating a function with ``@criterion("name")``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .coupling.analyze import Coupling
from .groups import Group

ElementScore = Callable[[torch.Tensor, int], torch.Tensor]
Criterion = Callable[[nn.Module, Coupling, Group], list[np.ndarray]]
CRITERIA: dict[str, Criterion] = {}


def criterion(name: str) -> Callable[[Criterion], Criterion]:
    def register(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn
    return register


def aggregate(model: nn.Module, coupling: Coupling, group: Group,
              element_score: ElementScore) -> list[np.ndarray]:
    """Sum per-element scores of every parameter member into the group's axes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    fams = [a.family for a in group.axes]
    scores = [np.zeros(a.size, dtype=np.float64) for a in group.axes]
    pos_of = {f: _positions(coupling, f) for f in fams}
    names = {m.param for m in group.members}
    for member, atoms in coupling.member_atoms():
        if member.param not in names or member.buffer:
            continue
        t = params.get(member.param)
        if t is None or t.device.type == "meta":
            continue
        elem = element_score(t.detach().float(), member.dim).cpu().numpy().astype(np.float64)
        for j in range(atoms.shape[1]):
            col = atoms[:, j]
            valid = col >= 0
            fam = np.where(valid, coupling.family_of[np.maximum(col, 0)], -1)
            for k, f in enumerate(fams):
                sel = fam == f
                if sel.any():
                    np.add.at(scores[k], pos_of[f][col[sel]], elem[sel])
    return scores


def _positions(coupling: Coupling, family: int) -> np.ndarray:
    pos = np.full(coupling.res.num_classes, -1, dtype=np.int64)
    atoms = coupling.family_atoms[family]
    pos[atoms] = np.arange(len(atoms))
    return pos


def _lp(p: float) -> ElementScore:
    def score(t: torch.Tensor, dim: int) -> torch.Tensor:
        dims = [d for d in range(t.dim()) if d != dim]
        return t.abs().pow(p).sum(dim=dims) if dims else t.abs().pow(p)
    return score


@criterion("magnitude")
def magnitude(model: nn.Module, coupling: Coupling, group: Group) -> list[np.ndarray]:
    """Group L2 norm: sum of squared weights over all members (per channel/head/dim)."""
    return aggregate(model, coupling, group, _lp(2.0))


@criterion("l1")
def l1(model: nn.Module, coupling: Coupling, group: Group) -> list[np.ndarray]:
    """Group L1 norm: sum of absolute weights over all members."""
    return aggregate(model, coupling, group, _lp(1.0))


@criterion("random")
def random(model: nn.Module, coupling: Coupling, group: Group) -> list[np.ndarray]:
    """Uniform random scores (seeded by group id): the baseline every criterion must beat."""
    rng = np.random.default_rng(group.id)
    return [rng.random(a.size) for a in group.axes]


def scores(name: str, model: nn.Module, coupling: Coupling, group: Group) -> list[np.ndarray]:
    """Scores of ``group`` under the criterion ``name``."""
    if name not in CRITERIA:
        raise ValueError(f"unknown importance '{name}'; choose one of {sorted(CRITERIA)}")
    return CRITERIA[name](model, coupling, group)
