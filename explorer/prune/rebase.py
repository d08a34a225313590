"""Re-basing attention heads before a head-dim cut, so the cut dims carry the least energy.

A head-dim cut removes the *same* dim indices from every head (the reshape to
``(heads, head_dim)`` needs equal widths), although dim 3 of one head has nothing to do with
dim 3 of another; and inside a head the channels are an arbitrary basis. Both are free to
change without changing the model:

* q/k dims: ``q . k`` is unchanged by ``q -> T q``, ``k -> T^-T k`` for any invertible ``T``.
  The balanced basis (``T`` making the second moments of q and k both equal to one diagonal
  ``S``, from their Cholesky factors and the SVD of ``R_k^T R_q``) orders the dims by
  ``S_i^2``, dim i's share of the energy of the attention logits on the calibration data.
* v/out dims: ``out(A v)`` is unchanged by ``v -> N v``, ``W_out -> W_out N^-1``. With
  ``C = L L^T`` the second moment of the output projection's input (the attention context)
  per head and ``W_out L = U S V^T``, ``N = V^T L^-1`` orders the dims by ``S_i^2``, dim
  i's share of the output energy (the truncated SVD is the best cut of that layer's output).

Each head is re-based, its dims ordered by that energy and permuted so the least energetic
ones sit at the indices the removal cuts; the cut then removes the least of every head. The
weights change, the function does not: a forward on calibration data checks it, and a
head whose layout is not the plain one (fused qkv slices, GQA, rotary or norms between the
projection and the product) is left as it is. Used by `explorer.prune.compensate`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..coupling.analyze import Coupling
from ..coupling.groups import Group, Member
from ..coupling.vocab import AxisRole
from .removal import Removal, set_tensor

RIDGE = 1e-6  # relative ridge on second moments before a Cholesky factor


@dataclass(frozen=True)
class Side:
    """One Linear on one side of a head-dim axis: which of its weight rows or columns hold
    each (head, dim)."""

    module: str
    index: np.ndarray  # (heads, dims): weight row (or column) of every (head, dim)
    columns: bool  # True: the layer reads the dims (output projection); False: writes them


@dataclass(frozen=True)
class HeadAxis:
    """A head-dim axis to re-base: two writers (q/k) or a writer and a reader (v/out)."""

    group: int
    axis: int
    sides: tuple[Side, Side]
    removed: np.ndarray  # dim indices the removal cuts (the same in every head)

    @property
    def bilinear(self) -> bool:
        """q/k: both sides write the dims, a dot product reads them."""
        return not self.sides[1].columns


def head_axes(model: nn.Module, coupling: Coupling, removal: Removal) -> list[HeadAxis]:
    """The head-dim axes ``removal`` cuts whose layout this module can re-base."""
    atoms = dict(coupling.member_atoms())
    out: list[HeadAxis] = []
    for (gid, axis), idx in sorted(removal.picks.items()):
        group = coupling.groups[gid]
        if not idx or group.axes[axis].role is not AxisRole.HEAD_DIM:
            continue
        sides = _sides(model, coupling, group, axis, atoms)
        if sides is not None:
            out.append(HeadAxis(gid, axis, sides, np.asarray(sorted(set(idx)), np.int64)))
    return out


def _sides(model: nn.Module, coupling: Coupling, group: Group, axis: int,
           atoms: Mapping[Member, np.ndarray]) -> tuple[Side, Side] | None:
    """The two Linear sides of a plain head-dim axis, or None for any other layout."""
    heads = [a.family for a in group.axes if a.role is AxisRole.HEADS]
    dims = group.axes[axis].family
    if len(heads) != 1:
        return None
    found: dict[tuple[str, bool], np.ndarray] = {}
    biases: dict[str, np.ndarray] = {}
    for member, fams in coupling.members_of(group):
        if dims not in fams:
            continue
        owner, _, attr = member.param.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if not isinstance(module, nn.Linear) or attr not in ("weight", "bias"):
            return None
        table = _head_table(coupling, atoms[member], heads[0], dims)
        if table is None:
            return None
        if attr == "bias":
            biases[owner] = table
        else:
            found[(owner, member.dim == 1)] = table
    sides = [Side(m, t, cols) for (m, cols), t in found.items()]
    writers = [s for s in sides if not s.columns]
    readers = [s for s in sides if s.columns]
    if any(not np.array_equal(biases[s.module], s.index) for s in writers if s.module in biases):
        return None
    if len(writers) == 2 and not readers:
        return writers[0], writers[1]
    if len(writers) == 1 and len(readers) == 1:
        return writers[0], readers[0]
    return None


def _head_table(coupling: Coupling, atoms: np.ndarray, heads: int, dims: int
                ) -> np.ndarray | None:
    """(heads, dims) -> index along the member dim, when every index is exactly one
    (head, dim) pair of those two families; else None."""
    if atoms.ndim != 2 or atoms.shape[1] != 2 or (atoms < 0).any():
        return None
    fams = coupling.family_of[atoms]
    if not ((fams == [heads, dims]).all(axis=1).all() or
            (fams == [dims, heads]).all(axis=1).all()):
        return None
    h_col, d_col = (0, 1) if fams[0, 0] == heads else (1, 0)
    h_pos = _positions(coupling, heads)[atoms[:, h_col]]
    d_pos = _positions(coupling, dims)[atoms[:, d_col]]
    n_h, n_d = len(coupling.family_atoms[heads]), len(coupling.family_atoms[dims])
    if len(atoms) != n_h * n_d:
        return None
    table = np.full((n_h, n_d), -1, dtype=np.int64)
    table[h_pos, d_pos] = np.arange(len(atoms))
    return None if (table < 0).any() else table


def _positions(coupling: Coupling, family: int) -> np.ndarray:
    pos = np.full(coupling.res.num_classes, -1, dtype=np.int64)
    pos[coupling.family_atoms[family]] = np.arange(len(coupling.family_atoms[family]))
    return pos


def transforms(axis: HeadAxis, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               grams: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per head, the (first side, second side) matrices, energy ordered and permuted so the
    least energetic dims land on ``axis.removed``.

    Args:
        axis: the axis.
        weights: module -> (weight, bias) in float64 (bias zeros for a layer without one).
        grams: module -> the second moment of its ``[input; 1]`` over the calibration tokens.

    Returns:
        For a bilinear axis ``(T, T^-T)`` applied to both sides' rows; for v/out
        ``(N, N^-1)``, N applied to the writer's rows and N^-1 to the reader's columns.
    """
    first, second = axis.sides
    n_dims = first.index.shape[1]
    kept = np.setdiff1d(np.arange(n_dims), axis.removed)
    place = torch.as_tensor(np.concatenate([kept, axis.removed]))
    perm = torch.zeros(n_dims, n_dims, dtype=torch.float64)
    perm[place, torch.arange(n_dims)] = 1.0  # direction j (by energy) -> index place[j]
    out = []
    for h in range(first.index.shape[0]):
        if axis.bilinear:
            t = _balanced(_moment(weights[first.module], grams[first.module], first.index[h]),
                          _moment(weights[second.module], grams[second.module],
                                  second.index[h]))
            t = perm @ t
            out.append((t, torch.linalg.inv(t).T))
        else:
            w_out = weights[second.module][0][:, torch.as_tensor(second.index[h])]
            idx = torch.as_tensor(second.index[h])
            n = perm @ _whitened(w_out, grams[second.module][idx][:, idx])
            out.append((n, torch.linalg.inv(n)))
    return out


