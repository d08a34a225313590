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


@patcher(nn.Linear)
def _linear(m: nn.Module, info: PatchInfo) -> None:
    info.set(m, "out_features", m.weight.shape[0])
    info.set(m, "in_features", m.weight.shape[1])


@patcher(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(m: nn.Module, info: PatchInfo) -> None:
    if info.groups is not None:
        info.set(m, "groups", info.groups)
    info.set(m, "out_channels", m.weight.shape[0])
    info.set(m, "in_channels", m.weight.shape[1] * m.groups)


@patcher(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_t(m: nn.Module, info: PatchInfo) -> None:
    if info.groups is not None:
        info.set(m, "groups", info.groups)
    info.set(m, "in_channels", m.weight.shape[0])
    info.set(m, "out_channels", m.weight.shape[1] * m.groups)


@patcher(nn.modules.batchnorm._NormBase)
def _bn(m: nn.Module, info: PatchInfo) -> None:
    t = m.weight if m.weight is not None else m.running_mean
    if t is not None:
        info.set(m, "num_features", t.shape[0])


@patcher(nn.LayerNorm, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
def _ln(m: nn.Module, info: PatchInfo) -> None:
    if m.weight is not None:
        info.set(m, "normalized_shape", tuple(m.weight.shape))


@patcher(nn.GroupNorm)
def _gn(m: nn.Module, info: PatchInfo) -> None:
    if info.groups is not None:
        info.set(m, "num_groups", info.groups)
    if m.weight is not None:
        info.set(m, "num_channels", m.weight.shape[0])


@patcher(nn.Embedding)
def _embedding(m: nn.Module, info: PatchInfo) -> None:
    info.set(m, "num_embeddings", m.weight.shape[0])
    info.set(m, "embedding_dim", m.weight.shape[1])


@patcher(nn.RNNBase)
def _rnn(m: nn.Module, info: PatchInfo) -> None:
    info.set(m, "input_size", m.weight_ih_l0.shape[1])
    info.set(m, "hidden_size", m.weight_hh_l0.shape[1] if not getattr(m, "proj_size", 0)
             else m.hidden_size)
    m._init_flat_weights()  # the forward reads the cached list of weight tensors


@patcher(nn.MultiheadAttention)
def _mha(m: nn.Module, info: PatchInfo) -> None:
    e = m.out_proj.weight.shape[0]
    info.set(m, "embed_dim", e)
    info.set(m, "kdim", e)
    info.set(m, "vdim", e)
    info.set(m, "head_dim", e // m.num_heads)


def _hf_conv1d(m: nn.Module, info: PatchInfo) -> None:
    """transformers' GPT-2 ``Conv1D``: a linear layer with a transposed ``(nx, nf)`` weight."""
    info.set(m, "nx", m.weight.shape[0])
    info.set(m, "nf", m.weight.shape[1])


def _timm_scale(m: nn.Module, info: PatchInfo) -> None:
    """timm MetaFormer ``Scale``: ``x * scale.view(self.shape)`` with ``shape = (dim, 1, 1)``."""
    info.set(m, "shape", (m.scale.shape[0], *tuple(m.shape)[1:]))


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
