"""Shared fixtures: models are small and built with random weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The tiny llama checkpoint below is about 420 KB: under this cap its decoder layers go to disk.
OFFLOAD_CAP = "300KB"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with ``save_pretrained`` in 100 KB safetensors shards (the
    large-model paths: offloaded importance, streaming replay)."""
    from explorer import load_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama") / "ckpt"
    load_model("hf:llama?num_hidden_layers=3").model.save_pretrained(folder,
                                                                     max_shard_size="100KB")
    return folder
