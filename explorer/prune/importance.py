"""Importance of every index of every axis of a group, aggregated over all its members.

A criterion first prepares per-weight saliency tensors for the whole model (one pass over
the calibration data for data-aware criteria), then scores a group: the saliency of every
member element (a row of a Linear, a channel of a norm, a slice of a fused qkv) is summed
into every atom the element is made of, so a head's score is the total over its q, k, v rows
and its output-projection columns, and a hidden channel's score spans every layer it
touches. Lower means less important.

Criteria (name: saliency per weight):

* ``magnitude`` / ``l2``: w^2 (group L2 norm squared); ``l1``: |w|;
* ``taylor``: first-order |sum w * dL/dw| over the group (loss change estimate);
* ``fisher`` / ``obd``: second-order OBD, 0.5 * w^2 * F with the empirical Fisher
  F = sum over calibration samples of per-sample squared gradients (Hessian diagonal);
* ``activation``: structured Wanda, |W_ij| * ||X_j|| over the inputs of each consumer layer;
* ``bn-scale``: |gamma| of the BatchNorm members (network slimming);
* ``random``: the baseline.

Add one by subclassing `Criterion` and decorating it with ``@register("name")``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coupling.analyze import Coupling
from ..coupling.groups import Group
from .calibration import Calibration, compute_loss


class Criterion:
    """Base class: subclasses fill `saliency` in `prepare` (or override `scores`)."""

    needs_data = False
    signed = False  # sum signed saliencies, then take |.| per index (first-order Taylor)

    def __init__(self) -> None:
        self.saliency: dict[str, torch.Tensor] = {}
        self._reduced: dict[tuple[str, int], np.ndarray] = {}

    def prepare(self, model: nn.Module, coupling: Coupling, calib: Calibration | None) -> None:
        """Compute per-weight saliency tensors for the whole model."""

    def tensor(self, name: str) -> torch.Tensor | None:
        """The saliency of every weight of parameter ``name`` (None: not scored)."""
        return self.saliency.get(name)

    def element(self, name: str, dim: int) -> np.ndarray | None:
        """Saliency summed over every dim but ``dim`` (cached: members recur across groups)."""
        key = (name, dim)
        if key not in self._reduced:
            t = self.tensor(name)
            if t is None:
                return None
            dims = [d for d in range(t.dim()) if d != dim]
            self._reduced[key] = (t.sum(dim=dims) if dims else t).double().cpu().numpy()
        return self._reduced[key]

    def scores(self, model: nn.Module, coupling: Coupling, group: Group) -> list[np.ndarray]:
        """One score array per axis of ``group``."""
        out = aggregate(coupling, group, self.element)
        return [np.abs(s) for s in out] if self.signed else out


CRITERIA: dict[str, type[Criterion]] = {}


def register(*names: str) -> Callable[[type[Criterion]], type[Criterion]]:
    def deco(cls: type[Criterion]) -> type[Criterion]:
        for n in names:
            CRITERIA[n] = cls
        return cls
    return deco


def aggregate(coupling: Coupling, group: Group,
              element: Callable[[str, int], np.ndarray | None]) -> list[np.ndarray]:
    """Sum per-element saliencies (``element(param, dim)``) into the group's axes."""
    fams = [a.family for a in group.axes]
    scores = [np.zeros(a.size, dtype=np.float64) for a in group.axes]
    pos_of = {f: _positions(coupling, f) for f in fams}
    names = {m.param for m in group.members}
    for member, atoms in coupling.member_atoms():
        if member.param not in names:
            continue
        elem = element(member.param, member.dim)
        if elem is None:
            continue
        for j in range(atoms.shape[1]):
            col = atoms[:, j]
            fam = np.where(col >= 0, coupling.family_of[np.maximum(col, 0)], -1)
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


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)
            if p.device.type != "meta"}


@register("magnitude", "l2")
class Magnitude(Criterion):
    """Group L2 norm (squared): sum of w^2 over all members."""

    power = 2.0

    def prepare(self, model: nn.Module, coupling: Coupling, calib: Calibration | None) -> None:
        self._weights = _weights(model)  # saliency computed per parameter when asked
        self._reduced = {}

    def tensor(self, name: str) -> torch.Tensor | None:
        w = self._weights.get(name)
        return None if w is None else w.float().abs().pow(self.power)


@register("l1")
class L1(Magnitude):
    """Group L1 norm: sum of |w| over all members."""

    power = 1.0


@register("random")
class Random(Criterion):
    """Uniform random scores, seeded by group id: the baseline to beat."""

    def scores(self, model: nn.Module, coupling: Coupling, group: Group) -> list[np.ndarray]:
        rng = np.random.default_rng(group.id)
        return [rng.random(a.size) for a in group.axes]


@register("bn-scale")
class BNScale(Criterion):
    """|gamma| of BatchNorm members (zero for groups without one)."""

    def prepare(self, model: nn.Module, coupling: Coupling, calib: Calibration | None) -> None:
        self.saliency, self._reduced = {}, {}
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.weight is not None]
        if not norms:
            raise ValueError("importance 'bn-scale' scores channels by BatchNorm scales, and "
                             "the model has no affine BatchNorm layer; use 'magnitude' or a "
                             "data-aware criterion")
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None \
                    and m.weight.device.type != "meta":
                self.saliency[f"{name}.weight" if name else "weight"] = m.weight.detach().abs()


def _grads(model: nn.Module, calib: Calibration, per_sample: bool) -> dict[str, torch.Tensor]:
    """Sum of gradients (or of per-sample squared gradients) over the calibration data."""
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    with calibrating(model):
        _accumulate(model, calib, per_sample, params, saved, acc)
    return acc


