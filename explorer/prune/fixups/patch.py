"""Bring module attributes in line with pruned parameter shapes, one handler per type.

After pruning, ``nn.Linear.in_features``, ``Conv2d.groups``, ``LayerNorm.normalized_shape``
and head counts of attention modules would still hold the old widths; the forward of many
modules reads them. Handlers are looked up by module type (most derived first).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

Patcher = Callable[[nn.Module, "PatchInfo"], None]


@dataclass
class PatchInfo:
    """What a handler may need besides the module's own (already resized) tensors."""

    groups: int | None = None  # new conv/norm group count when its group axis was pruned
    changed: dict[str, list[object]] = field(default_factory=dict)  # attr -> [old, new]

    def set(self, module: nn.Module, attr: str, value: object) -> None:
        old = getattr(module, attr, None)
        if old != value:
            setattr(module, attr, value)
            first = self.changed.get(attr, [old])[0]
            self.changed[attr] = [first, value]


PATCHERS: dict[type, Patcher] = {}

# Every attribute a handler below sets, and the tuple-valued ones among them (plans may set
# only these; `explorer.io.plan_rules`). Keep in line with the handlers.
WRITES = frozenset({"out_features", "in_features", "groups", "out_channels", "in_channels",
                    "num_features", "normalized_shape", "num_groups", "num_channels",
                    "num_embeddings", "embedding_dim", "input_size", "hidden_size",
                    "embed_dim", "kdim", "vdim", "head_dim", "nx", "nf", "shape"})
TUPLE_WRITES = frozenset({"normalized_shape", "shape"})


def tensor_attr(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` as a tensor (``nn.Module.__getattr__`` is typed as a union)."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is not a tensor")
    return value


def int_attr(module: nn.Module, name: str) -> int:
    """``module.<name>`` as an int (a width or count attribute)."""
    value = getattr(module, name)
    if not isinstance(value, int):
        raise TypeError(f"{type(module).__name__}.{name} is not an int")
    return value


def patcher(*types: type) -> Callable[[Patcher], Patcher]:
    def register(fn: Patcher) -> Patcher:
        for t in types:
            PATCHERS[t] = fn
        return fn
    return register


def patch_module(module: nn.Module, info: PatchInfo) -> None:
    """Run the handler for the most derived registered type of ``module``."""
    _register_optional()
    for cls in type(module).__mro__:
        fn = PATCHERS.get(cls)
        if fn is not None:
            fn(module, info)
            return


def has_patcher(module: nn.Module) -> bool:
    """Whether a handler of `PATCHERS` keeps this module's attributes (its type's own)."""
    _register_optional()
    return any(cls in PATCHERS for cls in type(module).__mro__)


@patcher(nn.Linear)
def _linear(m: nn.Module, info: PatchInfo) -> None:
    w = tensor_attr(m, "weight")
    info.set(m, "out_features", w.shape[0])
    info.set(m, "in_features", w.shape[1])


@patcher(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d)
def _conv(m: nn.Module, info: PatchInfo) -> None:
    """A convolution's weight is (out, in / groups, ...); a transposed one's (in, out /
    groups, ...)."""
    if info.groups is not None:
        info.set(m, "groups", info.groups)
    w = tensor_attr(m, "weight")
    first, second = ("in_channels", "out_channels") if getattr(m, "transposed", False) \
        else ("out_channels", "in_channels")
    info.set(m, first, w.shape[0])
    info.set(m, second, w.shape[1] * int_attr(m, "groups"))


@patcher(nn.modules.batchnorm._NormBase)
def _bn(m: nn.Module, info: PatchInfo) -> None:
    t = getattr(m, "weight", None)
    t = t if t is not None else getattr(m, "running_mean", None)
    if isinstance(t, torch.Tensor):
        info.set(m, "num_features", t.shape[0])


@patcher(nn.LayerNorm, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
def _ln(m: nn.Module, info: PatchInfo) -> None:
    if getattr(m, "weight", None) is not None:
        info.set(m, "normalized_shape", tuple(tensor_attr(m, "weight").shape))


@patcher(nn.GroupNorm)
def _gn(m: nn.Module, info: PatchInfo) -> None:
    if info.groups is not None:
        info.set(m, "num_groups", info.groups)
    if getattr(m, "weight", None) is not None:
        info.set(m, "num_channels", tensor_attr(m, "weight").shape[0])


@patcher(nn.Embedding)
def _embedding(m: nn.Module, info: PatchInfo) -> None:
    w = tensor_attr(m, "weight")
    info.set(m, "num_embeddings", w.shape[0])
    info.set(m, "embedding_dim", w.shape[1])


@patcher(nn.RNNBase)
def _rnn(m: nn.Module, info: PatchInfo) -> None:
    assert isinstance(m, nn.RNNBase)
    info.set(m, "input_size", tensor_attr(m, "weight_ih_l0").shape[1])
    info.set(m, "hidden_size", tensor_attr(m, "weight_hh_l0").shape[1] if not m.proj_size
             else m.hidden_size)
    m._init_flat_weights()  # the forward reads the cached list of weight tensors


@patcher(nn.MultiheadAttention)
def _mha(m: nn.Module, info: PatchInfo) -> None:
    assert isinstance(m, nn.MultiheadAttention)
    e = m.out_proj.weight.shape[0]
    info.set(m, "embed_dim", e)
    info.set(m, "kdim", e)
    info.set(m, "vdim", e)
    info.set(m, "head_dim", e // m.num_heads)


def _hf_conv1d(m: nn.Module, info: PatchInfo) -> None:
    """transformers' GPT-2 ``Conv1D``: a linear layer with a transposed ``(nx, nf)`` weight."""
    w = tensor_attr(m, "weight")
    info.set(m, "nx", w.shape[0])
    info.set(m, "nf", w.shape[1])


def _timm_scale(m: nn.Module, info: PatchInfo) -> None:
    """timm MetaFormer ``Scale``: ``x * scale.view(self.shape)`` with ``shape = (dim, 1, 1)``."""
    shape: tuple[int, ...] = tuple(getattr(m, "shape"))  # noqa: B009 - shadows nn.Module API
    info.set(m, "shape", (tensor_attr(m, "scale").shape[0], *shape[1:]))


# Types from libraries we do not import ourselves: (module, attribute) -> handler. A model
# that holds one of these types has already imported its library, so registering on first
# use (only from ``sys.modules``) never imports transformers or timm for a plain model.
_OPTIONAL: dict[tuple[str, str], Patcher] = {
    ("transformers.pytorch_utils", "Conv1D"): _hf_conv1d,
    ("timm.models.metaformer", "Scale"): _timm_scale,
}


def _register_optional() -> None:
    for (mod_name, attr), fn in list(_OPTIONAL.items()):
        mod = sys.modules.get(mod_name)
        cls = getattr(mod, attr, None) if mod is not None else None
        if isinstance(cls, type):
            PATCHERS[cls] = fn
            del _OPTIONAL[(mod_name, attr)]


def resize_tensor(t: torch.Tensor, keep: dict[int, torch.Tensor]) -> torch.Tensor:
    """``t`` with only the kept indices along each dim in ``keep`` (values bit-identical)."""
    out = t.detach()
    for dim, idx in sorted(keep.items()):
        out = out.index_select(dim, idx.to(out.device))
    return out.clone()
