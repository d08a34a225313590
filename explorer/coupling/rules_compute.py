"""Rules for contractions (matmul, conv, attention), embeddings, norms and pooling."""
from __future__ import annotations

from ..graph.ir import OpNode
from ..graph.ops import SDPA_OPS
from .context import Ctx, arg, tensor_args
from .registry import aten, rule
from .spaces import IdArray
from .vocab import PinKind, Tag


def _batch(ctx: Ctx, node: OpNode, a: list[IdArray], b: list[IdArray],
           shape: tuple[int, ...]) -> list[IdArray]:
    """Broadcast the batch dims of two matmul operands to the output batch shape."""
    out: list[IdArray] = []
    offset_a, offset_b = len(shape) - len(a), len(shape) - len(b)
    for k, n in enumerate(shape):
        ids_a = a[k - offset_a] if k >= offset_a else None
        ids_b = b[k - offset_b] if k >= offset_b else None
        cands = [x for x in (ids_a, ids_b) if x is not None and len(x) == n]
        if not cands:
            out.append(ctx.sp.fresh(n))
            continue
        for c in cands[1:]:
            ctx.union(cands[0], c, node)
        out.append(cands[0])
    return out


def _matmul(ctx: Ctx, node: OpNode, a_ref: object, b_ref: object, bias: object = None) -> None:
    a, b = ctx.dims(a_ref), ctx.dims(b_ref)
    out_shape = ctx.out_shape(node)
    if len(a) == 1:
        a = [ctx.sp.fresh(1)] + a
    if len(b) == 1:
        b = b + [ctx.sp.fresh(1)]
    ctx.union(a[-1], b[-2], node)  # the contracted dim
    batch = _batch(ctx, node, a[:-2], b[:-2], out_shape[:max(len(out_shape) - 2, 0)])
    if len(batch) and len(a) > 2 and len(b) > 2:
        for ids in batch:
            ctx.sp.tag(ids, Tag.ATTENTION_BATCH)
    out = batch + [a[-2], b[-1]]
    out = [d for d, keep in zip(out, _keep_mask(ctx, node, a_ref, b_ref), strict=False) if keep]
    if bias is not None:
        ctx.broadcast(node, [bias], tuple(len(d) for d in out))
        bd = ctx.dims(bias)
        for j, ids in enumerate(bd):
            k = len(out) - len(bd) + j
            if len(ids) == len(out[k]) and len(ids) > 1:
                ctx.union(out[k], ids, node)
    ctx.set_out(node, 0, out)


def _keep_mask(ctx: Ctx, node: OpNode, a_ref: object, b_ref: object) -> list[bool]:
    rank = len(ctx.out_shape(node))
    ra, rb = len(ctx.shape(a_ref)), len(ctx.shape(b_ref))
    full = max(ra, rb, 2)
    mask = [True] * full
    if ra == 1:
        mask[-2] = False
    if rb == 1:
        mask[-1] = False
    return mask if sum(mask) == rank else [True] * rank


@rule(aten.mm, aten.bmm, aten.matmul, aten.mv, aten.dot, aten.vdot, aten.inner)
def mm(ctx: Ctx, node: OpNode) -> None:
    a, b = tensor_args(node)[:2]
    _matmul(ctx, node, a, b)


@rule(aten.addmm, aten.baddbmm, aten.addmv, aten.addbmm)
def addmm(ctx: Ctx, node: OpNode) -> None:
    bias, a, b = tensor_args(node)[:3]
    _matmul(ctx, node, a, b, bias=bias)