def _accumulate(model: nn.Module, calib: Calibration, per_sample: bool,
                params: dict[str, nn.Parameter],
                saved: dict[str, tuple[bool, torch.Tensor | None]],
                acc: dict[str, torch.Tensor]) -> None:
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        items = calib.samples() if per_sample else [
            (b, calib.labels[i] if calib.labels else None) for i, b in enumerate(calib.batches)]
        for batch, label in items:
            with torch.enable_grad():
                loss = compute_loss(model, batch, calib, label)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _p), g in zip(params.items(), grads, strict=False):
                if g is not None:
                    acc[n] += g.float().pow(2) if per_sample else g.float()
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]


@contextmanager
def calibrating(model: nn.Module) -> Iterator[None]:
    """Eval mode for calibration passes, then every module's own mode and every buffer back.

    Eval mode keeps BatchNorm statistics still; buffers are also compared and restored after,
    for modules that update them in eval mode too.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(owner, name, b, b.detach().clone()) for owner in model.modules()
               for name, b in owner._buffers.items() if b is not None]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for owner, name, original, values in buffers:
            owner._buffers[name] = original
            if original.device.type != "meta" and not torch.equal(original, values):
                with torch.no_grad():
                    original.copy_(values)


@register("taylor")
class Taylor(Criterion):
    """First-order Taylor: |sum over the group of w * dL/dw| (estimated loss change)."""

    needs_data = True
    signed = True

    def prepare(self, model: nn.Module, coupling: Coupling, calib: Calibration | None) -> None:
        grads = _grads(model, _need(calib), False)
        self._reduced = {}
        self.saliency = {n: w.float() * grads[n] for n, w in _weights(model).items()
                         if n in grads}


@register("fisher", "obd", "hessian")
class Fisher(Criterion):
    """Second-order OBD saliency 0.5 * w^2 * F, F = sum of per-sample squared gradients."""

    needs_data = True

    def prepare(self, model: nn.Module, coupling: Coupling, calib: Calibration | None) -> None:
        fisher = _grads(model, _need(calib), True)
        self.fisher, self._reduced = fisher, {}
        self.saliency = {n: 0.5 * w.float().pow(2) * fisher[n] for n, w in _weights(model).items()
                         if n in fisher}


@register("activation", "wanda")
class Activation(Criterion):
    """Structured Wanda: |W_ij| * ||X_j|| on the input channels of every Linear/Conv."""

    needs_data = True

    def prepare(self, model: nn.Module, coupling: Coupling, calib: Calibration | None) -> None:
        calib = _need(calib)
        norms: dict[str, torch.Tensor] = {}
        handles = input_norm_hooks(model, norms)
        try:
            with torch.no_grad(), calibrating(model):
                for batch in calib.batches:
                    model(*batch, **calib.kwargs)
        finally:
            for h in handles:
                h.remove()
        self.saliency, self._reduced = {}, {}
        self.add_statistics(dict(model.named_modules()), norms)

    def add_statistics(self, modules: dict[str, nn.Module], norms: dict[str, torch.Tensor]
                       ) -> None:
        """Saliency of the consumers in ``modules`` (their weights loaded) from ``norms``,
        the per-input-channel sum of squares of their inputs. `prepare` calls it for the
        whole model; `explorer.prune.sequential` one decoder layer at a time."""
        for name, sq in norms.items():
            weight = modules[name].weight if name in modules else None
            if not isinstance(weight, torch.Tensor):
                continue
            w = weight.detach().float().abs()
            shape = [1] * w.dim()
            if w.shape[1] == sq.numel():
                shape[1] = -1
                self.saliency[f"{name}.weight" if name else "weight"] = w * sq.sqrt().view(shape)


CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers whose inputs are recorded


def input_norm_hooks(model: nn.Module, norms: dict[str, torch.Tensor],
                     prefix: str = "") -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks adding each consumer's per-input-channel sum of squares into ``norms``, keyed
    by its name (in ``model``, after ``prefix``: the name of ``model`` itself); the caller
    removes them."""
    return [m.register_forward_pre_hook(_act_hook(".".join(filter(None, (prefix, name))),
                                                  norms))
            for name, m in model.named_modules() if isinstance(m, CONSUMERS)]


def _act_hook(name: str, norms: dict[str, torch.Tensor]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        dim = x.dim() - 1 if isinstance(module, nn.Linear) else 1
        dims = [d for d in range(x.dim()) if d != dim]
        sq = x.pow(2).sum(dim=dims)
        norms[name] = norms[name] + sq if name in norms else sq
    return hook


def _need(calib: Calibration | None) -> Calibration:
    """Data-aware criteria get their batches from the caller (the Pruner makes random ones)."""
    if calib is None:
        raise ValueError("this criterion needs calibration data: pass calibration=... (random "
                         "inputs are made by the Pruner from its example inputs)")
    return calib


def make(name: str) -> Criterion:
    """A fresh criterion instance by name."""
    if name not in CRITERIA:
        raise ValueError(f"unknown importance '{name}'; choose one of {sorted(CRITERIA)}")
    return CRITERIA[name]()


def scores(name: str, model: nn.Module, coupling: Coupling, group: Group,
           calib: Calibration | None = None) -> list[np.ndarray]:
    """Scores of one group under the criterion ``name`` (prepares it for this call only)."""
    crit = make(name)
    crit.prepare(model, coupling, calib)
    return crit.scores(model, coupling, group)
