"""Importance of every index of every axis of a group, aggregated over all its members.

A criterion first prepares per-weight (or per-channel) saliencies for the whole model (one
pass over the calibration data for data-aware criteria), then scores a group: the saliency
of every member element (a row of a Linear, a channel of a norm, a slice of a fused qkv) is
summed into every atom the element is made of, so a head's score is the total over the
head's dims, and a hidden channel's score spans every layer it touches.

Data-aware criteria score the *removal* of a channel, and a channel is removed exactly when
the layers that read it stop reading it: they sum over the **consumer** members only (the
input columns ``W[:, j]`` of every Linear/Conv that reads channel ``j``; for a head, the
output projection's columns of the head's dims). The producer rows do not carry the same
information (zeroing them leaves the bias and the activation of the bias). An axis no layer
reads through a weight column (the q/k dims of attention, read by ``q @ k^T``; a model
output) is scored on its producers: zeroing the q and k rows and biases of a dim removes it
from every dot product exactly. Lower means less important.

Criteria (name: score of one index):

* ``magnitude`` / ``l2``: sum of w^2 over every member (group L2 norm squared, as in
  Torch-Pruning); ``l1``: sum of |w|;
* ``taylor``: first-order loss change of removing the index, per calibration sample s:
  |sum of w * dL_s/dw over the consumer columns| (= |sum over tokens of X_j * dL_s/dX_j|),
  summed over the samples;
* ``fisher`` / ``obd``: second-order (group Fisher / OBD): 0.5 * sum over calibration samples
  of (sum of w * dL_s/dw over the consumer columns)^2, the empirical-Fisher estimate of the
  loss change of removing the index. Without a model loss or labels (``loss="auto"`` on an
  encoder) L_s is the ``"output-probe"`` loss, so the score estimates the squared change of
  the model's output ||J_s d||^2 (see `explorer.prune.calibration`);
* ``activation`` / ``wanda``: structured Wanda / FLAP: ||X_j|| * ||W[:, j]|| summed over the
  consumers (input activation norm times consumer column norm); producer-scored axes use
  the Wanda row score sum_j |W_ij| ||X_j|| of the producers;
* ``bn-scale``: |gamma| of the BatchNorm members (network slimming);
* ``random``: the baseline.

Activation statistics and the ``output-norm`` loss skip padded tokens when the calibration
carries an attention mask (`Calibration.mask_index`).

Add one by subclassing `Criterion` and decorating it with ``@register("name")``.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coupling.analyze import Coupling
from ..coupling.groups import Group, Member
from ..graph.rng import evaluating
from .calibration import Calibration, batch_size, compute_loss, model_loss_applies
from .removal import Applied

Element = Callable[[str, int], "np.ndarray | None"]


class Criterion:
    """Base class: subclasses fill `saliency` in `prepare` (or override `element`/`scores`).

    ``removal_side`` criteria sum each axis over the members whose zeroing removes it
    exactly (the consumers, see the module docstring); the others over every member.
    """

    needs_data = False
    signed = False  # sum signed saliencies, then take |.| per index (first-order Taylor)
    removal_side = False
    layerwise = False  # has a layer-by-layer form (`explorer.prune.sequential`)
    general = True  # scores any model (``bn-scale`` needs BatchNorm layers)
    # `prepare` runs the calibration batches it is given through the model once each, in
    # order, without gradients: a pass a `explorer.prune.trajectory.Trajectory` can keep
    one_pass = False

    def __init__(self) -> None:
        # told how far `prepare`'s passes over the calibration batches are (a page's bar)
        self.progress: Callable[[float, str], None] | None = None
        self.saliency: dict[str, torch.Tensor] = {}
        self._reduced: dict[tuple[str, int], np.ndarray] = {}
        self._consumers: set[tuple[str, int]] = set()

    def prepare(self, model: nn.Module, coupling: Coupling, calib: Calibration | None) -> None:
        """Compute per-weight saliency tensors for the whole model."""

    def follow(self, model: nn.Module, applied: Sequence[Applied]) -> bool:
        """Score ``model`` after cuts from the statistics of an earlier `prepare`, without
        data: ``applied`` is every cut on the model's timeline, oldest first. False (the
        default) when a new `prepare` is needed."""
        return False

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
        if not self.removal_side:
            return [self.finish(s) for s in aggregate(coupling, group, self.element)[0]]
        if not self._consumers:
            self._consumers = consumer_members(model, coupling)
        consumer, covered = aggregate(coupling, group, self.element,
                                      lambda m: (m.param, m.dim) in self._consumers)
        producer, _ = aggregate(coupling, group, self.element,
                                lambda m: (m.param, m.dim) not in self._consumers)
        return [self.finish(c if ok else p)
                for c, p, ok in zip(consumer, producer, covered, strict=True)]

    def finish(self, summed: np.ndarray) -> np.ndarray:
        """Per-index score from the summed member saliencies."""
        return np.abs(summed) if self.signed else summed


CRITERIA: dict[str, type[Criterion]] = {}  # every name, aliases included, in registration order
_PRIMARY: list[str] = []  # the first name each criterion was registered under


def register(*names: str) -> Callable[[type[Criterion]], type[Criterion]]:
    def deco(cls: type[Criterion]) -> type[Criterion]:
        _PRIMARY.append(names[0])
        for n in names:
            CRITERIA[n] = cls
        return cls
    return deco


def criterion_names(*, aliases: bool = True, layerwise: bool = False, general: bool = False
                    ) -> tuple[str, ...]:
    """Registered criterion names, in registration order: the one list every caller reads.

    Args:
        aliases: also the other names of a criterion (``l2`` beside ``magnitude``).
        layerwise: only criteria with a layer-by-layer form (`explorer.prune.sequential`).
        general: only criteria that score any model (the teaching path's choice).
    """
    return tuple(n for n, cls in CRITERIA.items()
                 if (aliases or n in _PRIMARY) and (cls.layerwise or not layerwise)
                 and (cls.general or not general))


def lowest(scores: np.ndarray, n: int) -> list[int]:
    """The ``n`` indices with the lowest scores, ascending (ties: lower index first): the
    one ranking every proposal, step, sensitivity trial and chart of a cut reads."""
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:n])


def aggregate(coupling: Coupling, group: Group, element: Element,
              keep: Callable[[Member], bool] | None = None,
              ) -> tuple[list[np.ndarray], list[bool]]:
    """Sum per-element saliencies (``element(param, dim)``) into the group's axes.

    An element saliency is one value per index of the member dim, or a ``(size, samples)``
    array (one column per calibration sample); the sums have the same trailing shape.

    Args:
        coupling: the model's coupling.
        group: the group to score.
        element: the saliency of a member's elements (None: not scored).
        keep: only members for which this is true count (default: all).

    Returns:
        The score array of every axis, and whether any kept member reached that axis.
    """
    fams = [a.family for a in group.axes]
    scores: list[np.ndarray] = [np.zeros(0)] * len(fams)
    covered = [False] * len(fams)
    pos_of = {f: _positions(coupling, f) for f in fams}
    names = {m.param for m in group.members}
    tail: tuple[int, ...] | None = None
    for member, atoms in coupling.member_atoms():
        if member.param not in names or (keep is not None and not keep(member)):
            continue
        elem = element(member.param, member.dim)
        if elem is None:
            continue
        if tail is None:
            tail = elem.shape[1:]
            scores = [np.zeros((a.size, *tail), dtype=np.float64) for a in group.axes]
        for j in range(atoms.shape[1]):
            col = atoms[:, j]
            fam = np.where(col >= 0, coupling.family_of[np.maximum(col, 0)], -1)
            for k, f in enumerate(fams):
                sel = fam == f
                if sel.any():
                    np.add.at(scores[k], pos_of[f][col[sel]], elem[sel])
                    covered[k] = True
    if tail is None:
        scores = [np.zeros(a.size, dtype=np.float64) for a in group.axes]
    return scores, covered


def _positions(coupling: Coupling, family: int) -> np.ndarray:
    pos = np.full(coupling.res.num_classes, -1, dtype=np.int64)
    atoms = coupling.family_atoms[family]
    pos[atoms] = np.arange(len(atoms))
    return pos


def input_dim(module: nn.Module) -> int | None:
    """The weight dim indexed by the layer's input channels (None: not a weighted reader)."""
    if isinstance(module, nn.Linear):
        return 1
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return 0
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return 1 if module.groups == 1 else None  # a grouped conv's dim 1 is per group
    conv1d = _hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return 0  # transformers' Conv1D stores the weight as (in, out)
    return None


def _hf_conv1d() -> type[nn.Module] | None:
    import sys
    mod = sys.modules.get("transformers.pytorch_utils")  # only if the model already uses it
    return getattr(mod, "Conv1D", None) if mod is not None else None


def consumer_members(model: nn.Module, coupling: Coupling) -> set[tuple[str, int]]:
    """(parameter, dim) of every member that is the input side of a layer's weight."""
    modules = dict(model.named_modules())
    out: set[tuple[str, int]] = set()
    for member, _atoms in coupling.member_atoms():
        module = modules.get(member.module)
        if module is None or member.param != _qualified(member.module, "weight"):
            continue
        if input_dim(module) == member.dim and member.rank >= 2:
            out.add((member.param, member.dim))
    return out


def _qualified(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)
            if p.device.type != "meta"}