def _moment(wb: tuple[torch.Tensor, torch.Tensor], gram: torch.Tensor,
            rows: np.ndarray) -> torch.Tensor:
    """Second moment of the layer's outputs ``rows`` from the moment of ``[input; 1]``."""
    idx = torch.as_tensor(rows)
    aug = torch.cat([wb[0][idx], wb[1][idx].unsqueeze(1)], dim=1)
    return aug @ gram @ aug.T


def _factor(c: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(len(c), dtype=c.dtype)
    chol: torch.Tensor = torch.linalg.cholesky(c + RIDGE * float(torch.trace(c)) / len(c) * eye)
    return chol


def _balanced(c_first: torch.Tensor, c_second: torch.Tensor) -> torch.Tensor:
    """T with T C1 T^T = T^-T C2 T^-1 = S diagonal, descending."""
    r1, r2 = _factor(c_first), _factor(c_second)
    u, s, _vt = torch.linalg.svd(r2.T @ r1)
    t: torch.Tensor = torch.diag(s.clamp_min(1e-300).rsqrt()) @ u.T @ r2.T
    return t


def _whitened(w_out: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """N = V^T L^-1 from W_out L = U S V^T, C = L L^T (dims in descending S)."""
    chol = _factor(c)
    _u, _s, vt = torch.linalg.svd(w_out @ chol)
    n: torch.Tensor = vt @ torch.linalg.inv(chol)
    return n


@dataclass
class Rebased:
    """What `rebase` changed."""

    previous: dict[str, torch.Tensor]  # parameter name -> the tensor it replaced
    # reader module -> B (float64, inputs + 1 square): its new input is ``B [x; 1]``, so its
    # input statistics follow without another pass (sum -> B sum, moment -> B G B^T)
    input_bases: dict[str, torch.Tensor]


def rebase(model: nn.Module, axes: list[HeadAxis], grams: Mapping[str, torch.Tensor]
           ) -> Rebased:
    """Re-base every head of ``axes`` in place (all transforms computed first).

    The caller checks the model's outputs and puts ``previous`` back if they moved.

    Raises:
        torch.linalg.LinAlgError: if a second moment is singular beyond the ridge.
    """
    modules = {s.module for a in axes for s in a.sides}
    dense = {m: _dense(model.get_submodule(m)) for m in modules}
    new = {m: (w.clone(), b.clone()) for m, (w, b) in dense.items()}
    bases: dict[str, torch.Tensor] = {}
    for axis in axes:
        first, second = axis.sides
        for h, (a, b) in enumerate(transforms(axis, dense, grams)):
            _rows(new[first.module], first.index[h], a)
            if second.columns:
                idx = torch.as_tensor(second.index[h])
                new[second.module][0][:, idx] = dense[second.module][0][:, idx] @ b
                width = dense[second.module][0].shape[1] + 1
                basis = bases.setdefault(second.module, torch.eye(width, dtype=torch.float64))
                basis[idx.unsqueeze(1), idx] = a  # the head's context is re-based like v
            else:
                _rows(new[second.module], second.index[h], b)
    previous: dict[str, torch.Tensor] = {}
    for m, (w, b) in new.items():
        module = model.get_submodule(m)
        for attr, value in (("weight", w), ("bias", b)):
            old = module._parameters.get(attr)
            if old is None:
                continue
            previous[f"{m}.{attr}"] = old
            set_tensor(model, f"{m}.{attr}", nn.Parameter(value.to(old.dtype).contiguous(),
                                                          requires_grad=old.requires_grad))
    return Rebased(previous, bases)


def _rows(wb: tuple[torch.Tensor, torch.Tensor], rows: np.ndarray, t: torch.Tensor) -> None:
    idx = torch.as_tensor(rows)
    wb[0][idx] = t @ wb[0][idx]
    wb[1][idx] = t @ wb[1][idx]


def _dense(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) in float64; a zero bias for a layer without one."""
    weight = module._parameters["weight"]
    bias = module._parameters.get("bias")
    if weight is None:
        raise ValueError(f"{type(module).__name__} has no weight to re-base")
    w = weight.detach().double()
    return w, (bias.detach().double() if bias is not None
               else torch.zeros(w.shape[0], dtype=torch.float64))
