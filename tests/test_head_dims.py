"""Head-dim cuts of rotary models (issue 20, "heads, honestly"): a rotary half counts pairs,
so a layer's kept value dims are always what its query/key dims keep (2 x the kept rotary
pairs, plus the unrotated dims of partial rotary); the statement said before the cut is the
cut the step makes, and a cut the pre-flight still refuses is stated as refused, with what to
do, never counted as removed."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import transformers
from torch import nn

from explorer import Pruner, load_model
from explorer.app.cli import main
from explorer.coupling.heads import head_dim_ties
from explorer.coupling.vocab import AxisRole
from explorer.io.specs import LoadedModel
from explorer.prune.statement import statement
from explorer.render.proposal_view import statement_lines

_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
          "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1,
          "eos_token_id": 2}
# (model_type, config), head_dim 16: 20 % of 16 dims rounds to 13, of 8 rotary pairs to 6
ROTARY = {
    "llama": ("llama", {**_SMALL, "head_dim": 16}),
    "phi3": ("phi3", {**_SMALL, "hidden_size": 128, "num_attention_heads": 8}),  # fused qkv
    "phi": ("phi", {**_SMALL, "num_key_value_heads": 4}),  # partial rotary 0.5: 4 pairs + 8
    "stablelm": ("stablelm", _SMALL),  # partial rotary 0.25: 2 pairs + 12
}


def _model(name: str, tmp: Path) -> LoadedModel:
    model_type, config = ROTARY[name]
    folder = tmp / name
    folder.mkdir()
    transformers.AutoConfig.for_model(model_type, **config).save_pretrained(folder)
    return load_model(f"hf:{folder / 'config.json'}")


def _head_dims(model: nn.Module) -> set[tuple[int, int]]:
    """(q/k width, v width) per head of every attention, from the weights."""
    out = set()
    for _n, mod in model.named_modules():
        cfg = getattr(mod, "config", None)
        heads, kv = getattr(cfg, "num_attention_heads", 0), getattr(cfg, "num_key_value_heads",
                                                                     0)
        out_proj = getattr(mod, "o_proj", getattr(mod, "dense", None))
        if isinstance(out_proj, nn.Linear) and heads and hasattr(mod, "head_dim"):
            v = out_proj.weight.shape[1] // heads
            if hasattr(mod, "qkv_proj"):
                q = (mod.qkv_proj.weight.shape[0] - kv * v) // (heads + kv)
            else:
                q = mod.q_proj.weight.shape[0] // heads
            out.add((q, v))
    return out


@pytest.mark.parametrize("name", sorted(ROTARY))
def test_head_dim_cut_keeps_query_key_and_value_widths_equal(name: str, tmp_path: Path
                                                              ) -> None:
    """Before the fix the value dims were rounded on their own (16 -> 13 against 2 x 6 = 12
    of q/k): the pre-flight refused the head cut and only the MLP was cut."""
    lm = _model(name, tmp_path)
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.2, importance="random")
    said = statement(pruner)
    report = pruner.step()
    assert report.unsafe == [] and report.forward_ok and report.output_shape_ok
    assert {c.axis for c in report.changes} >= {AxisRole.HEAD_DIM}
    (q, v), = _head_dims(lm.model)
    assert q == v < 16
    assert said.refused == [] and said.params_after == report.params_after


def test_ties_pair_the_rotary_half_and_add_unrotated_dims(tmp_path: Path) -> None:
    lm = _model("phi", tmp_path)
    pruner = Pruner(lm.model, lm.example_inputs, importance="random")
    group = next(g for g in pruner.groups if g.heads is not None)
    ties = head_dim_ties(pruner.coupling, group)
    sizes = {a: group.axes[a].size for a in ties}
    assert sorted(sizes.values()) == [16, 16]  # each layer's value dims
    for parts in ties.values():  # 2 x 4 rotary pairs (one table) + 8 unrotated dims
        assert sorted((group.axes[a].size, n) for a, n in parts.items()) == [(4, 2), (8, 1)]
    mlp = next(g for g in pruner.groups if g.heads is None and g.prunable)
    assert head_dim_ties(pruner.coupling, mlp) == {}


def test_smollm2_statement_is_the_cut_made(smollm2: Path) -> None:
    """The issue's case: 64 -> 51 value dims promised, 32 -> 26 rotary pairs, refused at
    ``modeling_llama.py:246``; now 64 -> 52 in every layer and the statement is the step."""
    lm = load_model(f"hf:{smollm2}?num_hidden_layers=2", device="meta")
    pruner = Pruner(copy.deepcopy(lm.model), lm.example_inputs, ratio=0.2, importance="random")
    said = statement(pruner)
    heads = next(t for t in said.losses if t.target == "heads")
    assert "dims per head 64 -> 52 in each of 2 layers (query and key: both rotary halves " \
           "32 -> 26" in heads.details()
    report = pruner.step()
    assert report.unsafe == [] and report.params_after == said.params_after
    attn = pruner.model.model.layers[1].self_attn  # type: ignore[union-attr, index]
    assert attn.q_proj.weight.shape == (9 * 52, 576) and attn.v_proj.weight.shape == (3 * 52, 576)
    assert attn.head_dim == 52


def test_refused_cut_is_stated_as_refused_with_what_to_do(
        capsys: pytest.CaptureFixture[str]) -> None:
    """EVA-02's attention splits heads by a width the residual stream gives (timm's
    ``eva.py``): a head-dim cut fails in the pre-flight, so the statement counts nothing
    for the heads and says why. (GPT-NeoX, the example before, now cuts: its ``head_size``
    follows the cut, `tests/test_heads.py`.)"""
    spec = "timm:eva02_tiny_patch14_224?img_size=28"
    args = ["prune", "--model", spec, "--ratio", "0.2", "--importance", "random",
            "--heads", "dims", "--targets", "heads"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    said = out["targets"]
    heads = next(t for t in said["losses"] if t["target"] == "heads")
    assert heads["cut"] == 0 and heads["params_removed"] == 0
    assert "the pre-flight refuses the cut of 1 group(s)" in heads["note"]
    assert said["params_after"] == out["params_after"]
    assert len(said["refused"]) == 1 and "eva.py" in said["refused"][0]
    assert "heads 'whole' or 'query'" in said["refused"][0]
    assert out["unsafe"][0]["advice"].startswith("left uncut; the model's code splits heads")
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "\n  refused by the pre-flight: group " in text
    assert "; left uncut; the model's code splits heads by a width" in text
    lm = load_model(spec)  # the app's lines: the same statement
    lines = statement_lines(statement(Pruner(lm.model, lm.example_inputs, ratio=0.2,
                                             importance="random", heads="dims",
                                             targets="heads")))
    assert lines[-1].startswith("- **refused by the pre-flight**: group ")