@register("magnitude", "l2")
class Magnitude(Criterion):
    """Group L2 norm (squared): sum of w^2 over all members."""

    power = 2.0

    def prepare(self, model: nn.Module, coupling: Coupling, calib: Calibration | None) -> None:
        self._weights = _weights(model)  # saliency computed per parameter when asked
        # a cut replaces the tensors it changes: the sums of every other one still hold, so
        # preparing again after a cut scores only the layers it changed
        params = dict(model.named_parameters(remove_duplicate=False))
        before = getattr(self, "_sources", {})
        same = {n for n, (p, version) in before.items()
                if n in params and params[n] is p and p._version == version}
        self._reduced = {key: v for key, v in self._reduced.items() if key[0] in same}
        self._sources: dict[str, tuple[nn.Parameter, int]] = {
            n: (p, p._version) for n, p in params.items()}

    def tensor(self, name: str) -> torch.Tensor | None:
        w = self._weights.get(name)
        return None if w is None else w.float().abs().pow(self.power)


@register("l1")
class L1(Magnitude):
    """Group L1 norm: sum of |w| over all members."""

    power = 1.0


@register("bn-scale")
class BNScale(Criterion):
    """|gamma| of BatchNorm members (zero for groups without one)."""

    general = False

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
                self.saliency[_qualified(name, "weight")] = m.weight.detach().abs()


