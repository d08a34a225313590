"""SmolLM2's real weights dressed as other decoder families (``tests/dressed.py``: Mistral,
Qwen2 with zero q/k/v biases, Phi3 with fused projections, Gemma with its ``1 + w`` norms and
scaled embeddings) are the same model, so the explorer must treat them as one: the same cut,
the same counts, the same pruned function, an export that reloads to it. Two decoder layers
of the real weights and real prose keep this cheap."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from explorer import Pruner
from explorer.io.data import DataOptions, load_data
from explorer.io.export import export
from explorer.io.plan import Plan

transformers = pytest.importorskip("transformers")
from dressed import FAMILIES, dress_model  # noqa: E402 - needs transformers
from smollm2 import truncated  # noqa: E402

LAYERS = 2
# whole key/value groups with their query heads and MLP units, refit: fused qkv_proj and
# gate_up_proj, q/k/v biases, and the norm convention all on the cut's path
SETTINGS: dict[str, Any] = {"importance": "activation", "ratio": 0.3, "heads": "whole",
                            "targets": "mlp,heads", "compensate": "lstsq"}


@pytest.fixture(scope="module")
def reference(smollm2: Path, prose: tuple[Path, Path]) -> dict[str, Any]:
    """SmolLM2 cut to its first layers as the library loads it (Llama, no key/value cache),
    real calibration and held-out prose, its logits before and after the cut, and the cut."""
    lm = truncated(smollm2, LAYERS)
    cal = load_data(prose[0], lm, DataOptions(16, 64, 8))
    held = load_data(prose[1], lm, DataOptions(4, 64, 4))
    dense = _logits(lm.model, held)
    report = Pruner(lm.model, lm.example_inputs, calibration=cal, **SETTINGS).step()
    return {"lm": lm, "cal": cal, "held": held, "dense": dense, "report": report,
            "pruned": _logits(lm.model, held)}


def _logits(model: nn.Module, held: Any) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*b).logits[held.token_mask(b)] for b in held.batches])


def _cut(report: Any) -> list[tuple[str, int, int, list[int]]]:
    return sorted((c.axis.value, c.width_before, c.width_after, c.removed)
                  for c in report.changes)


def _biases(model: nn.Module) -> int:
    """Parameters a family adds to the Llama's function: Qwen2's (zero) q/k/v biases."""
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dressed_family_is_cut_as_the_llama_it_came_from(
        smollm2: Path, reference: dict[str, Any], family: str, tmp_path: Path) -> None:
    """The same removed heads and units in every layer, the same counts (less Qwen2's zero
    biases), the same pruned logits, and the ``hf`` export reloads to them. The dressed model
    keeps transformers' default ``use_cache=True`` (as ``from_pretrained`` gives it): the
    refit used to replay its layers with the key/value cache of the first run among their
    inputs, which grew with every run (``The size of tensor a (128) must match ... (64)``);
    it stays on after the cut."""
    model = dress_model(smollm2, family, LAYERS)
    held, lm = reference["held"], reference["lm"]
    torch.testing.assert_close(_logits(model, held), reference["dense"], rtol=0, atol=2e-4)
    assert model.config.use_cache
    pruner = Pruner(model, lm.example_inputs, calibration=reference["cal"], **SETTINGS)
    report = pruner.step()
    assert model.config.use_cache  # the caller's setting is back
    want = reference["report"]
    assert _cut(report) == _cut(want)
    assert {c[0] for c in _cut(report)} == {"channels", "heads"}
    assert report.params_after - _biases(model) == want.params_after
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.macs_after == want.macs_after
    pruned = _logits(model, held)
    torch.testing.assert_close(pruned, reference["pruned"], rtol=0, atol=1e-3)
    plan = Plan.from_pruner(pruner, f"hf:{family}", reports=[report])
    result = export(model, tmp_path, ["hf"], plan=plan, tokenizer=lm.tokenizer)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        result.files["hf"][0], attn_implementation="eager").eval()  # as the model was run
    assert type(loaded) is type(model)
    assert sum(p.numel() for p in loaded.parameters()) == report.params_after
    torch.testing.assert_close(_logits(loaded, held), pruned, rtol=0, atol=1e-5)
