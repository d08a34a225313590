"""Rules for element-wise, identity, reduction, factory and in-place ops."""
from __future__ import annotations

import numpy as np

from ..graph.ir import OpNode
from .context import Ctx, arg, norm_dim, tensor_args
from .registry import aten, rule
from .vocab import PinKind


@rule(aten.add, aten.sub, aten.mul, aten.div, aten.where, aten.eq, aten.ne, aten.lt,
      aten.gt, aten.le, aten.ge, aten.maximum, aten.minimum, aten.pow, aten.remainder,
      aten.fmod, aten.floor_divide, aten.rsub, aten.logical_and, aten.logical_or,
      aten.masked_fill, aten.lerp, aten.addcmul, aten.addcdiv, aten.hardswish,
      aten.hardsigmoid, aten.type_as, aten.clamp, aten.clamp_min, aten.clamp_max,
      aten.xlogy, aten.atan2, aten.bitwise_and, aten.bitwise_or, aten.prelu,
      aten._prelu_kernel)
def broadcast_elementwise(ctx: Ctx, node: OpNode) -> None:
    """Element-wise with broadcasting: equal-size aligned dims are the same channels."""
    refs = tensor_args(node)
    for i, vid in enumerate(node.outputs):
        if vid is not None:
            ctx.set_out(node, i, ctx.broadcast(node, refs, ctx.out_shape(node, i)))


@rule(aten.clone, aten.contiguous, aten._to_copy, aten.to, aten.detach, aten.alias,
      aten.lift_fresh, aten.lift_fresh_copy, aten._softmax, aten.softmax, aten._log_softmax,
      aten.log_softmax, aten._safe_softmax, aten.cumsum, aten.cumprod, aten.tril, aten.triu,
      aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like,
      aten.randn_like, aten.fill, aten.zero, aten.normal, aten.uniform, aten.bernoulli,
      aten.native_dropout, aten.dropout, aten.feature_dropout, aten.relu, aten.gelu,
      aten.silu, aten.hardswish_, aten.fill_, aten.zero_, aten.normal_, aten.uniform_,
      aten.bernoulli_, aten.exponential_, aten.hardtanh, aten.leaky_relu, aten.elu,
      aten.glu_backward, aten.logit, aten._log_softmax_backward_data, aten.nan_to_num,
      aten.masked_fill_, aten.copy, aten.resolve_conj, aten.resolve_neg, aten.lift)
def identity(ctx: Ctx, node: OpNode) -> None:
    """Every tensor output has the dims of the first tensor input."""
    src = ctx.dims(tensor_args(node)[0])
    for i, vid in enumerate(node.outputs):
        if vid is not None:
            if ctx.out_shape(node, i) == tuple(len(d) for d in src):
                ctx.set_out(node, i, list(src))
            else:
                ctx.fresh_out(node, i)


@rule(aten.copy_)
def copy_(ctx: Ctx, node: OpNode) -> None:
    """``dst.copy_(src)``: src broadcasts into dst's channels."""
    dst, src = tensor_args(node)[:2]
    ctx.set_out(node, 0, ctx.broadcast(node, [dst, src], ctx.shape(dst)))


@rule(aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.prod,
      aten.linalg_vector_norm, aten.norm, aten.logsumexp, aten.any, aten.all, aten.argmax,
      aten.argmin, aten.max, aten.min, aten.var_mean, aten.std_mean, aten.nansum,
      aten.count_nonzero)
def reduction(ctx: Ctx, node: OpNode) -> None:
    """Kept dims pass through; reduced dims vanish (or become size 1 with keepdim)."""
    src_ref = tensor_args(node)[0]
    src = ctx.dims(src_ref)
    rank = len(src)
    dims_arg = _reduction_dims(node)
    if len(tensor_args(node)) > 1 and dims_arg is None:  # max(a, b) element-wise forms
        broadcast_elementwise(ctx, node)
        return
    reduced = set(range(rank)) if dims_arg is None else {norm_dim(d, rank) for d in dims_arg}
    for i, vid in enumerate(node.outputs):
        if vid is None:
            continue
        shape = ctx.out_shape(node, i)
        kept = [d for j, d in enumerate(src) if j not in reduced]
        if len(shape) == rank:  # keepdim
            out = [ctx.sp.fresh(1) if j in reduced else d for j, d in enumerate(src)]
        else:
            out = kept
        if tuple(len(d) for d in out) == shape:
            ctx.set_out(node, i, out)
        else:
            ctx.fresh_out(node, i)


def _reduction_dims(node: OpNode) -> list[int] | None:
    name = node.op.overloadpacket
    if name in (aten.linalg_vector_norm,) or name in (aten.norm,):
        dim = arg(node, 2, "dim")
    elif name in (aten.var, aten.std, aten.var_mean, aten.std_mean):
        dim = arg(node, 1, "dim")
        if isinstance(dim, bool):
            dim = None
    else:
        dim = arg(node, 1, "dim")
    if isinstance(dim, int) and not isinstance(dim, bool):
        return [dim]
    if isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
        return list(dim) or None
    return None


@rule(aten.empty, aten.zeros, aten.ones, aten.full, aten.arange, aten.randn, aten.rand,
      aten.randint, aten.randperm, aten.linspace, aten.eye, aten.scalar_tensor,
      aten.empty_strided, aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full,
      aten.new_empty_strided, aten.logspace, aten.tensor)
def factory(ctx: Ctx, node: OpNode) -> None:
    """A new tensor whose size is fixed by the code: its dims start new, unpinned spaces."""
    for i in range(len(node.outputs)):
        ctx.fresh_out(node, i)


@rule(aten.topk, aten.sort, aten.argsort, aten.kthvalue, aten.median, aten.mode,
      aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique2, aten.bucketize,
      aten.searchsorted, aten.multinomial, aten.histc, aten.bincount, aten._local_scalar_dense,
      aten.item,
      aten.is_nonzero, aten.equal, aten.allclose)
def data_dependent(ctx: Ctx, node: OpNode) -> None:
    """Outputs ordered or sized by data, or values read back to Python (``.item()``):
    nothing they touch may be pruned."""
    reason = f"data-dependent {node.short} in '{node.scope}'"
    ctx.pin_all(tensor_args(node), reason, PinKind.INDEXED)
    for i in range(len(node.outputs)):
        ctx.fresh_out(node, i, pin=reason, kind=PinKind.INDEXED)


__all__ = ["broadcast_elementwise", "identity", "np"]