@contextmanager
def _gradients_on(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """Every parameter requires grad, in eval mode (`calibrating`); all restored on exit."""
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    try:
        with calibrating(model):
            for p in params.values():
                p.requires_grad_(True)
                p.grad = None
            yield params
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]


def _no_cache(model: nn.Module) -> list[Any]:
    """Turn off ``use_cache`` in every config object the model's modules hold (a transformers
    model built by the caller caches keys and values by default; the library's loader turns
    it off); returns the configs changed, for the caller to turn back on."""
    changed: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in changed and \
                getattr(config, "use_cache", None) is True:
            config.use_cache = False
            changed[id(config)] = config
    return list(changed.values())


@contextmanager
def calibrating(model: nn.Module) -> Iterator[None]:
    """Eval mode for calibration passes, then every module's own mode and every buffer back.

    Eval mode keeps BatchNorm statistics still; buffers are also compared and restored after,
    for modules that update them in eval mode too. The passes draw from a fork of torch's
    random state (`graph.rng.evaluating`), so the caller's is unchanged. They keep no
    key/value cache (`_no_cache`): a layer's captured inputs are run again, and a cache among
    them would grow with every run.
    """
    buffers = [(owner, name, b, b.detach().clone()) for owner in model.modules()
               for name, b in owner._buffers.items() if b is not None]
    caching = _no_cache(model)
    try:
        with evaluating(model):
            yield
    finally:
        for config in caching:
            config.use_cache = True
        for owner, name, original, values in buffers:
            owner._buffers[name] = original
            if original.device.type != "meta" and not torch.equal(original, values):
                with torch.no_grad():
                    original.copy_(values)


def _reduce(t: torch.Tensor, dim: int) -> torch.Tensor:
    dims = [d for d in range(t.dim()) if d != dim]
    return t.sum(dim=dims) if dims else t


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)


