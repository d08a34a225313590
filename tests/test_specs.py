"""Tests for explorer.io.specs and the built-in demos."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from explorer.demos import DEMOS, KIND
from explorer.io.specs import (
    LoadedModel,
    ModelFamily,
    SpecError,
    hf_families,
    list_demos,
    load_model,
    parse_input_shape,
)
from explorer.quality.task import ModelKind

DEMO_OUTPUT_SHAPES = {
    "dino_vit": (1, 10),
    "dino_vit_safe": (1, 10),
    "resnet": (1, 10),
    "cnn_concat": (1, 10),
    "llama": (1, 16, 256),
    "mlp": (2, 5),
}


def _run(loaded: LoadedModel) -> torch.Tensor:
    with torch.no_grad():
        out = loaded.model(*loaded.example_inputs)
    return out.logits if hasattr(out, "logits") else out


# ----------------------------------------------------------------------------- demos


def test_demo_registry_is_complete() -> None:
    assert list_demos() == list(DEMOS)
    assert set(DEMOS) == set(KIND) == set(DEMO_OUTPUT_SHAPES)


@pytest.mark.parametrize("name", sorted(DEMO_OUTPUT_SHAPES))
def test_demo_builds_and_runs(name: str) -> None:
    loaded = load_model(f"demo:{name}")
    assert loaded.family is ModelFamily.DEMO and loaded.family == "demo"  # str enum: JSON same
    assert loaded.kind is KIND[name] and isinstance(loaded.kind, ModelKind)
    assert not loaded.model.training
    assert tuple(_run(loaded).shape) == DEMO_OUTPUT_SHAPES[name]


def test_demo_is_reproducible_and_keeps_caller_rng() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = load_model("demo:resnet")
    assert torch.equal(torch.random.get_rng_state(), before)
    b = load_model("demo:resnet")
    assert torch.equal(a.model.fc.weight, b.model.fc.weight)
    assert torch.equal(a.example_inputs[0], b.example_inputs[0])


def test_dino_attention_attributes() -> None:
    exact = load_model("demo:dino_vit").model.blocks[0].attn
    safe = load_model("demo:dino_vit_safe").model.blocks[0].attn
    assert exact.num_heads == 6 and exact.scale == pytest.approx(16**-0.5)
    assert not hasattr(exact, "head_dim")
    assert safe.head_dim == 16
    x = torch.randn(1, 17, 96)
    with torch.no_grad():
        safe.load_state_dict(exact.state_dict())
        assert torch.allclose(exact(x), safe(x))


def test_dino_other_image_size_interpolates_pos_embed() -> None:
    loaded = load_model("demo:dino_vit", input_shape=(2, 3, 48, 48))
    assert tuple(loaded.example_inputs[0].shape) == (2, 3, 48, 48)
    assert tuple(_run(loaded).shape) == (2, 10)


def test_demo_llama_is_eager_without_cache() -> None:
    config = load_model("demo:llama").model.config
    assert config._attn_implementation == "eager"
    assert config.use_cache is False


# ----------------------------------------------------------------------------- timm


def test_timm_resnet18() -> None:
    loaded = load_model("timm:resnet18")
    assert loaded.family == "timm" and loaded.kind == "vision"
    assert tuple(loaded.example_inputs[0].shape) == (1, 3, 224, 224)
    assert tuple(_run(loaded).shape) == (1, 1000)


def test_timm_kwargs_num_classes() -> None:
    loaded = load_model("timm:resnet18?num_classes=7", input_shape=(1, 3, 64, 64))
    assert tuple(loaded.example_inputs[0].shape) == (1, 3, 64, 64)
    assert tuple(_run(loaded).shape) == (1, 7)


def test_timm_vit_img_size() -> None:
    loaded = load_model("timm:vit_tiny_patch16_224?img_size=64&num_classes=3")
    assert tuple(loaded.example_inputs[0].shape) == (1, 3, 64, 64)
    assert tuple(_run(loaded).shape) == (1, 3)


def test_timm_rejected_kwarg() -> None:
    with pytest.raises(SpecError, match="rejected options"):
        load_model("timm:resnet18?no_such_option=1")


@pytest.mark.parametrize(
    ("text", "value"),
    [("7", 7), ("0.5", 0.5), ("true", True), ("False", False), ("none", None), ("avg", "avg")],
)
def test_query_value_parsing(text: str, value: Any) -> None:
    from explorer.io.specs import _parse_value

    assert _parse_value(text) == value
    assert type(_parse_value(text)) is type(value)


# ----------------------------------------------------------------------------- transformers


def test_hf_llama_overrides_config() -> None:
    loaded = load_model("hf:llama?num_key_value_heads=4")
    assert loaded.family == "hf" and loaded.kind == "lm"
    assert loaded.hf_config.num_key_value_heads == 4
    assert loaded.hf_config.hidden_size == 64
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.hf_config.use_cache is False
    assert loaded.example_inputs[0].dtype == torch.long
    assert tuple(_run(loaded).shape) == (1, 16, 256)


def test_hf_sdpa_override_and_seq_len() -> None:
    loaded = load_model("hf:llama?attn_implementation=sdpa", input_shape=(2, 32))
    assert loaded.model.config._attn_implementation == "sdpa"
    assert tuple(_run(loaded).shape) == (2, 32, 256)
    assert int(loaded.example_inputs[0].max()) < 256


@pytest.mark.parametrize("family", hf_families())
def test_hf_families_run(family: str) -> None:
    loaded = load_model(f"hf:{family}")
    with torch.no_grad():
        out = loaded.model(*loaded.example_inputs)
    if family == "bert":
        assert loaded.kind == "encoder"
        assert tuple(out.last_hidden_state.shape) == (1, 16, 64)
    else:
        assert loaded.kind == "lm"
        assert tuple(out.logits.shape) == (1, 16, 256)


def test_hf_meta_device() -> None:
    loaded = load_model("hf:llama", device="meta")
    assert all(p.is_meta for p in loaded.model.parameters())
    assert loaded.example_inputs[0].is_meta


def test_hf_llama2_7b_shape_on_meta() -> None:
    spec = (
        "hf:llama?hidden_size=4096&num_hidden_layers=32&num_attention_heads=32"
        "&num_key_value_heads=32&intermediate_size=11008&vocab_size=32000"
    )
    loaded = load_model(spec, device="meta")
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert 6.7e9 < n_params < 6.8e9
    assert loaded.hf_config.head_dim == 128


def test_hf_config_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    }
    path.write_text(json.dumps(config))
    loaded = load_model(f"hf:{path}")
    assert loaded.kind == "lm" and loaded.hf_config.hidden_size == 32
    assert tuple(_run(loaded).shape) == (1, 16, 100)


def test_hf_config_json_without_model_type(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(SpecError, match="no 'model_type'"):
        load_model(f"hf:{path}")


def test_hf_unknown_config_field() -> None:
    with pytest.raises(SpecError, match="no field 'hiden_size'.*hidden_size"):
        load_model("hf:llama?hiden_size=32")


# ----------------------------------------------------------------------------- factories


FACTORY_SOURCE = """
import torch
from torch import nn


