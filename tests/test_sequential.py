"""Layer-by-layer importance on an offloaded model equals the in-memory importance."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLOAD_CAP
from transformers import AutoModelForCausalLM

import explorer
from explorer import load_model
from explorer.io.specs import ATTENTION, load_offloaded
from explorer.prune.calibration import Calibration, random_like
from explorer.prune.importance import make
from explorer.prune.sequential import (
    SequentialError,
    decoder_layers,
    sequential_criterion,
)

CAP = {"cpu": OFFLOAD_CAP}  # the decoder layers go to disk


@pytest.fixture(scope="module")
def calib() -> Calibration:
    ids = torch.full((1, 16), 255, dtype=torch.long)
    return Calibration(random_like((ids,), num_batches=3, batch_size=2))


def _in_memory(ckpt: Path, calib: Calibration) -> tuple:
    # the attention kernel the library builds models with (`load_model`, `load_offloaded`)
    model = AutoModelForCausalLM.from_pretrained(ckpt, use_cache=False,
                                                 attn_implementation=ATTENTION).eval()
    lm = load_model(f"hf:{ckpt}/config.json", device="meta")
    mg = explorer.trace(lm.model, lm.example_inputs)
    crit = make("activation")
    crit.prepare(model, mg.coupling, calib)
    return model, mg, crit


def test_offloaded_sequential_scores_equal_in_memory(ckpt: Path, calib: Calibration,
                                                     tmp_path: Path) -> None:
    _model, mg, reference = _in_memory(ckpt, calib)
    off = load_offloaded(ckpt, max_memory=CAP, offload_folder=tmp_path / "offload")
    assert "model.layers" in off.offloaded or any(m.startswith("model.layers.")
                                                 for m in off.offloaded), off.device_map
    crit = sequential_criterion(off.model, calib)
    assert set(crit._reduced) == set(reference._reduced)
    for name in {n for n, _dim in reference._reduced}:  # every Linear, the LM head included
        for dim in (0, 1):
            np.testing.assert_array_equal(crit.element(name, dim),
                                          reference.element(name, dim), err_msg=name)
    prunable = [g for g in mg.groups() if g.prunable]
    assert prunable
    for g in prunable:
        for ours, theirs in zip(crit.scores(off.model, mg.coupling, g),
                                reference.scores(off.model, mg.coupling, g), strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)
    _name, layers = decoder_layers(off.model)
    assert all(p.device.type == "meta" for p in layers.parameters())  # offloaded again


def test_resident_model_gives_the_same_scores(ckpt: Path, calib: Calibration) -> None:
    model, _mg, reference = _in_memory(ckpt, calib)
    crit = sequential_criterion(model, calib)
    assert reference._reduced
    for name, dim in reference._reduced:
        np.testing.assert_array_equal(crit.element(name, dim), reference.element(name, dim))


def test_sequential_errors(ckpt: Path, calib: Calibration) -> None:
    model = AutoModelForCausalLM.from_pretrained(ckpt, use_cache=False)
    with pytest.raises(SequentialError, match=r"criterion 'magnitude' has no layer-by-layer "
                                              r"form; use one of activation, wanda, taylor"):
        sequential_criterion(model, calib, "magnitude")
    with pytest.raises(SequentialError, match=r"pass offload_folder= for the weights"):
        load_offloaded(ckpt, max_memory=CAP)
    with pytest.raises(SequentialError, match=r"has no list of repeated layers"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_checkpoint_missing_a_weight_is_refused(ckpt: Path, tmp_path: Path) -> None:
    """transformers fills a weight the checkpoint lacks with random values; scores of those
    would be scores of nothing, so loading refuses in one line naming the weight."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "holed"
    shutil.copytree(ckpt, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    shard = folder / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for cap in ({"cpu": "10GB"}, CAP):  # all in memory, and offloaded
        with pytest.raises(SequentialError, match=rf"missing {name}") as err:
            load_offloaded(folder, max_memory=cap, offload_folder=tmp_path / "offload")
        assert "\n" not in str(err.value)


def test_layer_by_layer_criteria_come_from_the_one_registry() -> None:
    """The criteria with a layer-by-layer form and the teaching path's are read from the
    registry of `explorer.prune.importance`, not listed again by name."""
    from explorer.prune.importance import CRITERIA, criterion_names
    from explorer.prune.sequential import SEQUENTIAL_CRITERIA
    from explorer.teach.learn import TAUGHT_CRITERIA

    assert SEQUENTIAL_CRITERIA == ("activation", "wanda", "taylor", "fisher", "obd", "hessian")
    assert tuple(n for n, c in CRITERIA.items() if c.layerwise) == SEQUENTIAL_CRITERIA
    assert set(TAUGHT_CRITERIA) == {"magnitude", "l1", "taylor", "fisher", "activation",
                                    "random"}
    assert criterion_names(aliases=False, general=True) == TAUGHT_CRITERIA
    assert "l2" in criterion_names() and "l2" not in criterion_names(aliases=False)


def test_tied_embeddings_stored_once_are_placed_together(tmp_path: Path) -> None:
    """A checkpoint with tied embeddings stores the matrix once (``embed_tokens``); with the
    model untied while the map was made, ``lm_head`` went to disk under a name the file lacks
    and the first forward died in accelerate with ``KeyError: 'lm_head.weight'`` (SmolLM2's
    one-file folder with ``--max-memory 300MB``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         tie_word_embeddings=True, attn_implementation=ATTENTION)
    dense = LlamaForCausalLM(config).eval()
    dense.save_pretrained(tmp_path / "tied")  # one model.safetensors, no lm_head.weight
    off = load_offloaded(tmp_path / "tied", max_memory={"cpu": "300KB"},
                         offload_folder=tmp_path / "offload")
    assert "disk" in off.device_map.values()  # the layers are offloaded, the matrix is not
    assert off.device_map["lm_head"] == off.device_map["model.embed_tokens"] == "cpu"
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(off.model(ids).logits, dense(ids).logits, atol=1e-5)