def _first_order(model: nn.Module, calib: Calibration) -> dict[tuple[str, int], np.ndarray]:
    """(weight, dim) -> (channels, samples): first-order loss change of removing a channel.

    For the input dim of a layer: sum over tokens of X_j * dL_s/dX_j, X being that layer's
    own input (= sum of w * dL_s/dw over the column ``W[:, j]``); for its output dim: the
    same with the output Y_i (= zeroing row i and its bias). One backward per batch gives
    every sample's terms, since samples do not interact in eval mode; the rows of a layer
    called on flattened (samples * tokens, channels) inputs count as samples.
    `explorer.prune.sequential` computes the same terms one decoder layer at a time.
    """
    terms: dict[tuple[str, int], torch.Tensor] = {}  # of the current batch
    current: list[torch.Tensor | None] = [None]
    handles = first_order_hooks(model, terms, current)
    columns: dict[tuple[str, int], list[torch.Tensor]] = {}
    samples = 0
    try:
        with _gradients_on(model):
            for i, batch in enumerate(calib.batches):
                current[0] = calib.token_mask(batch)
                label = calib.labels[i] if calib.labels else None
                terms.clear()
                with torch.enable_grad():
                    loss = compute_loss(model, batch, calib, label, seed=i)
                    torch.autograd.backward(loss)
                samples += batch_size(batch)
                for key, t in terms.items():
                    columns.setdefault(key, []).append(t)
    finally:
        for h in handles:
            h.remove()
    return per_sample_terms(columns, samples)


def per_sample_terms(columns: dict[tuple[str, int], list[torch.Tensor]], samples: int,
                     ) -> dict[tuple[str, int], np.ndarray]:
    """(weight, dim) -> (channels, samples) from each batch's (samples, channels) terms, in
    batch order, float32 (or float64 when computed so); keys whose rows are not samples are
    left out. Empties ``columns`` (each key's batches are released once converted)."""
    out: dict[tuple[str, int], np.ndarray] = {}
    for key in list(columns):
        terms = torch.cat(columns.pop(key), dim=0).T
        # kept in float32 (half the memory: a 70B at 128 samples holds 13 M channels x 128);
        # read back as float64 (`_FirstOrder.element`), the exact values of float64 now
        if terms.dtype != torch.float64:
            terms = terms.float()
        if terms.shape[1] == samples:  # else its rows are not samples
            out[key] = terms.cpu().numpy()
    return out