@rule(aten.mkldnn_rnn_layer)
def lstm_layer(ctx: Ctx, node: OpNode) -> None:
    """One LSTM layer/direction: gate rows are (gate, hidden unit); units recur via w_hh.

    ``weight_ih`` and ``weight_hh`` rows are the four gates (i, f, g, o) of each hidden unit,
    ``weight_hh`` columns and the outputs are the units themselves: removing a unit removes
    its row in every gate, its recurrent column and its output channel.
    """
    x_ref, w_ih, w_hh, b_ih, b_hh, hx, cx = node.args[:7]
    x, wi, wh = ctx.dims(x_ref), ctx.dims(w_ih), ctx.dims(w_hh)
    hidden = int(node.args[10])
    gates = ctx.sp.fresh(len(wi[0]) // hidden)
    ctx.sp.pin(gates, f"the LSTM gates (i, f, g, o) of '{node.module}'")
    units = ctx.sp.fresh(hidden)
    ctx.sp.product(wi[0], [gates, units], node.index)
    ctx.union(wi[0], wh[0], node)
    for bias in (b_ih, b_hh):
        if hasattr(bias, "vid") and len(ctx.shape(bias)) == 1:
            ctx.union(wi[0], ctx.dims(bias)[0], node)
    ctx.union(wh[1], units, node)
    ctx.union(x[-1], wi[1], node)
    states = []
    for state in (hx, cx):
        sd = ctx.dims(state)
        ctx.union(sd[-1], units, node)
        states.append(list(sd[:-1]) + [units])
    ctx.set_out(node, 0, list(x[:-1]) + [units])
    ctx.set_out(node, 1, states[0])
    ctx.set_out(node, 2, states[1])
    for i in range(3, len(node.outputs)):
        ctx.fresh_out(node, i)


@rule(aten._grouped_mm)
def grouped_mm(ctx: Ctx, node: OpNode) -> None:
    """Mixture-of-experts matmul: rows of ``a`` routed to per-expert matrices of ``b``.

    The contracted dim is coupled across all experts; the expert dim is pinned (which rows
    go to which expert is decided by the data).
    """
    a_ref, b_ref = node.args[0], node.args[1]
    a, b = ctx.dims(a_ref), ctx.dims(b_ref)
    ctx.union(a[-1], b[-2], node)
    for ids in b[:-2]:
        ctx.sp.pin(ids, f"experts selected by routing in '{node.module}'", PinKind.INDEXED)
    for ids in a[:-1]:
        ctx.sp.pin(ids, f"tokens routed to experts in '{node.module}'", PinKind.INDEXED)
    out_shape = ctx.out_shape(node)
    lead = [ctx.sp.fresh(n) for n in out_shape[:-1]]
    for ids in lead:
        ctx.sp.pin(ids, f"tokens routed to experts in '{node.module}'", PinKind.INDEXED)
    ctx.set_out(node, 0, lead + [b[-1]])


@rule(aten.linear)
def linear(ctx: Ctx, node: OpNode) -> None:
    refs = tensor_args(node)
    x, w = ctx.dims(refs[0]), ctx.dims(refs[1])
    ctx.union(x[-1], w[1], node)
    if len(refs) > 2:
        ctx.union(w[0], ctx.dims(refs[2])[0], node)
    ctx.set_out(node, 0, x[:-1] + [w[0]])


@rule(aten.convolution, aten._convolution, aten.conv2d, aten.conv1d, aten.conv3d,
      aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
def convolution(ctx: Ctx, node: OpNode) -> None:
    """Conv: input channels = groups x (in per group), output = groups x (out per group).

    For ``groups == 1`` this is the plain contraction. For grouped and depthwise convs the
    channel spaces are factored by a shared *group* axis, so a depthwise conv ties its
    input and output channels and a grouped conv keeps every group the same width.
    """
    x_ref, w_ref = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    packet = node.op.overloadpacket
    if packet in (aten.convolution, aten._convolution):
        transposed, groups = bool(node.args[6]), int(node.args[8])
    else:
        transposed = packet in (aten.conv_transpose1d, aten.conv_transpose2d,
                                aten.conv_transpose3d)
        groups = int(arg(node, 6 if not transposed else 6, "groups", 1) or 1)
    x, w = ctx.dims(x_ref), ctx.dims(w_ref)
    for ids in w[2:]:
        ctx.sp.pin(ids, "kernel taps", PinKind.SPATIAL)
    w_in, w_out = (w[0], w[1]) if transposed else (w[1], w[0])
    unbatched = len(x) == len(w) - 1
    c_in = x[0] if unbatched else x[1]
    if groups == 1:
        ctx.union(c_in, w_in, node)
        c_out = w_out
    else:
        g = ctx.sp.fresh(groups)
        ctx.sp.tag(g, Tag.CONV_GROUPS)
        ctx.group_axes[node.module] = g
        if transposed:  # weight (C_in, C_out/g): rows are (group, in-per-group)
            ctx.sp.product(c_in, [g, ctx.sp.fresh(len(c_in) // groups)], node.index)
            ctx.union(c_in, w_in, node)
            c_out = ctx.sp.fresh(len(w_out) * groups)
            ctx.sp.product(c_out, [g, w_out], node.index)
        else:  # weight (C_out, C_in/g)
            ctx.sp.product(c_in, [g, w_in], node.index)
            ctx.sp.product(w_out, [g, ctx.sp.fresh(len(w_out) // groups)], node.index)
            c_out = w_out
    if bias is not None and hasattr(bias, "vid"):
        ctx.union(c_out, ctx.dims(bias)[0], node)
    out_shape = ctx.out_shape(node)
    spatial = [ctx.sp.fresh(n) for n in out_shape[(1 if unbatched else 2):]]
    for ids in spatial:
        ctx.sp.pin(ids, "spatial positions", PinKind.SPATIAL)
    out = ([c_out] if unbatched else [x[0], c_out]) + spatial
    ctx.set_out(node, 0, out)


@rule(aten.embedding, aten._embedding_bag, aten.embedding_bag)
def embedding(ctx: Ctx, node: OpNode) -> None:
    w_ref, idx_ref = node.args[0], node.args[1]
    w, idx = ctx.dims(w_ref), ctx.dims(idx_ref)
    ctx.sp.pin(w[0], f"embedding rows are addressed by token ids in '{node.module}'",
               PinKind.INDEXED)
    if node.op.overloadpacket is aten.embedding:
        ctx.set_out(node, 0, list(idx) + [w[1]])
    else:
        for i in range(len(node.outputs)):
            ctx.fresh_out(node, i, pin="embedding_bag output")


def _norm_outputs(ctx: Ctx, node: OpNode, x: list[IdArray]) -> None:
    ctx.set_out(node, 0, list(x))
    for i in range(1, len(node.outputs)):
        ctx.fresh_out(node, i)


@rule(aten.native_layer_norm, aten.layer_norm, aten._fused_rms_norm, aten.rms_norm)
def layer_norm(ctx: Ctx, node: OpNode) -> None:
    """Normalise over the last dims; weight/bias are the same channels as those dims."""
    refs = tensor_args(node)
    x = ctx.dims(refs[0])
    for ref in refs[1:]:
        wd = ctx.dims(ref)
        for j, ids in enumerate(wd):
            ctx.union(x[len(x) - len(wd) + j], ids, node)
    _norm_outputs(ctx, node, x)


@rule(aten.native_batch_norm, aten._native_batch_norm_legit,
      aten._native_batch_norm_legit_no_training, aten.batch_norm, aten._batch_norm_with_update,
      aten._batch_norm_no_update, aten.cudnn_batch_norm, aten.instance_norm,
      aten._native_batch_norm_legit_functional)
def batch_norm(ctx: Ctx, node: OpNode) -> None:
    """Per-channel statistics and affine: every 1-D argument is dim 1 of the input."""
    refs = tensor_args(node)
    x = ctx.dims(refs[0])
    c = x[1] if len(x) > 1 else x[0]
    for ref in refs[1:]:
        d = ctx.dims(ref)
        if len(d) == 1 and len(d[0]) == len(c):
            ctx.union(c, d[0], node)
    ctx.set_out(node, 0, list(x))
    for i in range(1, len(node.outputs)):
        if ctx.out_shape(node, i) == (len(c),):
            ctx.set_out(node, i, [c])
        else:
            ctx.fresh_out(node, i)


@rule(aten.native_group_norm, aten.group_norm)
def group_norm(ctx: Ctx, node: OpNode) -> None:
    """GroupNorm: channels = groups x channels-per-group; statistics per group."""
    refs = tensor_args(node)
    x = ctx.dims(refs[0])
    c = x[1]
    packet = node.op.overloadpacket
    groups = int(node.args[6] if packet is aten.native_group_norm else arg(node, 1, "num_groups"))
    if groups > 1:
        g = ctx.sp.fresh(groups)
        ctx.sp.tag(g, Tag.NORM_GROUPS)
        ctx.group_axes[node.module] = g
        ctx.sp.product(c, [g, ctx.sp.fresh(len(c) // groups)], node.index)
    for ref in refs[1:]:
        d = ctx.dims(ref)
        if len(d) == 1 and len(d[0]) == len(c):
            ctx.union(c, d[0], node)
    _norm_outputs(ctx, node, x)


@rule(*SDPA_OPS)
def sdpa(ctx: Ctx, node: OpNode) -> None:
    """Attention: q.k contract the head dim; heads pair up; v gives the output head dim.

    With fewer key/value heads than query heads (GQA), each query head is the pair
    (its key/value head, its index within that group).
    """
    q_ref, k_ref, v_ref = node.args[:3]
    q, k, v = ctx.dims(q_ref), ctx.dims(k_ref), ctx.dims(v_ref)
    ctx.union(q[-1], k[-1], node)
    ctx.union(k[-2], v[-2], node)
    if len(q) >= 3:
        hq, hk = q[-3], k[-3]
        ctx.union(hk, v[-3], node)
        if len(hq) == len(hk):
            ctx.union(hq, hk, node)
        elif len(hk) and len(hq) % len(hk) == 0:
            ctx.sp.product(hq, [hk, ctx.sp.fresh(len(hq) // len(hk))], node.index)
        ctx.sp.tag(hq, Tag.ATTENTION_HEAD)
        for a, b in zip(q[:-3], k[:-3], strict=False):
            if len(a) == len(b):
                ctx.union(a, b, node)
    scores = list(q[:-1]) + [k[-2]]  # (B, H, L, S): what an attention mask is added to
    for ref in tensor_args(node)[3:]:  # a mask or bias (a keyword on the CPU kernels)
        mask = ctx.dims(ref)
        for ids, s in zip(reversed(mask), reversed(scores), strict=False):
            if len(ids) == len(s) > 1:  # a size-1 dim broadcasts: not coupled
                ctx.union(ids, s, node)
    ctx.set_out(node, 0, q[:-1] + [v[-1]])
    for i in range(1, len(node.outputs)):
        ctx.fresh_out(node, i)


@rule(aten._native_multi_head_attention)
def native_mha(ctx: Ctx, node: OpNode) -> None:
    """``nn.MultiheadAttention``'s fused path: in-proj rows are (q/k/v, head, dim)."""
    q_ref, k_ref, v_ref = node.args[:3]
    num_heads = int(node.args[4])
    qkv_w, qkv_b, proj_w, proj_b = node.args[5:9]
    q, k, v = ctx.dims(q_ref), ctx.dims(k_ref), ctx.dims(v_ref)
    w, pw = ctx.dims(qkv_w), ctx.dims(proj_w)
    for other in (k, v):
        ctx.union(q[-1], other[-1], node)
    ctx.union(q[-1], w[1], node)
    ctx.union(w[0], ctx.dims(qkv_b)[0], node)
    t = ctx.sp.fresh(3)
    ctx.sp.pin(t, "the q/k/v split of a fused in-projection")
    heads = ctx.sp.fresh(num_heads)
    ctx.sp.tag(heads, Tag.ATTENTION_HEAD)
    hd = ctx.sp.fresh(len(w[0]) // 3 // num_heads)
    ctx.sp.product(w[0], [t, heads, hd], node.index)
    ctx.sp.product(pw[1], [heads, hd], node.index)
    ctx.union(pw[0], ctx.dims(proj_b)[0], node)
    ctx.set_out(node, 0, q[:-1] + [pw[0]])
    for i in range(1, len(node.outputs)):
        ctx.fresh_out(node, i)


def _spatial(ctx: Ctx, node: OpNode, n_spatial: int) -> None:
    """Channel dims pass through, the last ``n_spatial`` dims are new spatial positions."""
    x = ctx.dims(tensor_args(node)[0])
    for i, vid in enumerate(node.outputs):
        if vid is None:
            continue
        shape = ctx.out_shape(node, i)
        keep = list(x[:len(x) - n_spatial])
        spatial = [ctx.sp.fresh(n) for n in shape[len(keep):]]
        for ids in spatial:
            ctx.sp.pin(ids, "spatial positions", PinKind.SPATIAL)
        if tuple(len(d) for d in keep + spatial) == shape:
            ctx.set_out(node, i, keep + spatial)
        else:
            ctx.fresh_out(node, i, pin=f"{node.short} changed channel dims")


def _spatial_rule(n: int) -> object:
    def fn(ctx: Ctx, node: OpNode) -> None:
        _spatial(ctx, node, n)
    return fn


rule(aten.max_pool1d, aten.avg_pool1d, aten.adaptive_avg_pool1d, aten.adaptive_max_pool1d,
     aten.max_pool1d_with_indices, aten.upsample_linear1d, aten.upsample_nearest1d,
     aten.reflection_pad1d, aten.replication_pad1d)(_spatial_rule(1))  # type: ignore[arg-type]
rule(aten.max_pool2d, aten.max_pool2d_with_indices, aten.avg_pool2d, aten.adaptive_avg_pool2d,
     aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.upsample_nearest2d,
     aten.upsample_bilinear2d, aten._upsample_bilinear2d_aa, aten.upsample_bicubic2d,
     aten._upsample_nearest_exact2d, aten.reflection_pad2d, aten.replication_pad2d,
     aten.lp_pool2d, aten.fractional_max_pool2d)(_spatial_rule(2))  # type: ignore[arg-type]
rule(aten.max_pool3d, aten.max_pool3d_with_indices, aten.avg_pool3d,
     aten.adaptive_avg_pool3d, aten._adaptive_avg_pool3d, aten.upsample_nearest3d,
     aten.upsample_trilinear3d, aten.reflection_pad3d,
     aten.replication_pad3d)(_spatial_rule(3))  # type: ignore[arg-type]


@rule(aten.grid_sampler_2d, aten.grid_sampler)
def grid_sample(ctx: Ctx, node: OpNode) -> None:
    x_ref, grid_ref = node.args[0], node.args[1]
    x = ctx.dims(x_ref)
    ctx.pin_all([grid_ref], "sampling grid", PinKind.INDEXED)
    shape = ctx.out_shape(node)
    spatial = [ctx.sp.fresh(n) for n in shape[2:]]
    for ids in spatial:
        ctx.sp.pin(ids, "spatial positions", PinKind.SPATIAL)
    ctx.set_out(node, 0, [x[0], x[1]] + spatial)


@rule(aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle,
      aten.native_channel_shuffle)
def channel_factor(ctx: Ctx, node: OpNode) -> None:
    """Ops that trade channels for space or shuffle them: channels become (a x b) tuples."""
    x = ctx.dims(tensor_args(node)[0])
    packet = node.op.overloadpacket
    shape = ctx.out_shape(node)
    c_in = x[-3] if packet in (aten.pixel_shuffle, aten.pixel_unshuffle) else x[1]
    if packet is aten.pixel_shuffle:
        r = int(arg(node, 1, "upscale_factor"))
        c_out = ctx.sp.fresh(len(c_in) // (r * r))
        ctx.sp.product(c_in, [c_out, ctx.sp.fresh(r), ctx.sp.fresh(r)], node.index)
    elif packet is aten.pixel_unshuffle:
        r = int(arg(node, 1, "downscale_factor"))
        c_out = ctx.sp.fresh(len(c_in) * r * r)
        ctx.sp.product(c_out, [c_in, ctx.sp.fresh(r), ctx.sp.fresh(r)], node.index)
    else:
        g = int(arg(node, 1, "groups"))
        a, b = ctx.sp.fresh(g), ctx.sp.fresh(len(c_in) // g)
        ctx.sp.product(c_in, [a, b], node.index)
        c_out = ctx.sp.fresh(len(c_in))
        ctx.sp.product(c_out, [b, a], node.index)
        ctx.set_out(node, 0, [x[0], c_out] + list(x[2:]))
        return
    lead = list(x[:-3])
    spatial = [ctx.sp.fresh(n) for n in shape[-2:]]
    for ids in spatial:
        ctx.sp.pin(ids, "spatial positions", PinKind.SPATIAL)
    ctx.set_out(node, 0, lead + [c_out] + spatial)


@rule(aten.im2col)
def im2col(ctx: Ctx, node: OpNode) -> None:
    x = ctx.dims(tensor_args(node)[0])
    shape = ctx.out_shape(node)
    c = x[-3]
    flat = ctx.sp.fresh(shape[-2])
    kernel = ctx.sp.fresh(shape[-2] // len(c))
    ctx.sp.pin(kernel, "kernel positions of an unfold", PinKind.SPATIAL)
    ctx.sp.product(flat, [c, kernel], node.index)
    loc = ctx.sp.fresh(shape[-1])
    ctx.sp.pin(loc, "spatial positions", PinKind.SPATIAL)
    ctx.set_out(node, 0, list(x[:-3]) + [flat, loc])
