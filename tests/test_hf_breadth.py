"""Transformers architectures outside the built-in families, from tiny random configs.

Each is pruned at 0.5 with whole heads and with head dims. The forward must run with the
same output shape and fewer parameters, and the export must reload: a ``save_pretrained``
folder that ``from_pretrained`` rebuilds with equal logits, or, when no config can describe
the pruned model, safetensors + plan with the reason, which `load_pruned` rebuilds with
equal logits. ``HF_FOLDER`` lists the runs whose config follows the pruning (measured), so
a run that stops producing a loadable config fails.

Run with ``pytest -m zoo tests/test_hf_breadth.py``.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from rebuild import CANNOT, assert_config_rebuilds  # tests/ is on sys.path (no package)
from torch import nn

import explorer
from explorer import Pruner
from explorer.io.export import export, load_pruned
from explorer.io.plan import FOLD_SCHEMA, Plan
from explorer.io.specs import hf_families, load_model

transformers = pytest.importorskip("transformers")

_TEXT = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
         "hidden_size": 64, "vocab_size": 256, "max_position_embeddings": 64}
_IMAGE = {**_TEXT, "image_size": 32, "patch_size": 8, "num_channels": 3, "num_labels": 10}
_SEQ = {**_TEXT, "max_position_embeddings": 70, "num_labels": 3}


@dataclass(frozen=True)
class Arch:
    """One transformers architecture: its class, a tiny config and the head left unpruned."""

    cls: str  # transformers model class
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ("lm_head",)

    @property
    def image(self) -> bool:
        return "Image" in self.cls


ARCHS: dict[str, Arch] = {
    "vit": Arch("ViTForImageClassification", "vit", _IMAGE, ("classifier",)),
    "deit": Arch("DeiTForImageClassification", "deit", _IMAGE, ("classifier",)),
    "swin": Arch("SwinForImageClassification", "swin",
                 {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1],
                  "num_heads": [2, 4], "window_size": 4, "num_labels": 10}, ("classifier",)),
    "convnext": Arch("ConvNextForImageClassification", "convnext",
                     {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1],
                      "num_labels": 10}, ("classifier",)),
    "bert": Arch("BertForSequenceClassification", "bert", _SEQ, ("classifier",)),
    "roberta": Arch("RobertaForSequenceClassification", "roberta", _SEQ,
                    ("classifier.out_proj",)),
    "distilbert": Arch("DistilBertForSequenceClassification", "distilbert",
                       {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128,
                        "vocab_size": 256, "max_position_embeddings": 64, "num_labels": 3},
                       ("classifier",)),
    "mpnet": Arch("MPNetForSequenceClassification", "mpnet", _SEQ, ("classifier.out_proj",)),
    "gpt_neox": Arch("GPTNeoXForCausalLM", "gpt_neox", _TEXT),
    "opt": Arch("OPTForCausalLM", "opt",
                {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "ffn_dim": 128, "vocab_size": 256, "max_position_embeddings": 64,
                 "word_embed_proj_dim": 64}),
    "falcon": Arch("FalconForCausalLM", "falcon",
                   {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "vocab_size": 256, "new_decoder_architecture": False,
                    "multi_query": True}),
    "falcon_gqa": Arch("FalconForCausalLM", "falcon",
                       {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_kv_heads": 2, "vocab_size": 256,
                        "new_decoder_architecture": True}),
    "phi": Arch("PhiForCausalLM", "phi", _TEXT),
    "stablelm": Arch("StableLmForCausalLM", "stablelm", {**_TEXT, "num_key_value_heads": 2}),
    "gemma2": Arch("Gemma2ForCausalLM", "gemma2",
                   {**_TEXT, "head_dim": 16, "num_key_value_heads": 2,
                    "query_pre_attn_scalar": 16, "sliding_window": 8}),
    "olmo": Arch("OlmoForCausalLM", "olmo", {**_TEXT, "pad_token_id": 0, "eos_token_id": 1}),
    "mixtral": Arch("MixtralForCausalLM", "mixtral",
                    {**_TEXT, "num_key_value_heads": 2, "num_local_experts": 4,
                     "num_experts_per_tok": 2}),
}

# Runs whose pruned model a transformers config describes exactly (measured). After a
# head-dim cut the attention scaling is set to the config's value and its ratio folded into
# the query projection at cut time (`explorer.prune.fixups.fold`). Still no
# config: rotary models with head dims (the kept frequencies are a subset no config
# recomputes), Gemma2 (embedding scale, tied embedding). GPT-NeoX's fused query_key_value
# absorbs the ratio in its q rows, and its one kept rotary pair has the frequency a config
# with 8 dims recomputes. ConvNeXt has no attention: both runs are the same.
HF_FOLDER = {(name, "whole") for name in ARCHS} - {("gemma2", "whole")} \
    | {(name, "dims") for name in ("vit", "deit", "swin", "convnext", "bert", "roberta",
                                   "distilbert", "mpnet", "opt", "gpt_neox")}


# Relative-position bias tables: (positions, heads), indexed by a computed position index.
_TABLES = ("relative_position_bias_table.weight", "relative_position_bias_table",
           "relative_attention_bias.weight")


def _build(arch: Arch) -> nn.Module:
    config = transformers.AutoConfig.for_model(arch.model_type, **arch.config)
    torch.manual_seed(0)
    model: nn.Module = getattr(transformers, arch.cls)(config).eval()
    return model


def _inputs(arch: Arch) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if arch.image:
        return torch.randn(2, 3, 32, 32, generator=gen)
    return torch.randint(0, 256, (2, 12), generator=gen)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(x).logits
    return logits


def _runs() -> list[Any]:
    out = []
    for name in ARCHS:
        for heads in ("whole", "dims"):
            out.append(pytest.param(name, heads, id=f"{name}-{heads}"))
    return out


@pytest.mark.zoo
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "heads"), _runs())
def test_prune_and_reload(name: str, heads: str, tmp_path: Path) -> None:
    arch = ARCHS[name]
    model = _build(arch)
    x = _inputs(arch)
    before = _logits(model, x)
    params = sum(p.numel() for p in model.parameters())
    tables = {n: p.shape[-1] for n, p in model.named_parameters() if n.endswith(_TABLES)}
    pruner = Pruner(model, (x,), ratio=0.5, heads=heads, ignored=list(arch.ignored), targets="all")
    report = pruner.step()
    assert report.forward_ok and report.output_shape_ok
    after = _logits(model, x)
    assert after.shape == before.shape
    assert_config_rebuilds(model, report, x, (name, heads) in HF_FOLDER)
    assert sum(p.numel() for p in model.parameters()) < 0.75 * params, report.unsafe
    if heads == "whole":  # relative-position bias tables lose the pruned heads' columns
        cut = {n: p.shape[-1] for n, p in model.named_parameters() if n in tables}
        assert all(cut[n] < tables[n] for n in tables), (tables, cut)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, tmp_path, "hf", plan=Plan.from_pruner(pruner, f"hf:{name}"))
    if "hf" in result.files:
        assert result.config is not None and result.config.ok
        hf_cls: Any = type(model)
        again = hf_cls.from_pretrained(result.files["hf"][0]).eval()
        for key, (_old, new) in result.config.changed.items():
            assert getattr(again.config, key) == new
    else:
        assert result.config is not None and not result.config.ok and result.config.reason
        assert any(m.startswith("hf: no transformers folder: ") for m in result.messages)
        again = load_pruned(_build(arch), tmp_path)
    assert ((name, heads) in HF_FOLDER) == ("hf" in result.files), result.messages
    torch.testing.assert_close(_logits(again, x), after, rtol=0, atol=1e-5)


# Built-in families (``hf:<family>``) whose config describes them after whole heads are cut
# at 0.5 (measured); the zoo checks the same after head-dim cuts (tests/test_zoo.py).
# Gemma's tied embedding cannot absorb its embedding scale; bert's (AutoModel, whose output
# pins the residual) widths differ between layers. Phi3 reads ``head_dim`` its config does
# not define: the config gets it (`explorer.prune.fixups.hfconfig._IMPLICIT`).
BUILTIN_DESCRIBED = {"llama", "qwen2", "mistral", "gpt2", "phi3"}


@pytest.mark.zoo
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", hf_families())
def test_builtin_family_rebuilds_from_its_config(name: str) -> None:
    lm = load_model(f"hf:{name}")
    ignored = ["lm_head"] if hasattr(lm.model, "lm_head") else []
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.5, heads="whole", ignored=ignored,
                    targets="all")
    report = pruner.step()
    assert report.forward_ok
    assert_config_rebuilds(lm.model, report, lm.example_inputs[0], name in BUILTIN_DESCRIBED)
    assert bool(pruner.config_note) == (name not in BUILTIN_DESCRIBED)  # the app shows it
    pruner.undo()
    assert pruner.config_note == ""  # the unpruned model: its config describes it


@pytest.mark.zoo
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["stablelm", "phi", "gpt_neox"])
def test_partial_rotary_head_dims(name: str, tmp_path: Path) -> None:
    """Partial rotary: the rotated slice ``q[..., :rotary_ndims]`` loses whole pairs (i,
    i + r/2) with their frequency ``inv_freq[i]``, the slice bound follows, and the pass-through
    dims are cut on their own. Scores stay a function of relative positions only."""
    arch = ARCHS[name]
    model: Any = _build(arch)
    x = _inputs(arch)
    pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    config: Any = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    rotary = int(head_dim * config.rope_parameters["partial_rotary_factor"])
    pruner = Pruner(model, (x,), ratio=0.5, heads="dims", ignored=list(arch.ignored), targets="all")
    report = pruner.step()
    assert not report.unsafe and report.forward_ok
    (inv_freq,) = [b for n, b in model.named_buffers() if n.rpartition(".")[2] == "inv_freq"]
    assert 0 < 2 * inv_freq.numel() < rotary  # rotary pairs were cut, not all
    for module in model.modules():  # the slice bound the forward reads follows
        if hasattr(module, "rotary_ndims") and name != "gpt_neox":  # neox reads cos.shape
            assert module.rotary_ndims == 2 * inv_freq.numel()
    keeps = {k: [int(i) for i in v] for a in pruner.applied for k, v in a.keeps.items()}
    kept_freq = keeps[next(k for k in keeps if k[0].rpartition(".")[2] == "inv_freq")]
    if name != "gpt_neox":  # separate q_proj: rows of head 0 inside the rotated slice
        rows = [i for i in keeps[("model.layers.0.self_attn.q_proj.weight", 0)] if i < rotary]
        assert rows == kept_freq + [i + rotary // 2 for i in kept_freq]
    # a replay of the plan cuts the frequencies kept for dynamic rope (original_inv_freq,
    # read by no traced op) as the step did, so a meta replay sees the same shapes
    fresh = _build(arch)
    Plan.from_pruner(pruner, f"hf:{name}").apply(fresh, update_config=False)
    assert {n: b.shape for n, b in fresh.named_buffers()} == \
        {n: b.shape for n, b in model.named_buffers()}
    with torch.no_grad():  # a pair cut apart would make scores depend on absolute positions
        a = model(x, position_ids=pos).logits
        b = model(x, position_ids=pos + 7).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, tmp_path, "hf", plan=Plan.from_pruner(pruner, f"hf:{name}"))
    # a config with fewer dims recomputes base**(-2i/dims): the same frequency only for
    # i = 0, so only a cut keeping just the first pair exports a transformers folder
    # (GPT-NeoX here, with its scaling folded into the q rows of query_key_value)
    assert ("hf" in result.files) == (kept_freq == [0]), (kept_freq, result.messages)
    if "hf" in result.files:
        again: Any = type(model).from_pretrained(result.files["hf"][0]).eval()
    else:
        assert result.config is not None and "rotary frequencies" in result.config.reason
        again = load_pruned(_build(arch), tmp_path)
    torch.testing.assert_close(_logits(again, x), a, rtol=0, atol=1e-5)


@pytest.mark.zoo
@pytest.mark.timeout(120)
@pytest.mark.parametrize("heads", ["whole", "dims"])
def test_falcon_multi_query(heads: str, tmp_path: Path) -> None:
    """Falcon's fused multi-query ``query_key_value``: rows are (q heads + k + v) x head_dim,
    k and v picked by the constant lists ``[-2]``/``[-1]``. Whole heads cut query heads and
    keep the shared key/value head whole; head dims cut q, k and v dims alike."""
    arch = ARCHS["falcon"]
    model: Any = _build(arch)
    x = _inputs(arch)
    qkv = model.transformer.h[0].self_attention.query_key_value.weight.detach().clone()
    pruner = Pruner(model, (x,), ratio=0.5, heads=heads, ignored=list(arch.ignored), targets="all")
    report = pruner.step()
    assert not report.unsafe and report.forward_ok
    attn = model.transformer.h[0].self_attention
    keeps = {k[1]: [int(i) for i in v] for a in pruner.applied for k, v in a.keeps.items()
             if k[0] == "transformer.h.0.self_attention.query_key_value.weight"}
    keep_rows = keeps[0]
    if heads == "whole":
        assert (attn.num_heads, attn.head_dim) == (2, 16)
        assert keep_rows[-32:] == list(range(64, 96))  # the shared k and v head, whole
        q_heads = {i // 16 for i in keep_rows[:-32]}
        assert len(q_heads) == 2 and keep_rows[:-32] == [16 * h + d for h in sorted(q_heads)
                                                         for d in range(16)]
        torch.testing.assert_close(attn.query_key_value.weight[-32:], qkv[64:96][:, keeps[1]])
    else:
        assert (attn.num_heads, attn.head_dim) == (4, 8)
        dims = [[i % 16 for i in keep_rows if i // 16 == h] for h in range(6)]
        assert all(d == dims[0] for d in dims)  # one head-dim cut for q, k and v
    after = _logits(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, tmp_path, "hf", plan=Plan.from_pruner(pruner, "hf:falcon"))
    if heads == "whole":
        assert result.config is not None and result.config.ok
        assert model.config.num_attention_heads == 2 and model.transformer.num_heads == 2
        again: Any = type(model).from_pretrained(result.files["hf"][0]).eval()
    else:  # the rotary frequencies of the cut dims are gone: no config says that
        again = load_pruned(_build(arch), tmp_path)
    torch.testing.assert_close(_logits(again, x), after, rtol=0, atol=1e-5)
    # the plan replays on a meta copy, where ``[-2]`` is an index tensor with no values:
    # the trace reads the list off the indexing expression, so the replay agrees
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, tmp_path / "st", "safetensors",
               plan=Plan.from_pruner(pruner, "hf:falcon"))
    torch.testing.assert_close(_logits(load_pruned(_build(arch), tmp_path / "st"), x), after,
                               rtol=0, atol=1e-5)


@pytest.mark.zoo
@pytest.mark.timeout(120)
def test_derived_constant_fallback_reason(tmp_path: Path) -> None:
    """Gemma2 scales its embeddings by ``sqrt(hidden_size)``, a constant its constructor
    derives from the config. After the residual is cut the pruned model keeps 8.0, a config
    build would compute sqrt(32); the embedding is tied to ``lm_head``, so the ratio cannot
    be folded into the weight. The export says so and falls back to safetensors + plan."""
    arch = ARCHS["gemma2"]
    model: Any = _build(arch)
    x = _inputs(arch)
    pruner = Pruner(model, (x,), ratio=0.5, heads="whole", ignored=list(arch.ignored),
                    targets="all")
    report = pruner.step()
    assert not report.unsafe
    after = _logits(model, x)
    assert model.model.embed_tokens.scalar_embed_scale == 8.0  # the function is kept
    (said,) = [n for n in report.notes if n.startswith(CANNOT)]  # and the cut says why
    assert "'model.embed_tokens.weight' is tied to 'lm_head.weight'" in said
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, tmp_path, "hf", plan=Plan.from_pruner(pruner, "hf:gemma2"))
    assert result.config is not None and not result.config.ok
    reason = result.config.reason
    assert reason.startswith("model.embed_tokens.scalar_embed_scale is 8.0 in the pruned model")
    assert "proportional to hidden_size**0.5" in reason
    assert "'model.embed_tokens.weight' is tied to 'lm_head.weight'" in reason
    torch.testing.assert_close(_logits(load_pruned(_build(arch), tmp_path), x), after,
                               rtol=0, atol=1e-5)


def _cut(original: torch.Tensor, pruner: Pruner, name: str) -> torch.Tensor:
    """``original`` (tensor ``name`` before pruning) with the pruner's cuts, unfolded."""
    out = original
    for applied in pruner.applied:
        for dim in range(out.dim()):
            keep = applied.keeps.get((name, dim))
            if keep is not None:
                out = out.index_select(dim, torch.tensor(keep))
    return out