def make():
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def make_tuple():
    return nn.Linear(4, 2), torch.randn(5, 4)


def broken():
    x = 1
    raise RuntimeError("boom")


def wrong():
    return 42
"""


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(FACTORY_SOURCE)
    return path


def test_factory_module_return(factory_file: Path) -> None:
    loaded = load_model(f"{factory_file}:make")
    assert loaded.family == "factory"
    assert tuple(loaded.example_inputs[0].shape) == (1, 4)
    assert tuple(_run(loaded).shape) == (1, 2)


def test_factory_tuple_return(factory_file: Path) -> None:
    loaded = load_model(f"{factory_file}:make_tuple")
    assert tuple(_run(loaded).shape) == (5, 2)


def test_factory_on_meta(factory_file: Path) -> None:
    loaded = load_model(f"{factory_file}:make_tuple", device="meta")
    assert all(p.is_meta for p in loaded.model.parameters())
    assert loaded.example_inputs[0].is_meta


def test_factory_raising_names_file_and_line(factory_file: Path) -> None:
    line = FACTORY_SOURCE.splitlines().index('    raise RuntimeError("boom")') + 1
    with pytest.raises(SpecError, match=rf"boom.*my_models\.py:{line}\b"):
        load_model(f"{factory_file}:broken")


def test_factory_missing_callable(factory_file: Path) -> None:
    with pytest.raises(SpecError, match="no callable 'nope'.*make"):
        load_model(f"{factory_file}:nope")


def test_factory_wrong_return(factory_file: Path) -> None:
    with pytest.raises(SpecError, match="returned int"):
        load_model(f"{factory_file}:wrong")


def test_factory_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.py"
    path.write_text("def make(:\n    pass\n")
    with pytest.raises(SpecError, match=r"bad\.py:1"):
        load_model(f"{path}:make")


# ----------------------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("resnet18", "not recognised.*timm:<name>"),
        ("torchvision:resnet18", "not recognised.*demo:<name>"),
        ("timm:resnet19", "unknown timm model 'resnet19'.*did you mean.*resnet18"),
        ("demo:nope", "unknown demo 'nope'.*dino_vit"),
        ("hf:falcon9", "unknown transformers family 'falcon9'.*no folder of that name.*llama"),
        # a mistyped checkpoint folder: it was "transformers config file 'ckpt' does not exist"
        ("hf:./no/such/ckpt", r"^no folder './no/such/ckpt' \(from 'hf:./no/such/ckpt'\); give a "
                              r"transformers checkpoint folder, a .gguf file or a config.json"),
        ("timm:resnet18?num_classes", "not 'key=value'"),
    ],
)
def test_bad_spec(spec: str, pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        load_model(spec)



def test_a_safetensors_plan_export_read_as_hf_folder_says_what_it_is(tmp_path: Path) -> None:
    """An export whose widths differ between layers is safetensors + plan with a config.json
    of the original widths; read as ``hf:FOLDER`` (``evaluate --model``) it said "check that
    config.json is the one saved with these weights", which it is."""
    pytest.importorskip("transformers")
    folder = tmp_path / "export"
    load_model("hf:llama?num_hidden_layers=1").model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2  # the widths the weights do not have
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match="check that config.json is the one saved"):
        load_model(f"hf:{folder}")
    (folder / "plan.json").write_text("{}")
    with pytest.raises(SpecError, match=r"do not fit its config: .*; it is a safetensors \+ "
                                        r"plan export .*load it with explorer.load_pruned\(None, "):
        load_model(f"hf:{folder}")

