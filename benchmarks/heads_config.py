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

A second table cuts one key/value group of layer 0 only (whole heads; Phi3 and Llama): why
the export has no ``from_pretrained`` folder, the decoder layer's ``hidden_size`` after the
cut (the residual stream keeps 64), and whether a plan recorded as the engine wrote it before
(``model.layers.0.hidden_size`` 64 -> 32) replays. A third cuts two of four heads of layer 0
of the small custom models of ``tests/test_shared_config.py``, whose attention reads the head
count through the shared config in a helper method (and, in ``derived``, scales by
``config.hidden_size // config.num_attention_heads``).
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
from test_shared_config import _custom, _removal, _resealed  # noqa: E402

from explorer import Plan, Pruner, load_pruned  # noqa: E402
from explorer.coupling.vocab import AxisRole  # noqa: E402
from explorer.io.export import export  # noqa: E402
from explorer.io.plan import PlanError  # noqa: E402
from explorer.prune.preflight import Preflight  # noqa: E402

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


def _one_layer(name: str) -> str:
    model = _model(name)
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    pruner = Pruner(model, (ids,), heads="whole", targets="heads")
    pruner.apply(_removal(pruner, AxisRole.HEADS, layers=1))
    with tempfile.TemporaryDirectory() as tmp:
        result = export(model, Path(tmp) / "out", ["hf"], plan=Plan.from_pruner(pruner, name))
    reason = result.config.reason if result.config is not None and not result.config.ok \
        else "hf folder"
    data = Plan.from_pruner(pruner, name).to_dict()
    data["steps"][0]["attributes"]["model.layers.0"] = {"hidden_size": [64, 32]}
    try:
        Plan.from_dict(_resealed(data)).apply(_model(name))
        replay = "replays"
    except PlanError as e:
        replay = f"refused: {str(e)[:70]}"
    return (f"| {name} | {reason.split('; a transformers')[0]} | "
            f"{model.model.layers[0].hidden_size} | {replay} |")


def _custom_row(derive: bool) -> str:
    model, inputs, pruner, removal = _custom(derive)
    verdict = Preflight(model, inputs, pruner.coupling).check(removal)
    kind = "derived" if derive else "helper"
    if not verdict.ok:
        return f"| {kind} | refused at `{Path(verdict.location).name}`: {verdict.error[:70]} |"
    masked = _zeroed(model, pruner.coupling, removal)
    pruner.apply(removal)
    with torch.no_grad():
        mask = (model(*inputs) - masked(*inputs)).abs().max().item()
    return f"| {kind} | cut, max abs(pruned - masked) {mask:.2g} |"


def main() -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    print("| family | heads | params | layer 0 after: heads x width | max abs(pruned - "
          "masked) | export | max abs(reloaded - pruned) |")
    print("|---|---|---|---|---|---|---|")
    for name, mode in CUTS:
        print(_row(name, mode))
    print()
    print("| family | layer 0 alone: why no hf folder | layers.0.hidden_size | plan recorded "
          "before |")
    print("|---|---|---|---|")
    for name in ("phi3", "llama"):
        print(_one_layer(name))
    print()
    print("| custom attention | 2 of 4 heads of layer 0 |")
    print("|---|---|")
    for derive in (False, True):
        print(_custom_row(derive))


if __name__ == "__main__":
    main()