@pytest.mark.zoo
@pytest.mark.timeout(120)
def test_fold_attention_scaling(tmp_path: Path) -> None:
    """Head dims cut 16 -> 8 would keep the scaling 1/4 the model was built with, where a
    config with 8 dims builds 1/sqrt(8). At cut time the scaling becomes the config's value
    and the query projection absorbs the ratio (same outputs, said in the report); an undo
    puts back the exact tensors and scaling; the plan records the fold and replays it bit
    for bit, and the export writes the model as it is."""
    arch = ARCHS["bert"]
    model: Any = _build(arch)
    x = _inputs(arch)
    query = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = Pruner(model, (x,), ratio=0.5, heads="dims", ignored=list(arch.ignored), targets="all")
    report = pruner.step()
    assert not report.unsafe
    assert any("bert.encoder.layer.0.attention.self.scaling 0.25 -> 0.353553" in n and
               "folded into 4 weights (same outputs)" in n for n in report.notes), report.notes
    after = _logits(model, x)
    attn = model.bert.encoder.layer[0].attention.self
    assert attn.attention_head_size == 8 and attn.scaling == pytest.approx(8 ** -0.5)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(attn.query.weight, _cut(query, pruner, name) * 0.25 / 8 ** -0.5)
    plan = Plan.from_pruner(pruner, "hf:bert")
    assert plan.to_dict()["schema"] == FOLD_SCHEMA
    assert plan.steps[0].constants["bert.encoder.layer.0.attention.self"] == {
        "scaling": [0.25, 8 ** -0.5]}
    fresh = _build(arch)
    Plan.loads(json.dumps(plan.to_dict())).apply(fresh)
    assert all(torch.equal(t, fresh.state_dict()[k]) for k, t in model.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, tmp_path, "hf", plan=plan)
    assert "hf" in result.files and not any("folded" in m for m in result.messages)
    again: Any = type(model).from_pretrained(result.files["hf"][0]).eval()
    torch.testing.assert_close(_logits(again, x), after, rtol=0, atol=1e-5)
    pruner.undo()
    assert attn.scaling == 0.25
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())