def first_order_hooks(model: nn.Module, terms: dict[tuple[str, int], torch.Tensor],
                      current: list[torch.Tensor | None], prefix: str = "",
                      seen: list[torch.Tensor] | None = None,
                      ) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks adding the first-order terms of every weighted layer of ``model`` (named after
    ``prefix``) into ``terms`` on backward; ``current[0]`` is the batch's token mask, and
    ``seen``, when given, collects the tensors whose gradients the terms read (to ask
    `torch.autograd.grad` for them). The caller removes the hooks."""
    handles = []
    for name, m in model.named_modules():
        dim = input_dim(m)
        if dim is not None or isinstance(m, _CONVS):
            out_dim = 0 if dim is None else 1 - dim
            weight = _qualified(".".join(filter(None, (prefix, name))), "weight")
            handles.append(m.register_forward_pre_hook(
                _alias_input(weight, dim, terms, current, seen)))
            handles.append(m.register_forward_hook(_watch_output(weight, out_dim, terms,
                                                                 current, seen)))
    return handles


def _alias_input(weight: str, dim: int | None, terms: dict[tuple[str, int], torch.Tensor],
                 current: list[torch.Tensor | None],
                 seen: list[torch.Tensor] | None = None) -> Callable[..., Any]:
    """Give the layer its own view of its input, so the gradient is its alone."""
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if dim is None or not args or not isinstance(args[0], torch.Tensor) or \
                not args[0].requires_grad:
            return None
        x = args[0].view_as(args[0])
        _record(x, (weight, dim), not isinstance(module, _CONVS), terms, current[0], seen)
        return (x, *args[1:])
    return hook


def _watch_output(weight: str, dim: int, terms: dict[tuple[str, int], torch.Tensor],
                  current: list[torch.Tensor | None],
                  seen: list[torch.Tensor] | None = None) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            _record(output, (weight, dim), not isinstance(module, _CONVS), terms, current[0],
                    seen)
    return hook


def _record(t: torch.Tensor, key: tuple[str, int], channels_last: bool,
            terms: dict[tuple[str, int], torch.Tensor], mask: torch.Tensor | None,
            seen: list[torch.Tensor] | None = None) -> None:
    """On backward, add sum over tokens of t * dL/dt per (sample, channel) to ``terms``.

    A layer called several times in one forward adds up its calls (removing a channel
    removes it from every call).
    """
    value = t.detach()

    def on_grad(grad: torch.Tensor) -> None:
        prod = (value * grad).float()
        if channels_last:
            if mask is not None and prod.dim() >= 3 and tuple(prod.shape[:2]) == \
                    tuple(mask.shape):
                prod = prod * mask.unsqueeze(-1).to(prod.dtype)
            prod = prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1) if prod.dim() > 2 \
                else prod.reshape(-1, prod.shape[-1])
        else:
            prod = prod.reshape(prod.shape[0], prod.shape[1], -1).sum(-1)
        old = terms.get(key)
        terms[key] = prod if old is None or old.shape != prod.shape else old + prod
    t.register_hook(on_grad)  # type: ignore[no-untyped-call]
    if seen is not None:
        seen.append(t)


class _FirstOrder(Criterion):
    """Per-sample first-order terms of removing each channel (see `_first_order`)."""

    needs_data = True
    removal_side = True
    layerwise = True
    per_sample: dict[tuple[str, int], np.ndarray]

    def prepare(self, model: nn.Module, coupling: Coupling, calib: Calibration | None) -> None:
        self.per_sample = _first_order(model, self.loss_for(model, _need(calib)))
        self._reduced, self._consumers = {}, set()

    def loss_for(self, model: nn.Module, calib: Calibration) -> Calibration:
        """The calibration (and loss) the terms are computed on."""
        return calib

    def element(self, name: str, dim: int) -> np.ndarray | None:
        terms = self.per_sample.get((name, dim))
        return None if terms is None else terms.astype(np.float64)  # exact from float32


@register("activation", "wanda")
class Activation(Criterion):
    """Structured Wanda: ||X_j|| * ||W[:, j]|| over the consumers of every channel."""

    needs_data = True
    one_pass = True
    removal_side = True
    layerwise = True

    def prepare(self, model: nn.Module, coupling: Coupling, calib: Calibration | None) -> None:
        norms = activation_norms(model, _need(calib), self.progress)
        self._layers = list(norms)
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}
        # layer -> (its weight, its norms, the scores they gave): `follow` re-scores a layer
        # only when a cut replaced one of them (the rest of the model scores as before)
        self._made: dict[str, tuple[weakref.ref[torch.Tensor], torch.Tensor,
                                    dict[tuple[str, int], np.ndarray]]] = {}
        self._score(dict(model.named_modules()), norms)

    def follow(self, model: nn.Module, applied: Sequence[Applied]) -> bool:
        """The input norms measured by `prepare`, carried through the cuts: a layer's kept
        input channels keep their norms (the one-shot reading of structured Wanda: the
        statistics of the model before the cuts), so an accept in the app scores without a
        calibration pass. False when a layer's norms cannot be traced to a measurement."""
        modules = dict(model.named_modules())
        norms: dict[str, torch.Tensor] = {}
        for name in getattr(self, "_layers", []):
            module = modules.get(name)
            weight = getattr(module, "weight", None)
            dim = input_dim(module) if module is not None else None
            if not isinstance(weight, torch.Tensor) or dim is None:
                return False
            sq = self._known(weight)
            if sq is None:
                sq = self._carried(_qualified(name, "weight"), dim, applied)
            if sq is None or sq.numel() != weight.shape[dim]:
                return False
            norms[name] = sq
        if not norms:
            return False
        self._score(modules, norms)
        return True

    def _score(self, modules: dict[str, nn.Module], norms: dict[str, torch.Tensor]) -> None:
        """Scores from ``norms``; a layer whose weight and norms are the very tensors it was
        last scored from keeps its scores (on SmolLM2 an accept changes 3 of 211 layers)."""
        self.saliency, self._reduced, self._consumers = {}, {}, set()
        weights: dict[str, torch.Tensor] = {}
        fresh: dict[str, torch.Tensor] = {}
        for name, sq in norms.items():  # remembered by weight tensor: an undo finds them
            weight = getattr(modules.get(name), "weight", None)
            if not isinstance(weight, torch.Tensor):
                fresh[name] = sq
                continue
            weights[name] = weight
            self._seen[id(weight)] = (weakref.ref(weight), sq)
            hit = self._made.get(name)
            if hit is not None and hit[0]() is weight and hit[1] is sq:
                self._reduced.update(hit[2])
            else:
                fresh[name] = sq
        self.add_statistics(modules, fresh)
        made = {}
        for name, weight in weights.items():
            key = _qualified(name, "weight")
            made[name] = (weakref.ref(weight), norms[name],
                          {k: self._reduced[k] for k in ((key, 0), (key, 1)) if k in self._reduced})
        self._made = made

    def _known(self, weight: torch.Tensor) -> torch.Tensor | None:
        hit = self._seen.get(id(weight))
        return hit[1] if hit is not None and hit[0]() is weight else None

    def _carried(self, key: str, dim: int, applied: Sequence[Applied]) -> torch.Tensor | None:
        """The input norms of parameter ``key`` after the cuts: from the last tensor it
        replaced whose norms are known, the kept indices of each later cut taken."""
        sq: torch.Tensor | None = None
        for cut in applied:
            if key not in cut.previous:
                continue
            old = cut.previous[key]
            known = self._known(old) if old is not None else None
            sq = known if known is not None else sq
            kept = cut.keeps.get((key, dim))
            if sq is not None and kept is not None:
                sq = sq[torch.as_tensor(kept, dtype=torch.long)]
        return sq

    def add_statistics(self, modules: dict[str, nn.Module], norms: dict[str, torch.Tensor]
                       ) -> None:
        """Scores of the layers in ``modules`` (weights loaded) from ``norms``, the
        per-input-channel sum of squares of their inputs. `prepare` calls it for the whole
        model; `explorer.prune.sequential` one decoder layer at a time.

        Input channel j of a layer: ||X_j|| * ||W[:, j]||. Output channel i (used where no
        layer reads the channel through a weight, e.g. q/k dims): sum_j |W_ij| ||X_j||, the
        Wanda bound on the produced activation's norm.
        """
        for name, sq in norms.items():
            module = modules.get(name)
            weight = getattr(module, "weight", None) if module is not None else None
            dim = input_dim(module) if module is not None else None
            if not isinstance(weight, torch.Tensor) or dim is None or \
                    weight.shape[dim] != sq.numel():
                continue
            w = weight.detach().float()
            norm = sq.sqrt().to(w.device)
            key = _qualified(name, "weight")
            self._reduced[(key, dim)] = (norm * _reduce(w.pow(2), dim).sqrt()).double().cpu() \
                .numpy()
            out_dim = 1 - dim
            rows = w.abs().movedim(out_dim, 0).movedim(dim if dim else 1, 1)
            rows = rows.reshape(rows.shape[0], rows.shape[1], -1).sum(-1)  # kernel taps summed
            self._reduced[(key, out_dim)] = (rows @ norm).double().cpu().numpy()

    def element(self, name: str, dim: int) -> np.ndarray | None:
        return self._reduced.get((name, dim))


