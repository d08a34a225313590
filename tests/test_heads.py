"""Attention families: heads and head dims recovered, pruned, patched, and lossless."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from explorer import load_model, trace
from explorer.prune.preflight import Preflight
from explorer.prune.removal import Removal, apply_removal, removed_atoms

# Models whose own code derives head_dim from the residual width (``C // num_heads``,
# ``reshape(B, N, C)``): the pre-flight must call head pruning unsafe and point at the line.
UNSAFE_BY_CODE = {"timm:eva02_tiny_patch14_224": "eva.py:", "timm:cait_xxs24_224": "cait.py:"}

FAMILIES = [
    # spec, input shape or None, expected (heads, head_dim, kv_heads) of the first attention
    ("demo:dino_vit_safe", None, (6, 16, None)),
    ("timm:vit_tiny_patch16_224?img_size=32&patch_size=8", (1, 3, 32, 32), (3, 64, None)),
    ("timm:deit_tiny_patch16_224?img_size=32&patch_size=8", (1, 3, 32, 32), (3, 64, None)),
    ("timm:eva02_tiny_patch14_224?img_size=28", (1, 3, 28, 28), (3, 64, None)),
    ("timm:cait_xxs24_224?img_size=32&patch_size=8&depth=2", (1, 3, 32, 32), (4, 48, None)),
    ("timm:swin_tiny_patch4_window7_224?img_size=56&depths=(1,1,1,1)", (1, 3, 56, 56),
     (3, 32, None)),
    ("demo:llama", None, (8, 8, 2)),
    ("hf:qwen2", None, None),
    ("hf:mistral", None, None),
    ("hf:gpt2", None, (4, 16, None)),
    ("hf:bert", None, (4, 16, None)),
]


def _out(y: object) -> torch.Tensor:
    if hasattr(y, "logits"):
        return y.logits  # type: ignore[no-any-return,attr-defined]
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state  # type: ignore[no-any-return,attr-defined]
    return y  # type: ignore[return-value]


def _head_removal(mg, mode: str) -> Removal:
    removal = Removal()
    for g in mg.groups():
        if g.heads is None or not g.prunable:
            continue
        axes = [i for i, a in enumerate(g.axes) if a.prunable and
                a.role == ("heads" if mode == "whole" else "head-dim")]
        for i in axes:
            size = g.axes[i].size
            removal.add(g.id, i, list(range(1, size, 2))[: size // 2])
    return removal


def _zeroed(model: nn.Module, coupling, removal: Removal) -> nn.Module:
    masked = copy.deepcopy(model)
    keeps = coupling.keep_indices(removed_atoms(coupling, removal))
    tensors = dict(masked.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for (name, dim), keep in keeps.items():
            if name in tensors:
                t = tensors[name]
                drop = sorted(set(range(t.shape[dim])) - set(keep.tolist()))
                t.index_fill_(dim, torch.tensor(drop, dtype=torch.long), 0.0)
    return masked


@pytest.mark.parametrize("mode", ["whole", "dims"])
@pytest.mark.parametrize("spec,shape,expected", FAMILIES,
                         ids=[f[0].split("?")[0] for f in FAMILIES])
def test_head_pruning_family(spec: str, shape: tuple | None, expected: tuple | None,
                             mode: str) -> None:
    lm = load_model(spec, input_shape=shape)
    model = lm.model.eval()
    mg = trace(model, lm.example_inputs)
    attn = mg.attention()
    assert attn, "no attention module recovered"
    if expected is not None:
        assert (attn[0].num_heads, attn[0].head_dim, attn[0].kv_heads) == expected
    removal = _head_removal(mg, mode)
    assert removal
    verdict = Preflight(model, lm.example_inputs, mg.coupling).check(removal)
    where = UNSAFE_BY_CODE.get(spec.split("?")[0])
    if where is not None:
        assert not verdict.ok and where in verdict.location and verdict.module.endswith("attn")
        return
    assert verdict.ok, (verdict.module, verdict.location, verdict.error)
    masked = _zeroed(model, mg.coupling, removal)
    pruned = copy.deepcopy(model)
    applied = apply_removal(pruned, mg.coupling, removal)
    assert applied.attributes  # head counts or widths were patched
    with torch.no_grad():
        want = _out(masked(*lm.example_inputs))
        got = _out(pruned(*lm.example_inputs))
    assert got.shape == want.shape
    # Removing zeroed heads (q/k/v rows and out columns) or zeroed q.k / v.out dims is lossless.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    after = trace(pruned, lm.example_inputs).attention()
    for a in after:
        module = pruned.get_submodule(a.module)
        heads = next((getattr(module, n) for n in ("num_heads", "num_attention_heads", "n_head")
                      if isinstance(getattr(module, n, None), int)), None)
        if heads is not None:
            assert heads == a.num_heads, a.module
        hd = getattr(module, "head_dim", None)
        if isinstance(hd, int):
            assert hd == a.head_dim, a.module
    if mode == "whole" and expected and expected[2]:  # GQA: heads stay divisible by kv heads
        assert all(a.kv_heads is not None and a.num_heads % a.kv_heads == 0 for a in after)


def test_multihead_attention_structure_and_verdict() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 32)
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
            self.out = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            a, _ = self.mha(h, h, h, need_weights=False)
            return self.out(a + h)

    model = M().eval()
    x = torch.randn(2, 5, 8)
    mg = trace(model, (x,))
    g = next(g for g in mg.groups() if g.heads is not None)
    assert (g.heads.num_heads, g.heads.head_dim) == (4, 8)
    assert {m.param for m in g.members} >= {"mha.in_proj_weight", "mha.out_proj.weight"}
    removal = _head_removal(mg, "dims")
    verdict = Preflight(model, (x,), mg.coupling).check(removal)
    # nn.MultiheadAttention derives head_dim from embed_dim: head dims alone cannot change.
    assert not verdict.ok and verdict.error


def test_head_counts_reads_no_kv_heads_from_a_piece_without_heads() -> None:
    """A member piece that spans the head dim but no head axis (a positional table tied to
    the head dims of every block, as EVA-02's rope) is not a key with fewer heads: the
    empty set of heads is a subset of every set, and read as one it made kv_heads 1."""
    from explorer.coupling.groups import Axis, Member
    from explorer.coupling.heads import head_counts
    from explorer.coupling.vocab import AxisRole

    axes = [Axis(0, 3, AxisRole.HEADS, True, ""), Axis(1, 3, AxisRole.HEADS, True, ""),
            Axis(2, 32, AxisRole.HEAD_DIM, True, "")]
    q0 = Member("blocks.0.attn.qkv", "blocks.0.attn.qkv.weight", 0, 96, rank=2)
    q1 = Member("blocks.1.attn.qkv", "blocks.1.attn.qkv.weight", 0, 96, rank=2)
    table = Member("rope", "rope.pos_embed", 1, 32, buffer=True, rank=2)
    members = [(q0, {0, 2}), (q1, {1, 2}), (table, {2})]
    pieces = {q0: [frozenset({0, 2})], q1: [frozenset({1, 2})], table: [frozenset({2})]}
    assert head_counts(axes, members, pieces=pieces)[2] is None  # type: ignore[index]
    # a real key piece with fewer heads is still read: GQA in a fused projection
    axes_gqa = [Axis(0, 2, AxisRole.HEADS, True, ""), Axis(1, 4, AxisRole.HEAD_REPEAT, True, ""),
                Axis(2, 8, AxisRole.HEAD_DIM, True, "")]
    qkv = Member("attn.qkv", "attn.qkv.weight", 0, 96, rank=2)
    fused = {qkv: [frozenset({0, 1, 2}), frozenset({0, 2})]}
    assert head_counts(axes_gqa, [(qkv, {0, 1, 2})], pieces=fused)[2] == 2  # type: ignore[index]


@pytest.mark.parametrize("rotary", [0.25, 0.5, 1.0])
def test_gpt_neox_head_dim_cut_sets_head_size_and_equals_masked(tmp_path, rotary: float) -> None:
    """GPT-NeoX splits its fused ``query_key_value`` by ``view(..., -1, 3 * self.head_size)``:
    a head-dim cut must set ``head_size`` to the width q has at the attention op (rotated
    pairs and unrotated dims together), or the view silently regroups the rows into other
    heads (the forward runs, the function is not the masked one). The export (no config
    describes per-head widths) replays to the same logits."""
    transformers = pytest.importorskip("transformers")
    from explorer import Plan, Pruner, load_pruned
    from explorer.io.export import export

    config = transformers.AutoConfig.for_model(
        "gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, vocab_size=64, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": rotary})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    pruner = Pruner(model, (ids,), heads="dims", targets="heads")
    removal = _head_removal(trace(model, (ids,)), "dims")  # the pruner's groups, traced alike
    masked = _zeroed(model, pruner.coupling, removal)
    applied = pruner.apply(removal)
    rotated = int(8 * rotary) // 2  # rotary pairs, 1 of each 2 cut; then the unrotated dims
    want = 2 * (rotated - rotated // 2) + (8 - 2 * rotated) - (8 - 2 * rotated) // 2
    assert applied.attributes["gpt_neox.layers.0.attention"]["head_size"] == [8, want]
    with torch.no_grad():
        got, expected = model(ids).logits, masked(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    result = export(model, tmp_path / "out", ["hf"], plan=Plan.from_pruner(pruner, "neox"))
    assert "hf" not in result.files  # a config derives head_size from hidden_size / heads
    fresh = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(fresh, tmp_path / "out")(ids).logits, got,
                                   atol=1e-5, rtol=1e-4)