@pytest.mark.zoo
@pytest.mark.timeout(120)
def test_fold_fused_qkv(tmp_path: Path) -> None:
    """GPT-NeoX fuses q, k and v in one projection, viewed as (heads, 3 x head_dim) and split
    into q, k and v: the scaling is folded into the rows of ``query_key_value`` (weight and
    bias) that produce q, and the k and v rows are left as they were. Two steps fold twice;
    the plan's replay multiplies the same elements by the same factors (bit-identical)."""
    arch = ARCHS["gpt_neox"]
    model: Any = _build(arch)
    x = _inputs(arch)
    attn = model.gpt_neox.layers[0].attention
    qkv = {n: p.detach().clone() for n, p in attn.query_key_value.named_parameters()}
    pruner = Pruner(model, (x,), ratio=0.5, heads="dims", ignored=list(arch.ignored), targets="all")
    assert not pruner.step().unsafe
    after = _logits(model, x)
    assert attn.head_size == 8 and attn.scaling == pytest.approx(8 ** -0.5)
    q_rows = torch.tensor([24 * h + d for h in range(4) for d in range(8)])  # (h, q|k|v, d)
    kv_rows = torch.tensor([r for r in range(96) if r not in set(q_rows.tolist())])
    factor = 0.25 / 8 ** -0.5
    prefix = "gpt_neox.layers.0.attention.query_key_value."
    for n, p in attn.query_key_value.named_parameters():
        cut = _cut(qkv[n], pruner, prefix + n)
        torch.testing.assert_close(p[q_rows], cut[q_rows] * factor)
        assert torch.equal(p[kv_rows], cut[kv_rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, tmp_path, "hf", plan=Plan.from_pruner(pruner, "hf:gpt_neox"))
    assert "hf" in result.files, result.messages
    again: Any = type(model).from_pretrained(result.files["hf"][0]).eval()
    torch.testing.assert_close(_logits(again, x), after, rtol=0, atol=1e-5)


@pytest.mark.zoo
@pytest.mark.timeout(120)
def test_two_folds_replay_bit_for_bit(tmp_path: Path) -> None:
    """Two head-dim steps fold twice (16 -> 12 -> 8 dims); the plan's replay multiplies the
    same elements by the same factors in the same order: the same state, bit for bit, and
    `load_pruned` of a safetensors export (folded weights, plan) gives the same logits."""
    arch = ARCHS["bert"]
    model: Any = _build(arch)
    x = _inputs(arch)
    pruner = Pruner(model, (x,), ratio=0.5, iterative_steps=2, heads="dims",
                    ignored=list(arch.ignored), targets="all")
    assert pruner.step() and pruner.step()
    assert [len(a.constants) for a in pruner.applied] == [2, 2]
    fresh = _build(arch)
    plan = Plan.from_pruner(pruner, "hf:bert")
    plan.apply(fresh)
    assert all(torch.equal(t, fresh.state_dict()[k]) for k, t in model.state_dict().items())
    assert torch.equal(_logits(fresh, x), _logits(model, x))
    export(model, tmp_path, "safetensors", plan=plan)
    torch.testing.assert_close(_logits(load_pruned(_build(arch), tmp_path), x),
                               _logits(model, x), rtol=0, atol=1e-6)


@pytest.mark.zoo
@pytest.mark.timeout(120)
def test_fold_embedding_scale_untied(tmp_path: Path) -> None:
    """With untied embeddings, Gemma2's embedding scale (attribute and buffer) is set to
    sqrt(32) at cut time and the ratio folded into the embedding weight: a config describes
    the model."""
    arch = ARCHS["gemma2"]
    arch = Arch(arch.cls, arch.model_type, {**arch.config, "tie_word_embeddings": False})
    model: Any = _build(arch)
    x = _inputs(arch)
    embed = model.model.embed_tokens.weight.detach().clone()
    pruner = Pruner(model, (x,), ratio=0.5, heads="whole", ignored=list(arch.ignored),
                    targets="all")
    report = pruner.step()
    assert not report.unsafe
    assert_config_rebuilds(model, report, x, True)
    after = _logits(model, x)
    assert model.model.embed_tokens.scalar_embed_scale == pytest.approx(32 ** 0.5)
    torch.testing.assert_close(model.model.embed_tokens.weight,
                               _cut(embed, pruner, "model.embed_tokens.weight") * 8.0 / 32 ** 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, tmp_path, "hf", plan=Plan.from_pruner(pruner, "hf:gemma2"))
    assert "hf" in result.files, result.messages
    again: Any = type(model).from_pretrained(result.files["hf"][0]).eval()
    torch.testing.assert_close(_logits(again, x), after, rtol=0, atol=1e-5)


@pytest.mark.zoo
@pytest.mark.timeout(120)
def test_falcon_grouped_kv_whole_heads(tmp_path: Path) -> None:
    """Falcon's ``new_decoder_architecture``: one fused ``query_key_value`` whose rows are
    (kv heads) x (query heads per kv head + k + v) x head_dim; the key and value positions
    are picked by ``[-2]``/``[-1]`` and broadcast to the query heads before SDPA. The fused
    weight's key piece spans the kv heads only, so whole heads are cut as whole kv groups:
    a group's query heads, its key and its value together, and ``num_kv_heads`` follows."""
    arch = ARCHS["falcon_gqa"]
    model: Any = _build(arch)
    x = _inputs(arch)
    qkv = model.transformer.h[0].self_attention.query_key_value.weight.detach().clone()
    pruner = Pruner(model, (x,), ratio=0.5, heads="whole", ignored=list(arch.ignored),
                    targets="all")
    group = next(g for g in pruner.coupling.groups if g.heads is not None)
    assert (group.heads.num_heads, group.heads.kv_heads) == (4, 2)
    report = pruner.step()
    assert not report.unsafe and report.forward_ok
    attn = model.transformer.h[0].self_attention
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (2, 1, 16)
    keeps = {k[1]: [int(i) for i in v] for a in pruner.applied for k, v in a.keeps.items()
             if k[0] == "transformer.h.0.self_attention.query_key_value.weight"}
    (kept_group,) = {i // 64 for i in keeps[0]}  # 64 rows per kv group: (2 q + k + v) x 16
    assert keeps[0] == list(range(64 * kept_group, 64 * kept_group + 64))
    torch.testing.assert_close(attn.query_key_value.weight, qkv[keeps[0]][:, keeps[1]])
    after = _logits(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, tmp_path, "hf", plan=Plan.from_pruner(pruner, "hf:falcon"))
    assert result.config is not None and result.config.ok, result.messages
    again: Any = type(model).from_pretrained(result.files["hf"][0]).eval()
    assert (again.config.num_attention_heads, again.config.num_kv_heads) == (2, 1)
    torch.testing.assert_close(_logits(again, x), after, rtol=0, atol=1e-5)


def _shard_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            out.update({k: f.get_tensor(k).clone() for k in names})
    return out


def _save_checkpoint(model: Any, folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)


@pytest.mark.zoo
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["bert", "opt", "gpt_neox"])
def test_streamed_replay_folds_like_export(name: str, tmp_path: Path) -> None:
    """`replay --checkpoint` (shard by shard, no model in memory) writes the folder the
    in-memory export writes: the attention scaling folded into the same query weights (the
    q rows of GPT-NeoX's fused query_key_value), bit for bit, and the same config.json."""
    from explorer.io.stream import OutputKind, replay_checkpoint

    arch = ARCHS[name]
    model: Any = _build(arch)
    x = _inputs(arch)
    _save_checkpoint(model, tmp_path / "ckpt")  # GPT-NeoX's lm_head is saved as embed_out
    pruner = Pruner(model, (x,), ratio=0.5, heads="dims", ignored=list(arch.ignored), targets="all")
    assert not pruner.step().unsafe
    plan = Plan.from_pruner(pruner, f"hf:{tmp_path / 'ckpt'}/config.json")
    after = _logits(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = export(model, tmp_path / "export", "hf", plan=plan)
    assert "hf" in exported.files, exported.messages
    res = replay_checkpoint(tmp_path / "ckpt", plan, tmp_path / "stream")
    assert res.kind is OutputKind.HF, res.messages
    assert any("scaling 0.25 -> 0.353553" in m and "folded into 4 weights" in m
               for m in res.messages), res.messages
    want, got = _shard_tensors(tmp_path / "export" / "hf"), _shard_tensors(tmp_path / "stream")
    assert set(got) == set(want)  # the checkpoint's own names (embed_out for GPT-NeoX)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []  # bit-identical
    config = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert config == json.loads((tmp_path / "export" / "hf" / "config.json").read_text())
    again: Any = type(model).from_pretrained(tmp_path / "stream").eval()
    torch.testing.assert_close(_logits(again, x), after, rtol=0, atol=1e-5)


@pytest.mark.zoo
@pytest.mark.timeout(120)
def test_streamed_replay_repeats_a_buffer_fold(tmp_path: Path) -> None:
    """Gemma2 (untied) keeps its embedding scale in a buffer the constructor computes. The
    weightless copy of a streamed replay has no buffer values to fold it on its own, but the
    pruner folded it at cut time, with weights and a forward check, and the plan records it:
    the streamed replay repeats it and writes a transformers folder that loads the model."""
    from explorer.io.stream import OutputKind, replay_checkpoint

    arch = ARCHS["gemma2"]
    arch = Arch(arch.cls, arch.model_type, {**arch.config, "tie_word_embeddings": False})
    model: Any = _build(arch)
    x = _inputs(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "ckpt")
    pruner = Pruner(model, (x,), ratio=0.5, heads="whole", ignored=list(arch.ignored),
                    targets="all")
    assert not pruner.step().unsafe
    plan = Plan.from_pruner(pruner, f"hf:{tmp_path / 'ckpt'}/config.json")
    res = replay_checkpoint(tmp_path / "ckpt", plan, tmp_path / "stream")
    assert res.kind is OutputKind.HF, res.messages
    assert any("model.embed_tokens.scalar_embed_scale 8 -> 5.65685 as the plan folded them"
               in m for m in res.messages), res.messages
    again: Any = type(model).from_pretrained(tmp_path / "stream").eval()
    torch.testing.assert_close(_logits(again, x), _logits(model, x), rtol=0, atol=1e-5)


@pytest.mark.zoo
@pytest.mark.timeout(120)
def test_streamed_replay_refuses_tensors_transformers_converts(tmp_path: Path) -> None:
    """Mixtral checkpoints store each expert's weights apart, fused into one tensor when
    transformers loads them: there is no model tensor to cut one checkpoint tensor by, so
    the streamed replay refuses in one line naming the tensor, and writes nothing."""
    from explorer.io.stream import StreamError, replay_checkpoint

    arch = ARCHS["mixtral"]
    model: Any = _build(arch)
    _save_checkpoint(model, tmp_path / "ckpt")
    names = _shard_tensors(tmp_path / "ckpt")
    assert any(".experts.0." in n for n in names)  # saved per expert, as on the Hub
    pruner = Pruner(model, (_inputs(arch),), ratio=0.5, ignored=list(arch.ignored), targets="all")
    assert not pruner.step().unsafe
    plan = Plan.from_pruner(pruner, f"hf:{tmp_path / 'ckpt'}/config.json")
    with pytest.raises(StreamError, match="converted when transformers loads it") as err:
        replay_checkpoint(tmp_path / "ckpt", plan, tmp_path / "stream")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "stream").exists()


@pytest.mark.zoo
@pytest.mark.timeout(120)
def test_streamed_replay_of_renamed_checkpoint_keys_loads_back(tmp_path: Path) -> None:
    """GPT-NeoX checkpoints store the LM head as ``embed_out.weight`` (transformers renames
    it to ``lm_head.weight`` on load): the streamed replay follows the renaming, cuts it,
    keeps the checkpoint's name, and ``load_pruned`` reads it back with the plan."""
    from explorer.io.stream import OutputKind, replay_checkpoint

    arch = ARCHS["gpt_neox"]
    model: Any = _build(arch)
    x = _inputs(arch)
    _save_checkpoint(model, tmp_path / "ckpt")
    assert "embed_out.weight" in _shard_tensors(tmp_path / "ckpt")
    pruner = Pruner(model, (x,), ratio=0.3, heads="whole", ignored=list(arch.ignored),
                    targets="all")
    assert not pruner.step().unsafe
    plan = Plan.from_pruner(pruner, f"hf:{tmp_path / 'ckpt'}/config.json")
    after = _logits(model, x)
    res = replay_checkpoint(tmp_path / "ckpt", plan, tmp_path / "stream")
    assert res.tensors_cut > 0
    got = _shard_tensors(tmp_path / "stream")
    assert "embed_out.weight" in got and "lm_head.weight" not in got
    assert got["embed_out.weight"].shape == model.lm_head.weight.shape  # cut like the model
    assert res.kind is OutputKind.SAFETENSORS, res.messages  # hidden widths differ
    again: Any = explorer.load_pruned(f"hf:{tmp_path / 'stream'}/original_config.json",
                                      tmp_path / "stream").eval()
    torch.testing.assert_close(_logits(again, x), after, rtol=0, atol=1e-5)


@pytest.mark.zoo
@pytest.mark.timeout(120)
def test_moe_on_meta_traces_in_bf16_and_keeps_its_dtypes(tmp_path: Path) -> None:
    """Mixtral's experts run through grouped_mm, whose meta kernel takes bf16 only: a
    weightless model is traced again in bf16 (its tensors put back to float32 after), so
    planning on meta works; the pre-flight then names the kernel's own rule (rows of a
    multiple of 16 bytes: cut experts to 67 of 96 and it fails), which round_to=8 meets."""
    from explorer.graph.tracer import trace as raw_trace
    from explorer.io.specs import load_model

    arch = ARCHS["mixtral"]
    _save_checkpoint(_build(arch), tmp_path / "ckpt")
    lm = load_model(f"hf:{tmp_path / 'ckpt'}", device="meta")
    before = {n: t.dtype for n, t in lm.model.state_dict().items()}
    tensors = dict(lm.model.named_parameters())
    graph = raw_trace(lm.model, lm.example_inputs)
    assert any("grouped_mm" in node.name for node in graph.ops)
    assert {n: t.dtype for n, t in lm.model.state_dict().items()} == before
    assert all(t is tensors[n] for n, t in lm.model.named_parameters())  # same objects
    experts = [p for p in Pruner(lm.model, lm.example_inputs, ratio=0.3,
                                 heads="whole",
                                 targets="all").proposals() if "experts" in p.group.title]
    assert experts
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.3, heads="whole", targets="all")
    verdict = pruner.preflight().check(experts[0].removal())
    assert not verdict.ok and "multiple of 16 bytes" in verdict.error
    report = Pruner(lm.model, lm.example_inputs, ratio=0.3, heads="whole", round_to=8,
                    targets="all").step()
    assert not report.unsafe and report.forward_ok
    cut = [c for c in report.changes if c.removed and "experts" in c.title]
    assert cut and all(c.width_after % 8 == 0 for c in cut)
    assert lm.model.model.layers[0].mlp.experts.down_proj.shape[-1] == cut[0].width_after
    assert {n: t.dtype for n, t in lm.model.state_dict().items()} == \
        {n: before[n] for n in lm.model.state_dict()}  # float32 still, after the cut