@register("taylor")
class Taylor(_FirstOrder):
    """First-order Taylor: sum over samples of |sum over consumer columns of w * dL_s/dw|."""

    def finish(self, summed: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.abs(summed).sum(axis=-1)
        return out


@register("fisher", "obd", "hessian")
class Fisher(_FirstOrder):
    """Group Fisher: 0.5 * sum over samples of (sum over consumer columns of w * dL_s/dw)^2."""

    def loss_for(self, model: nn.Module, calib: Calibration) -> Calibration:
        if calib.loss == "auto" and not model_loss_applies(model, calib.batches[0]):
            return replace(calib, loss="output-probe")  # the curvature of the output itself
        return calib

    def finish(self, summed: np.ndarray) -> np.ndarray:
        out: np.ndarray = 0.5 * np.square(summed).sum(axis=-1)
        return out


@register("random")
class Random(Criterion):
    """Uniform random scores, seeded by group id (and `seed`): the baseline to beat."""

    seed = 0  # set on an instance to draw another baseline

    def scores(self, model: nn.Module, coupling: Coupling, group: Group) -> list[np.ndarray]:
        rng = np.random.default_rng(group.id if self.seed == 0 else (self.seed, group.id))
        return [rng.random(a.size) for a in group.axes]


CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers whose inputs are recorded


def input_norm_hooks(model: nn.Module, norms: dict[str, torch.Tensor], prefix: str = "",
                     mask: list[torch.Tensor | None] | None = None,
                     ) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks adding each consumer's per-input-channel sum of squares into ``norms``, keyed
    by its name (in ``model``, after ``prefix``: the name of ``model`` itself); the caller
    removes them. ``mask[0]``, when given, is the current batch's token mask (padding left
    out)."""
    current: list[torch.Tensor | None] = mask if mask is not None else [None]
    return [m.register_forward_pre_hook(_act_hook(".".join(filter(None, (prefix, name))),
                                                  norms, current))
            for name, m in model.named_modules()
            if isinstance(m, CONSUMERS) or input_dim(m) is not None]


def _act_hook(name: str, norms: dict[str, torch.Tensor],
              current: list[torch.Tensor | None]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        sq = _channel_energy(x, not isinstance(module, _CONVS), current[0])
        norms[name] = norms[name] + sq if name in norms else sq
    return hook


def activation_norms(model: nn.Module, calib: Calibration,
                     progress: Callable[[float, str], None] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Layer -> sum of X_j^2 per input channel over the calibration batches (real tokens)."""
    norms: dict[str, torch.Tensor] = {}
    current: list[torch.Tensor | None] = [None]
    calibration_pass(model, calib, input_norm_hooks(model, norms, mask=current), current,
                     progress)
    return norms


