"""Head cuts of attention that reads its widths through the config or a fused split.

Usage: ``python benchmarks/heads_config.py``. On the tiny random checkpoints of
``tests/test_families.py`` (2 layers, hidden 64, 8 query heads; Phi3 with 2 key/value
groups), cuts at ratio 0.5 with ``random`` scores: Phi3 whole and query heads (its forward
reads ``self.config.num_attention_heads``) and GPT-NeoX head dims (its fused
``query_key_value`` is split by ``view(..., -1, 3 * self.head_size)``). Prints per cut: the
parameters, the query heads and head width of layer 0 after the cut, the largest logit
difference to the original with the same channels zeroed (mask equivalence: 0 up to float
rounding when the cut is right), the export the config allows and the largest logit
difference of the reloaded export to the pruned model. A cut the pre-flight refuses says so.
"""
from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import transformers  # noqa: E402
from test_families import FAMILIES  # noqa: E402
from test_heads import _zeroed  # noqa: E402

from explorer import Plan, Pruner, load_pruned  # noqa: E402
from explorer.io.export import export  # noqa: E402

CUTS = [("phi3", "whole"), ("phi3", "query"), ("gpt_neox", "dims")]


def _model(name: str) -> Any:
    model_type, config = FAMILIES[name]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **config)).eval()


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


def _row(name: str, mode: str) -> str:
    model = _model(name)
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    before = sum(p.numel() for p in model.parameters())
    pruner = Pruner(model, (ids,), importance="random", ratio=0.5, heads=mode,
                    targets="heads")
    removal, report = pruner.checked()
    if report.unsafe:
        u = report.unsafe[0]
        return f"| {name} | {mode} | refused: `{Path(u.location).name}` {u.error[:60]} |"
    masked = _zeroed(model, pruner.coupling, removal)
    pruner.apply(removal)
    after = sum(p.numel() for p in model.parameters())
    attn = next(m for m in model.modules() if "Attention" in type(m).__name__)
    width = getattr(attn, "head_dim", getattr(attn, "head_size", None))
    heads = getattr(attn.config, "num_attention_heads", None)
    pruned = _logits(model, ids)
    mask = (pruned - _logits(masked, ids)).abs().max().item()
    with tempfile.TemporaryDirectory() as tmp:
        result = export(model, Path(tmp) / "out", ["hf"], plan=Plan.from_pruner(pruner, name))
        if "hf" in result.files:
            kind = "hf"
            again = transformers.AutoModelForCausalLM.from_pretrained(result.files["hf"][0])
        else:
            kind = "safetensors + plan"
            again = load_pruned(_model(name), Path(tmp) / "out")
        reload = (_logits(again.eval(), ids) - pruned).abs().max().item()
    return (f"| {name} | {mode} | {before:,} -> {after:,} | {heads} x {width} | {mask:.2g} | "
            f"{kind} | {reload:.2g} |")


def main() -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    print("| family | heads | params | layer 0 after: heads x width | max abs(pruned - "
          "masked) | export | max abs(reloaded - pruned) |")
    print("|---|---|---|---|---|---|---|")
    for name, mode in CUTS:
        print(_row(name, mode))


if __name__ == "__main__":
    main()