def test_missing_factory_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="factory file .*missing.py.* does not exist"):
        load_model(f"{tmp_path / 'missing.py'}:make")


@pytest.mark.parametrize(
    ("text", "shape"),
    [("1,3,224,224", (1, 3, 224, 224)), ("1x3x32x32", (1, 3, 32, 32)), (" (1, 16) ", (1, 16))],
)
def test_parse_input_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "abc", "1,,3", "1,-3", "1x0", "1.5,2"])
def test_parse_input_shape_rejects_junk(text: str) -> None:
    with pytest.raises(SpecError, match="not a list of positive integers"):
        parse_input_shape(text)


def test_vision_input_shape_must_be_4d() -> None:
    with pytest.raises(SpecError, match=r"\(batch, channels, height, width\)"):
        load_model("demo:resnet", input_shape=(3, 32, 32))


def test_lm_input_shape_must_be_2d() -> None:
    with pytest.raises(SpecError, match=r"\(batch, seq_len\)"):
        load_model("hf:llama", input_shape=(1, 3, 16))


# ----------------------------------------------------------------------------- weights


def _reference_and_state(spec: str) -> tuple[LoadedModel, dict[str, torch.Tensor]]:
    ref = load_model(spec)
    with torch.no_grad():
        for p in ref.model.parameters():
            p.add_(torch.randn_like(p))  # differ from the seeded random init
    return ref, {k: v.clone().contiguous() for k, v in ref.model.state_dict().items()}


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_weights_round_trip_torch_save(tmp_path: Path, wrap: str | None) -> None:
    ref, state = _reference_and_state("demo:resnet")
    path = tmp_path / "w.pt"
    torch.save(state if wrap is None else {wrap: state}, path)
    loaded = load_model("demo:resnet", weights=path)
    assert torch.equal(_run(loaded), _run(ref))


def test_weights_round_trip_safetensors(tmp_path: Path) -> None:
    ref, state = _reference_and_state("demo:cnn_concat")
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    loaded = load_model("demo:cnn_concat", weights=str(path))
    assert torch.equal(_run(loaded), _run(ref))


def test_weights_file_missing(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="weights file .*nope.pt.* does not exist"):
        load_model("demo:mlp", weights=tmp_path / "nope.pt")


def test_weights_wrong_keys(tmp_path: Path) -> None:
    _, state = _reference_and_state("demo:mlp")
    state["extra.weight"] = torch.zeros(1)
    del state["fc1.bias"]
    state["fc3.weight"] = torch.zeros(5, 3)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(
        SpecError, match=r"missing keys \(1\): fc1\.bias.*unexpected keys \(1\): extra\.weight"
        r".*shape mismatches \(1\): fc3\.weight"
    ):
        load_model("demo:mlp", weights=path)


def test_weights_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(SpecError, match="not a state dict"):
        load_model("demo:mlp", weights=path)


def test_weights_on_meta(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(load_model("demo:mlp").model.state_dict(), path)
    with pytest.raises(SpecError, match="meta device"):
        load_model("demo:mlp", device="meta", weights=path)