@pytest.mark.zoo
@pytest.mark.timeout(120)
def test_streamed_replay_copies_tensors_transformers_drops_on_load(tmp_path: Path) -> None:
    """Old GPT-2 checkpoints hold each block's causal mask as ``attn.bias``, which
    transformers drops on load (``_keys_to_ignore_on_load_unexpected``): the streamed
    replay copies them through uncut instead of calling the plan one for another model."""
    from safetensors.torch import load_file, save_file

    from explorer.io.stream import replay_checkpoint

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=256,
                                     n_positions=32)
    torch.manual_seed(0)
    model: Any = transformers.GPT2LMHeadModel(config).eval()
    _save_checkpoint(model, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(shard))
    mask = torch.tril(torch.ones(32, 32, dtype=torch.bool)).view(1, 1, 32, 32)
    for i in range(2):
        tensors[f"transformer.h.{i}.attn.bias"] = mask.clone()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    pruner = Pruner(model, (x,), ratio=0.5, heads="whole", targets="all")
    assert not pruner.step().unsafe
    plan = Plan.from_pruner(pruner, f"hf:{tmp_path / 'ckpt'}/config.json")
    res = replay_checkpoint(tmp_path / "ckpt", plan, tmp_path / "stream")
    got = _shard_tensors(tmp_path / "stream")
    assert torch.equal(got["transformer.h.0.attn.bias"], mask)  # copied through
    if res.kind.value == "hf":
        again: Any = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "stream").eval()
    else:
        again = explorer.load_pruned(f"hf:{tmp_path / 'stream'}/original_config.json",
                                     tmp_path / "stream").eval()
    torch.testing.assert_close(_logits(again, x), _logits(model, x), rtol=0, atol=1e-5)


