"""Rules for ops that move, split, join, factor or index dims without computing."""
from __future__ import annotations

import sys

import numpy as np

from ..graph.ir import OpNode, ValueRef
from .context import Ctx, arg, norm_dim, tensor_args
from .registry import aten, rule
from .spaces import IdArray
from .vocab import PinKind


def _blocks(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Match the non-unit dims of two shapes with equal numel into (src dims, dst dims) blocks."""
    s = [i for i, n in enumerate(src) if n != 1]
    d = [i for i, n in enumerate(dst) if n != 1]
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(s) and j < len(d):
        bs, bd = [s[i]], [d[j]]
        ps, pd = src[s[i]], dst[d[j]]
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd and i < len(s):
                ps *= src[s[i]]
                bs.append(s[i])
                i += 1
            elif pd < ps and j < len(d):
                pd *= dst[d[j]]
                bd.append(d[j])
                j += 1
            else:
                return None
        blocks.append((bs, bd))
    if i != len(s) or j != len(d):
        return None
    return blocks


@rule(aten.view, aten._unsafe_view, aten.reshape, aten._reshape_alias, aten.view_copy,
      aten.unsqueeze, aten.squeeze, aten.flatten, aten.unflatten, aten.expand_copy,
      aten.squeeze_copy, aten.unsqueeze_copy, aten.view_as, aten.reshape_as)
def view(ctx: Ctx, node: OpNode) -> None:
    """Reshape: each block of dims is flattened, then factored into the new dims.

    ``(B, N, 1152) -> (B, N, 3, 6, 64)`` makes every row of the 1152 space the tuple
    (which of q/k/v, head, dim in head): that is how head structure enters the groups.
    """
    src_ref = tensor_args(node)[0]
    src = ctx.dims(src_ref)
    in_shape = tuple(len(d) for d in src)
    out_shape = ctx.out_shape(node)
    blocks = _blocks(in_shape, out_shape)
    if blocks is None:
        ctx.fresh_out(node, 0, pin=f"reshape {list(in_shape)} -> {list(out_shape)} "
                                  f"that could not be matched in '{node.module}'")
        return
    out: list[IdArray | None] = [None] * len(out_shape)
    for bs, bd in blocks:
        srcs = [src[k] for k in bs]
        flat = _refolded(ctx, srcs)
        if flat is None:
            flat = ctx.sp.flatten(srcs, node.index)
        parts = ctx.sp.split(flat, [out_shape[k] for k in bd], node.index)
        if len(parts) > 1:
            for p in parts:
                ctx.factors[id(p)] = (flat, tuple(parts))
        for k, p in zip(bd, parts, strict=False):
            out[k] = p
    ctx.set_out(node, 0, [o if o is not None else ctx.sp.fresh(1) for o in out])


def _refolded(ctx: Ctx, srcs: list[IdArray]) -> IdArray | None:
    """The channels of ``srcs`` flattened, when they are the factors of one earlier reshape.

    ``view(B, g, C // g, H, W)``, ``transpose(1, 2)``, ``view(B, C, H, W)`` (a channel
    shuffle) flattens the factors of one dim in another order: the result is the same
    channels permuted, not new ones. Returning the permuted element ids keeps each channel
    itself through the shuffle, so later slices (``chunk(2)``) see the channels they take.
    None when ``srcs`` are not exactly the factors of one reshape.
    """
    if len(srcs) < 2:
        return None
    entry = ctx.factors.get(id(srcs[0]))
    if entry is None or len(entry[1]) != len(srcs):
        return None
    flat, parts = entry
    order = [next((j for j, p in enumerate(parts) if p is s), -1) for s in srcs]
    if sorted(order) != list(range(len(parts))):
        return None
    if order == sorted(order):
        return flat
    grid = flat.reshape([len(p) for p in parts])
    return np.ascontiguousarray(grid.transpose(order)).reshape(-1)


@rule(aten.permute, aten.permute_copy)
def permute(ctx: Ctx, node: OpNode) -> None:
    src = ctx.dims(tensor_args(node)[0])
    order = [norm_dim(d, len(src)) for d in arg(node, 1, "dims")]
    ctx.set_out(node, 0, [src[d] for d in order])


@rule(aten.transpose, aten.t, aten.swapaxes, aten.transpose_copy, aten.t_copy,
      aten.movedim, aten.numpy_T)
def transpose(ctx: Ctx, node: OpNode) -> None:
    src = list(ctx.dims(tensor_args(node)[0]))
    if len(src) < 2:
        ctx.set_out(node, 0, src)
        return
    if node.op.overloadpacket in (aten.t, aten.t_copy, aten.numpy_T):
        a, b = 0, 1
    else:
        a, b = norm_dim(arg(node, 1, "dim0"), len(src)), norm_dim(arg(node, 2, "dim1"), len(src))
    if node.op.overloadpacket is aten.movedim:
        moved = src.pop(a)
        src.insert(b, moved)
    else:
        src[a], src[b] = src[b], src[a]
    ctx.set_out(node, 0, src)


@rule(aten.expand, aten.broadcast_to)
def expand(ctx: Ctx, node: OpNode) -> None:
    """Size-1 dims grow into new spaces; existing dims pass through (never coupled)."""
    src = ctx.dims(tensor_args(node)[0])
    out_shape = ctx.out_shape(node)
    offset = len(out_shape) - len(src)
    out = [ctx.sp.fresh(n) for n in out_shape[:offset]]
    for j, ids in enumerate(src):
        n = out_shape[offset + j]
        out.append(ids if len(ids) == n else ctx.sp.fresh(n))
    ctx.set_out(node, 0, out)


@rule(aten.select, aten.select_copy)
def select(ctx: Ctx, node: OpNode) -> None:
    """``x[..., i, ...]`` with a constant ``i``: the selected element is pinned."""
    src = ctx.dims(tensor_args(node)[0])
    dim = norm_dim(arg(node, 1, "dim"), len(src))
    index = arg(node, 2, "index") % len(src[dim])
    ctx.sp.pin(src[dim][index:index + 1],
               f"selected by the constant index {index} in '{node.scope}'"
               f"{' at ' + node.location if node.location else ''}", PinKind.INDEXED)
    ctx.set_out(node, 0, src[:dim] + src[dim + 1:])


@rule(aten.unbind, aten.unbind_copy)
def unbind(ctx: Ctx, node: OpNode) -> None:
    src = ctx.dims(tensor_args(node)[0])
    dim = norm_dim(arg(node, 1, "dim", 0), len(src))
    ctx.sp.pin(src[dim], f"unbound into separate tensors in '{node.scope}'",
               PinKind.INDEXED)
    for i in range(len(node.outputs)):
        ctx.set_out(node, i, src[:dim] + src[dim + 1:])


def _slice_ids(ids: IdArray, start: int | None, end: int | None, step: int) -> IdArray:
    n = len(ids)
    start = 0 if start is None else start
    end = n if end is None or end >= sys.maxsize // 2 else end
    return ids[slice(start, end, step)]


@rule(aten.slice, aten.slice_copy)
def slice_(ctx: Ctx, node: OpNode) -> None:
    src = ctx.dims(tensor_args(node)[0])
    dim = norm_dim(arg(node, 1, "dim", 0), len(src))
    out = list(src)
    out[dim] = _slice_ids(src[dim], arg(node, 2, "start"), arg(node, 3, "end"),
                          arg(node, 4, "step", 1) or 1)
    ctx.set_out(node, 0, out)


@rule(aten.narrow, aten.narrow_copy)
def narrow(ctx: Ctx, node: OpNode) -> None:
    src = ctx.dims(tensor_args(node)[0])
    dim = norm_dim(arg(node, 1, "dim"), len(src))
    start = arg(node, 2, "start")
    out = list(src)
    out[dim] = src[dim][start:start + arg(node, 3, "length")]
    ctx.set_out(node, 0, out)


@rule(aten.split, aten.split_with_sizes, aten.unsafe_split, aten.unsafe_split_with_sizes,
      aten.chunk, aten.tensor_split, aten.split_copy, aten.split_with_sizes_copy)
def split(ctx: Ctx, node: OpNode) -> None:
    """Consecutive sub-ranges: each output takes its own slice of the element ids.

    A split by one size (``chunk(n)``, ``split(size)``) cuts the pruned width into equal
    parts again at run time, so its parts must keep the same channels: they are tied index
    by index (pruning channel i of one part prunes channel i of every part). Without this a
    channel shuffle followed by ``chunk(2)`` (ShuffleNet v2) hands each half the wrong
    channels. Splits by a list of sizes keep their parts independent.
    """
    src = ctx.dims(tensor_args(node)[0])
    dim = norm_dim(arg(node, 2, "dim", 0), len(src))
    start = 0
    parts: list[IdArray] = []
    for i, vid in enumerate(node.outputs):
        if vid is None:
            continue
        size = ctx.out_shape(node, i)[dim]
        out = list(src)
        out[dim] = src[dim][start:start + size]
        parts.append(out[dim])
        start += size
        ctx.set_out(node, i, out)
    if isinstance(arg(node, 1, "split_size"), int) and len(parts) > 1 and \
            start == len(src[dim]) and len({len(p) for p in parts}) == 1:
        for p in parts[1:]:
            ctx.union(parts[0], p, node)


@rule(aten.cat, aten.concat, aten.concatenate)
def cat(ctx: Ctx, node: OpNode) -> None:
    """Concatenation: the output dim is the inputs' element ids one after another."""
    refs = [r for r in tensor_args(node) if ctx.shape(r) != (0,)]
    out_shape = ctx.out_shape(node)
    dim = norm_dim(arg(node, 1, "dim", 0), len(out_shape))
    parts = [ctx.dims(r) for r in refs]
    out = []
    for k in range(len(out_shape)):
        if k == dim:
            out.append(np.concatenate([p[k] for p in parts]))
        else:
            first = parts[0][k]
            for p in parts[1:]:
                ctx.union(first, p[k], node)
            out.append(first)
    ctx.set_out(node, 0, out)


@rule(aten.stack)
def stack(ctx: Ctx, node: OpNode) -> None:
    refs = tensor_args(node)
    out_shape = ctx.out_shape(node)
    dim = norm_dim(arg(node, 1, "dim", 0), len(out_shape))
    parts = [ctx.dims(r) for r in refs]
    out = list(parts[0])
    for p in parts[1:]:
        for a, b in zip(out, p, strict=False):
            ctx.union(a, b, node)
    out.insert(dim, ctx.sp.fresh(len(refs)))
    ctx.set_out(node, 0, out)


@rule(aten.roll)
def roll(ctx: Ctx, node: OpNode) -> None:
    src = ctx.dims(tensor_args(node)[0])
    shifts, dims = arg(node, 1, "shifts"), arg(node, 2, "dims", [])
    out = list(src)
    if not dims:
        ctx.fresh_out(node, 0, pin="roll over a flattened tensor")
        return
    for s, d in zip(shifts, dims, strict=False):
        d = norm_dim(d, len(src))
        out[d] = np.roll(out[d], s)
    ctx.set_out(node, 0, out)


@rule(aten.flip)
def flip(ctx: Ctx, node: OpNode) -> None:
    src = ctx.dims(tensor_args(node)[0])
    out = list(src)
    for d in arg(node, 1, "dims"):
        d = norm_dim(d, len(src))
        out[d] = out[d][::-1].copy()
    ctx.set_out(node, 0, out)


@rule(aten.repeat)
def repeat(ctx: Ctx, node: OpNode) -> None:
    """Tiling: each tiled dim is (copy index) x (original element)."""
    src = ctx.dims(tensor_args(node)[0])
    reps = list(arg(node, 1, "repeats"))
    offset = len(reps) - len(src)
    out = [ctx.sp.fresh(r) for r in reps[:offset]]
    for j, ids in enumerate(src):
        r = reps[offset + j]
        if r == 1:
            out.append(ids)
        else:
            flat = ctx.sp.fresh(r * len(ids))
            ctx.sp.product(flat, [ctx.sp.fresh(r), ids], node.index)
            out.append(flat)
    ctx.set_out(node, 0, out)


@rule(aten.repeat_interleave)
def repeat_interleave(ctx: Ctx, node: OpNode) -> None:
    refs = tensor_args(node)
    reps = arg(node, 1, "repeats")
    dim = arg(node, 2, "dim")
    if len(refs) != 1 or not isinstance(reps, int) or dim is None:
        data_dependent_pin(ctx, node)
        return
    src = ctx.dims(refs[0])
    dim = norm_dim(dim, len(src))
    flat = ctx.sp.fresh(reps * len(src[dim]))
    ctx.sp.product(flat, [src[dim], ctx.sp.fresh(reps)], node.index)
    out = list(src)
    out[dim] = flat
    ctx.set_out(node, 0, out)


@rule(aten.constant_pad_nd)
def pad(ctx: Ctx, node: OpNode) -> None:
    """Padding appends new constant elements at either end of the padded dims."""
    src = ctx.dims(tensor_args(node)[0])
    pads = list(arg(node, 1, "pad"))
    out = list(src)
    for k in range(len(pads) // 2):
        d = len(src) - 1 - k
        lo, hi = pads[2 * k], pads[2 * k + 1]
        ids = out[d][max(-lo, 0): len(out[d]) - max(-hi, 0)]
        out[d] = np.concatenate([ctx.sp.fresh(max(lo, 0)), ids, ctx.sp.fresh(max(hi, 0))])
    ctx.set_out(node, 0, out)


@rule(aten.as_strided, aten.as_strided_, aten.as_strided_copy)
def as_strided(ctx: Ctx, node: OpNode) -> None:
    """A restride that keeps the shape and is dense (a memory-format change, as CPU kernels
    do to their outputs) keeps every element's index; any other view is pinned."""
    src_ref = tensor_args(node)[0]
    src = ctx.dims(src_ref)
    size = tuple(arg(node, 1, "size"))
    stride = tuple(arg(node, 2, "stride"))
    offset = arg(node, 3, "storage_offset") or 0
    if size == ctx.shape(src_ref) and offset == 0 and _dense(size, stride):
        ctx.set_out(node, 0, list(src))
        return
    reason = (f"as_strided view in '{node.scope}' reinterprets memory; "
              f"its elements cannot be followed")
    ctx.pin_all([src_ref], reason, PinKind.UNSUPPORTED)
    ctx.fresh_out(node, 0, pin=reason, kind=PinKind.UNSUPPORTED)


def _dense(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether ``stride`` lays ``size`` out without gaps or overlap (some dim order)."""
    expect = 1
    laid = (p for p in zip(size, stride, strict=True) if p[0] != 1)
    for n, s in sorted(laid, key=lambda p: p[1]):
        if s != expect:
            return False
        expect *= n
    return True


def data_dependent_pin(ctx: Ctx, node: OpNode) -> None:
    reason = f"{node.short} indexed by data in '{node.scope}'"
    ctx.pin_all(tensor_args(node), reason, PinKind.INDEXED)
    for i in range(len(node.outputs)):
        ctx.fresh_out(node, i, pin=reason, kind=PinKind.INDEXED)


_SAME_VALUES = (aten.lift_fresh, aten.lift_fresh_copy, aten.clone, aten._to_copy,
                aten.alias, aten.detach)


def _constant_index(ctx: Ctx, ref: object, size: int) -> tuple[int, ...] | None:
    """The literal positions (distinct, in ``-size..size-1``) an index list fixed by the
    code selects: the values the trace kept of a constant the forward made (``[-2]``),
    passed through copies; None when the index depends on data or its values are unknown."""
    if not isinstance(ref, ValueRef):
        return None
    value = ctx.graph.values[ref.vid]
    while value.data is None and value.producer is not None:
        node = ctx.graph.ops[value.producer]
        first = node.args[0] if node.args else None
        if node.op.overloadpacket not in _SAME_VALUES or not isinstance(first, ValueRef):
            return None
        value = ctx.graph.values[first.vid]
    if value.data is None or not value.data or \
            not all(-size <= v < size for v in value.data):
        return None
    return value.data if len({v % size for v in value.data}) == len(value.data) else None


@rule(aten.index, aten._unsafe_index)
def index(ctx: Ctx, node: OpNode) -> None:
    """``x[idx]`` with tensor indices: indexed dims are pinned, the rest pass through."""
    src_ref = node.args[0]
    src = ctx.dims(src_ref)
    indices = list(arg(node, 1, "indices"))
    where = f"indexed by a tensor in '{node.scope}'" + (
        f" at {node.location}" if node.location else "")
    used = [k for k, ix in enumerate(indices) if ix is not None]
    if len(used) == 1:
        d = used[0]
        raw = _constant_index(ctx, indices[d], len(src[d]))
        if raw is not None:  # ``x[..., [-2], :]``: the listed elements, followed
            size = len(src[d])
            out = list(src)
            out[d] = src[d][np.array([v % size for v in raw], dtype=np.int64)]
            if tuple(len(x) for x in out) == ctx.out_shape(node):
                for v in raw:  # the literal keeps its position only if nothing between
                    # it and the end it counts from is cut: [2] pins 0..2, [-2] the last two
                    span = src[d][:v + 1] if v >= 0 else src[d][size + v:]
                    ctx.sp.pin(span, f"position {v} of a constant index list in "
                               f"'{node.scope}'" + (
                                   f" at {node.location}" if node.location else ""),
                               PinKind.INDEXED)
                ctx.set_out(node, 0, out)
                return
    for k in used:
        ctx.sp.pin(src[k], where, PinKind.INDEXED)
    out_shape = ctx.out_shape(node)
    idx_rank = len(out_shape) - (len(src) - len(used))
    contiguous = used == list(range(used[0], used[-1] + 1)) if used else True
    rest_before = src[:used[0]] if (used and contiguous) else []
    rest_after = [d for k, d in enumerate(src) if k not in used and (not contiguous or
                                                                   k > used[-1])]
    idx_dims = [ctx.sp.fresh(n) for n in out_shape[len(rest_before):len(rest_before) + idx_rank]]
    for ids in idx_dims:
        ctx.sp.pin(ids, where, PinKind.INDEXED)
    out = rest_before + idx_dims + rest_after
    if tuple(len(d) for d in out) != out_shape:
        ctx.fresh_out(node, 0, pin=where, kind=PinKind.INDEXED)
        return
    ctx.set_out(node, 0, out)


@rule(aten.index_select)
def index_select(ctx: Ctx, node: OpNode) -> None:
    src = ctx.dims(tensor_args(node)[0])
    dim = norm_dim(arg(node, 1, "dim"), len(src))
    where = f"rows picked by index_select in '{node.scope}'"
    ctx.sp.pin(src[dim], where, PinKind.INDEXED)
    out = list(src)
    out[dim] = ctx.sp.fresh(ctx.out_shape(node)[dim])
    ctx.sp.pin(out[dim], where, PinKind.INDEXED)
    ctx.set_out(node, 0, out)


@rule(aten.gather, aten.scatter, aten.scatter_add, aten.index_put, aten.index_add,
      aten.index_copy, aten.index_fill, aten.masked_scatter, aten.scatter_reduce,
      aten.index_put_, aten.scatter_, aten.index_add_, aten.take_along_dim)
def indexed_by_data(ctx: Ctx, node: OpNode) -> None:
    data_dependent_pin(ctx, node)
