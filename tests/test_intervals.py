"""The coupling resolved over intervals of channels equals the channel-by-channel one."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from explorer import load_model
from explorer.coupling.analyze import Coupling
from explorer.coupling.intervals import resolve, resolve_intervals
from explorer.coupling.resolve import Resolution, resolve_elements
from explorer.coupling.spaces import ID_DTYPE, Runs, Spaces
from explorer.graph.tracer import trace as raw_trace


def _same(a: Resolution, b: Resolution) -> None:
    assert a.num_classes == b.num_classes
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.arity, b.arity)
    np.testing.assert_array_equal(a.is_def, b.is_def)
    np.testing.assert_array_equal(a.table, b.table)
    assert a.conflicts == b.conflicts
    assert a.conflict_classes == b.conflict_classes
    ids = np.arange(len(a.label))
    np.testing.assert_array_equal(a.atoms_matrix(ids), b.atoms_matrix(ids))


def test_heads_sliced_and_shifted() -> None:
    sp = Spaces()
    x = sp.fresh(12)  # 3 heads x 4
    heads, dims = sp.fresh(3), sp.fresh(4)
    sp.product(x, [heads, dims], 0)
    y = sp.fresh(12)
    sp.union(y, x, 1)
    sp.union(y[:6], sp.fresh(6), 2)  # a slice across a head boundary
    z = sp.fresh(10)
    sp.union(z[:6], z[4:], 3)  # overlapping shift: a chain inside one dim
    got = resolve_intervals(sp)
    assert got is not None and got.form is not None
    assert len(got.form.cuts) - 1 < sp.count  # fewer intervals than channels
    _same(got, resolve_elements(sp))


def test_strided_and_reversed_read_channel_by_channel() -> None:
    sp = Spaces()
    x, y = sp.fresh(8), sp.fresh(4)
    sp.union(x[::2], y, 0)  # every other channel (interleaved rotary halves)
    sp.union(x[1::2], y[::-1], 1)
    got = resolve_intervals(sp)
    assert got is not None
    _same(got, resolve_elements(sp))


def test_conflicting_reshapes_fall_back_to_channels() -> None:
    sp = Spaces()
    x = sp.fresh(12)
    sp.product(x, [sp.fresh(3), sp.fresh(4)], 0)
    sp.product(x, [sp.fresh(2), sp.fresh(6)], 1)  # the same space factored another way
    assert resolve_intervals(sp) is None
    got = resolve(sp)
    assert got.conflicts and got.form is None
    _same(got, resolve_elements(sp))


def _random_spaces(seed: int) -> Spaces:
    """Dims of a few sizes joined by unions of slices (contiguous, strided, reversed,
    permuted) and row-major products, as rules write them."""
    rng = np.random.default_rng(seed)
    sp = Spaces()
    dims = [sp.fresh(int(n)) for n in rng.choice([2, 3, 4, 6, 8, 12], size=6)]
    for op in range(int(rng.integers(3, 9))):
        kind = rng.integers(0, 4)
        if kind == 0:  # flatten two dims into a new one
            i, j = rng.choice(len(dims), 2, replace=False)
            dims.append(sp.flatten([dims[i], dims[j]], op))
        elif kind == 1:  # split a dim
            d = dims[int(rng.integers(len(dims)))]
            ways = [k for k in range(2, len(d)) if len(d) % k == 0]
            if ways:
                k = int(rng.choice(ways))
                dims.extend(sp.split(d, [k, len(d) // k], op))
        else:  # union two slices of equal length
            a, b = (dims[int(t)] for t in rng.integers(len(dims), size=2))
            n = int(rng.integers(1, min(len(a), len(b)) + 1))
            pa = a[int(rng.integers(len(a) - n + 1)):][:n]
            pb = b[int(rng.integers(len(b) - n + 1)):][:n]
            how = rng.integers(0, 4)
            if how == 1 and len(b) >= 2 * n:
                pb = b[: 2 * n: 2]
            elif how == 2:
                pb = pb[::-1]
            elif how == 3:
                pb = pb[rng.permutation(n)]
            sp.union(pa, pb, op)
    return sp


@pytest.mark.parametrize("seed", range(20))
def test_runs_stand_for_their_ids(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pieces = [np.arange(s, s + n) for s, n in zip(rng.integers(0, 1000, 6),
                                                  rng.integers(0, 40, 6), strict=True)]
    ids = rng.permutation(np.concatenate(pieces))[: rng.integers(0, 60)] if seed % 2 \
        else np.concatenate(pieces)
    runs = Runs.of(ids)
    assert len(runs) == len(ids)
    assert runs.expand().dtype == ID_DTYPE
    np.testing.assert_array_equal(runs.expand(), ids)
    k = np.arange(len(ids))
    np.testing.assert_array_equal(runs.at(k), ids)
    assert (np.diff(runs.start) > 0).all() and (runs.length > 0).all()


def test_retired_values_read_back_their_ids() -> None:
    sp = Spaces()
    a, b = sp.fresh(5), sp.fresh(3)
    sp.dims[0] = [a, b]
    sp.dims[1] = [b]  # a view sharing the dim
    sp.retire([0, 1])
    assert all(isinstance(d, Runs) for d in sp.dims[0] + sp.dims[1])
    assert sp.dims[0][1] is sp.dims[1][0]  # converted once
    np.testing.assert_array_equal(sp.arrays(0)[0], a)
    assert sp.runs(1)[0] is sp.runs(1)[0]  # stable objects (they key caches)


@pytest.mark.parametrize("seed", range(300))
def test_random_facts(seed: int) -> None:
    sp = _random_spaces(seed)
    expected = resolve_elements(sp)
    got = resolve_intervals(sp)
    if got is None:  # conflicts or cycles: resolved channel by channel
        assert resolve(sp).form is None
        return
    _same(got, expected)


MODELS = [
    ("demo:llama", None),  # GQA heads, rotary halves, SwiGLU
    ("hf:gpt2", None),  # fused qkv split, Conv1D
    ("timm:resnet18", (1, 3, 32, 32)),
    ("timm:vit_tiny_patch16_224?img_size=32&patch_size=8", (1, 3, 32, 32)),
    ("timm:ghostnet_100", (1, 3, 32, 32)),  # grouped convs, concatenation
]


@pytest.mark.parametrize("spec,shape", MODELS)
def test_coupling_over_intervals_is_the_channel_coupling(
        spec: str, shape: tuple[int, ...] | None) -> None:
    lm = load_model(spec, input_shape=shape)
    graph = raw_trace(lm.model, lm.example_inputs)
    fast, ref = Coupling(graph), Coupling(graph, intervals=False)
    assert fast.res.form is not None and fast._symbolic  # the interval path ran
    assert ref.res.form is None
    assert [dataclasses.asdict(g) for g in fast.groups] == \
        [dataclasses.asdict(g) for g in ref.groups]
    np.testing.assert_array_equal(fast.family_of, ref.family_of)
    picks = np.random.default_rng(0).integers(0, len(ref.family_of), 500)
    np.testing.assert_array_equal(fast.family_of[picks], ref.family_of[picks])
    assert [fast.family_atoms.size(f) for f in range(len(fast.family_atoms))] == \
        [len(a) for a in ref.family_atoms]
    assert len(fast.family_atoms) == len(ref.family_atoms)
    for a, b in zip(fast.family_atoms, ref.family_atoms, strict=True):
        np.testing.assert_array_equal(a, b)
    for (ma, aa), (mb, ab) in zip(fast.member_atoms(), ref.member_atoms(), strict=True):
        assert ma == mb
        np.testing.assert_array_equal(aa, ab)
    for vid in list(graph.values)[::7]:
        assert fast.value_families(vid) == ref.value_families(vid)
        for a, b in zip(fast.value_dims(vid), ref.value_dims(vid), strict=True):
            np.testing.assert_array_equal(a, b)
    # no rule reads a value after the trace: every dim is kept as runs of ids
    assert all(isinstance(d, Runs) for dims in fast._ctx.sp.dims.values() for d in dims)
    prunable = [g for g in fast.groups if g.prunable]
    assert prunable
    for group in prunable[:4]:  # cut the first half of each axis's atoms
        dead = np.concatenate([fast.family_atoms[a.family][: a.size // 2]
                               for a in group.axes if a.prunable])
        keep_fast, keep_ref = fast.keep_indices(dead), ref.keep_indices(dead)
        assert keep_fast.keys() == keep_ref.keys() and keep_fast
        for key in keep_fast:
            np.testing.assert_array_equal(keep_fast[key], keep_ref[key])
