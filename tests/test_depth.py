"""Depth pruning: residual blocks found from the trace and replaced by identity."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from explorer import load_model, trace
from explorer.graph.tracer import trace as raw_trace
from explorer.graph.walk import to_device
from explorer.prune.depth import remove_blocks
from explorer.prune.preflight import meta_copy


@pytest.mark.parametrize("spec,expected", [
    ("demo:dino_vit", ["blocks.0", "blocks.1", "blocks.2"]),
    ("demo:llama", ["model.layers.0", "model.layers.1"]),
    ("timm:resnet18", ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
])
def test_residual_blocks_found_and_removable(spec: str, expected: list[str]) -> None:
    lm = load_model(spec, input_shape=(1, 3, 64, 64) if spec.startswith("timm") else None)
    mg = trace(lm.model, lm.example_inputs)
    blocks = [b.module for b in mg.blocks()]
    assert blocks == expected  # containers (layer1, blocks) are not blocks themselves
    before = sum(p.numel() for p in lm.model.parameters())
    out = lm.model(*lm.example_inputs)
    shape = getattr(out, "logits", out).shape
    copy = meta_copy(lm.model)  # pre-flight on a weightless copy first
    remove_blocks(copy, [blocks[-1]])
    raw_trace(copy, to_device(lm.example_inputs, "meta"))
    removed = remove_blocks(lm.model, [blocks[-1]])
    after = sum(p.numel() for p in lm.model.parameters())
    assert before - after == sum(p.numel() for p in removed[blocks[-1]].parameters())
    out = lm.model(*lm.example_inputs)
    assert getattr(out, "logits", out).shape == shape


def test_skipped_block_is_identity() -> None:
    lm = load_model("demo:dino_vit")
    block = lm.model.blocks[1]
    x = torch.randn(1, 17, 96)
    remove_blocks(lm.model, ["blocks.1"])
    assert torch.equal(lm.model.blocks[1](x), x) and block is not lm.model.blocks[1]


def test_cli_prune_reports_heads_before_after_and_budget() -> None:
    run = subprocess.run([sys.executable, "-m", "explorer", "prune", "--model", "demo:llama",
                          "--heads", "whole", "--target-params", "0.5", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    out = json.loads(run.stdout)
    assert out["params_after"] <= 0.5 * out["params_before"]
    rows = out["attention"]
    assert len(rows) == 2 and rows[0]["before"] == {"num_heads": 8, "head_dim": 8, "kv_heads": 2}
    after = rows[0]["after"]
    assert after["num_heads"] % after["kv_heads"] == 0 and after["num_heads"] < 8
