"""Group titles and page wording: residual streams are named as such, long specs shortened."""
from __future__ import annotations

import pytest

from explorer.api import trace
from explorer.app.display import heading
from explorer.io.specs import load_model

LLAMA = ("hf:llama?hidden_size=64&num_hidden_layers=3&num_attention_heads=4"
         "&num_key_value_heads=4&intermediate_size=128&vocab_size=100")


def _titles(spec: str) -> list[str]:
    lm = load_model(spec, device="meta")
    return [g.title for g in trace(lm.model, lm.example_inputs).groups()]


def test_llama_hidden_width_is_the_residual_stream_not_the_embedding() -> None:
    titles = _titles(LLAMA)
    assert "residual stream (64 ch): model.layers" in titles
    assert "64 ch: model.embed_tokens" not in titles  # its first member's module
    assert "128 ch: model.layers.0.mlp.gate_proj" in titles  # an MLP: one block, no adds
    assert "100 ch: model.embed_tokens" in titles  # the vocabulary is no stream


def test_each_resnet_stage_is_a_residual_stream() -> None:
    pytest.importorskip("timm")
    titles = _titles("timm:resnet18")
    assert [t for t in titles if t.startswith("residual")] == [
        "residual stream (64 ch): layer1", "residual stream (128 ch): layer2",
        "residual stream (256 ch): layer3", "residual stream (512 ch): layer4"]
    assert "64 ch: layer1.0.conv1" in titles  # inside one block


def test_dino_residual_stream_names_its_blocks() -> None:
    assert _titles("demo:dino_vit_safe")[0] == "residual stream (96 ch): blocks"


@pytest.mark.parametrize(("spec", "name", "options"), [
    (LLAMA, "hf:llama", "hidden_size=64 · num_hidden_layers=3 · num_attention_heads=4 · "
                        "num_key_value_heads=4 · intermediate_size=128 · vocab_size=100"),
    ("hf:/models/all-MiniLM-L6-v2/?task=encoder", "hf:…/all-MiniLM-L6-v2", "task=encoder"),
    ("demo:dino_vit", "demo:dino_vit", ""),
])
def test_heading_keeps_the_name_and_moves_options_aside(spec: str, name: str,
                                                        options: str) -> None:
    h = heading(spec)
    assert (h.name, h.options) == (name, options)