@pytest.mark.timeout(120)
def test_whole_heads_with_the_hidden_size_kept_export_a_config_the_class_lacks(
        tmp_path: Path) -> None:
    """Qwen2's config class has no ``head_dim`` (its attention reads ``getattr(config,
    "head_dim", hidden_size // num_attention_heads)``): whole heads cut with the hidden size
    kept need the head count and an explicit head dim together. The config update finds the
    field by the build's own lookups and moves both; the folder reloads exactly."""
    lm = load_model("hf:qwen2")
    assert not hasattr(lm.model.config, "head_dim")
    x = lm.example_inputs[0]
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.5, heads="whole", targets="heads")
    report = pruner.step()
    assert report.forward_ok
    assert lm.model.config.hidden_size == 64  # the residual stream is not a target
    assert (lm.model.config.num_attention_heads, lm.model.config.head_dim) == (4, 8)
    assert pruner.config_note == ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(lm.model, tmp_path, "hf", plan=Plan.from_pruner(pruner, "hf:qwen2"))
    assert result.config is not None and result.config.ok, result.messages
    again = transformers.AutoModelForCausalLM.from_pretrained(result.files["hf"][0]).eval()
    assert again.config.head_dim == 8 and again.config.num_attention_heads == 4
    torch.testing.assert_close(_logits(again, x), _logits(lm.model, x), rtol=0, atol=1e-5)