def calibration_pass(model: nn.Module, calib: Calibration,
                     handles: list[torch.utils.hooks.RemovableHandle],
                     current: list[torch.Tensor | None],
                     progress: Callable[[float, str], None] | None = None) -> None:
    """Run every calibration batch (no grad, eval, modes and buffers restored after), with
    ``current[0]`` holding the batch's token mask for the hooks; ``handles`` are removed.
    ``progress`` is told the fraction done before each batch."""
    handles = list(handles)
    try:
        handles += _stop_at_output(model)  # after the caller's hooks: theirs run first
        with torch.no_grad(), calibrating(model):
            for i, batch in enumerate(calib.batches):
                if progress is not None:
                    progress(i / len(calib.batches), f"calibration batch {i + 1} of "
                                                     f"{len(calib.batches)}")
                current[0] = calib.token_mask(batch)
                with suppress(_Stopped):
                    model(*batch, **calib.kwargs)
    finally:
        for h in handles:
            h.remove()


class _Stopped(Exception):  # noqa: N818 - control flow, never escapes `calibration_pass`
    pass


def _stop_at_output(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """A hook ending a calibration forward once the output layer has its input (its hooks
    ran): nobody reads what a pass returns, and a language model's vocabulary logits are the
    largest tensor of the forward (a batch of 8 x 128 tokens x 49k ids: 200 MB in float32).
    The output layer is the one transformers names (``get_output_embeddings``); none for
    other models, whose forward runs to the end."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        return []

    def stop(_m: nn.Module, _args: tuple[Any, ...]) -> None:
        raise _Stopped

    return [head.register_forward_pre_hook(stop)]


def _channel_energy(t: torch.Tensor, channels_last: bool,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of squares per channel over every other dim, real tokens only."""
    if channels_last:
        t = t.reshape(-1, t.shape[-1]) if mask is None else _real_tokens(t, mask)
        return t.pow(2).sum(dim=0)
    dims = [d for d in range(t.dim()) if d != 1]
    return t.pow(2).sum(dim=dims)


def _real_tokens(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(tokens, channels) rows of a channels-last activation whose token is not padding."""
    if t.dim() >= 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask].reshape(-1, t.shape[-1])
    flat = t.reshape(-1, t.shape[-1])
    if flat.shape[0] == mask.numel():
        return flat[mask.reshape(-1)]
    return flat


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
