"""The library leaves the caller's state as found: torch's (and numpy's and Python's) random
state, the user's model and its transformers config, and stderr free of progress bars."""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from explorer import Plan, Pruner, evaluate, load_model, load_pruned, trace
from explorer.app.cli import main
from explorer.io.export import export, export_downloads, snapshot
from explorer.io.quiet import quiet_transformers
from explorer.prune.calibration import Calibration
from explorer.prune.sensitivity import scan
from explorer.prune.sequential import sequential_criterion
from explorer.teach.models import build_model

_BAR = ("it/s", "%|")  # what a tqdm bar prints


def _opt(dropout: float = 0.5) -> nn.Module:
    """A tiny OPT whose dropout draws from the global generator in every train-mode forward."""
    cfg = transformers.AutoConfig.for_model(
        "opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        vocab_size=128, max_position_embeddings=32, word_embed_proj_dim=32, dropout=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.OPTForCausalLM(cfg)


def _state() -> tuple[torch.Tensor, Any, Any]:
    return torch.random.get_rng_state(), np.random.get_state(), random.getstate()


def _moved(call: Callable[[], object]) -> list[str]:
    """Which global generators ``call`` advanced (run from a seeded state)."""
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    before = _state()
    call()
    after = _state()
    out = []
    if not torch.equal(before[0], after[0]):
        out.append("torch")
    if not (before[1][1] == after[1][1]).all() or before[1][2:] != after[1][2:]:
        out.append("numpy")
    if before[2] != after[2]:
        out.append("random")
    return out


@dataclass
class _Setup:
    model: nn.Module
    original: nn.Module
    x: torch.Tensor
    plan: Plan
    pruner: Pruner


@pytest.fixture(scope="module")
def pruned() -> _Setup:
    model = _opt().train()
    original = snapshot(model)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    # every target: with the residual stream cut too, the head-dim cut stays one a
    # transformers config describes (the hf export and its scaling fold run)
    pruner = Pruner(model, (x,), ratio=0.5, heads="dims", targets="all")
    plan = Plan.from_pruner(pruner, "opt", reports=[pruner.step()])
    return _Setup(model, original, x, plan, pruner)


def test_dropout_really_draws_in_train_mode(pruned: _Setup) -> None:
    """The oracle: a plain train-mode forward of this model does advance torch's state."""
    with torch.no_grad():
        assert _moved(lambda: pruned.model(pruned.x)) == ["torch"]


def test_entry_points_keep_the_callers_random_state(pruned: _Setup, tmp_path: Path) -> None:
    """Every public entry point on a train-mode model with dropout: trace, pruner (magnitude,
    taylor + compensation, proposals), plan replay, every export format (the head-dim cut
    folds the attention scaling, with its check forwards), reload, evaluation, sensitivity,
    the layer-by-layer criterion, the teaching models."""
    s = pruned
    x, model = s.x, s.model
    calib = Calibration([(x,), (x.flip(0),)])
    fresh = _opt().train()
    folder = tmp_path / "export"
    steps: dict[str, Callable[[], object]] = {
        "trace": lambda: trace(_opt().train(), (x,)),
        "Pruner.step": lambda: Pruner(_opt().train(), (x,), ratio=0.3).step(),
        "Pruner.step taylor + lstsq": lambda: Pruner(
            _opt().train(), (x,), ratio=0.3, importance="taylor", calibration=calib,
            compensate="lstsq").step(),
        "Pruner.proposals": lambda: list(Pruner(_opt().train(), (x,), ratio=0.3).proposals()),
        "Plan.apply": lambda: s.plan.apply(fresh, example_inputs=(x,)),
        "export": lambda: export(model, folder, "pt,safetensors,hf,report", plan=s.plan,
                                 original=s.original, example_inputs=(x,)),
        "export_downloads": lambda: export_downloads(
            model, ["hf", "report"], folder.parent / "downloads", plan=s.plan,
            original=s.original, example_inputs=(x,)),
        "load_pruned": lambda: load_pruned(_opt().train(), folder),
        "evaluate": lambda: evaluate(model, s.original, [(x,)]),
        "sensitivity scan": lambda: scan(Pruner(_opt().train(), (x,), ratio=0.3),
                                         ratios=(0.5,)),
        "sequential_criterion": lambda: sequential_criterion(_opt().train(), calib, "taylor"),
        "teach build_model": lambda: build_model("vit", seed=3),
        "load_model hf": lambda: load_model("hf:llama?num_hidden_layers=1"),
    }
    moved = {name: who for name, call in steps.items() if (who := _moved(call))}
    assert not moved, f"these advanced the caller's global random state: {moved}"
    assert "hf" in export(model, tmp_path / "again", "hf", plan=s.plan,
                          example_inputs=(x,)).files  # the fold ran: its forwards were covered
    assert all(m.training for m in model.modules())  # and the train mode was kept


def _model_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Every module attribute (tensors by identity and value), the config, the generation
    config."""
    attrs: dict[str, Any] = {}
    for name, m in model.named_modules():
        for key, value in vars(m).items():
            if key in ("_parameters", "_buffers"):
                value = {k: None if t is None else (id(t), t.detach().clone())
                         for k, t in value.items()}
            elif key == "_modules":
                value = {k: id(v) for k, v in value.items()}
            elif key in ("config", "generation_config"):
                value = id(value)
            attrs[f"{name}.{key}"] = value
    gen = getattr(model, "generation_config", None)
    return attrs, model.config.to_dict(), gen.to_dict() if gen is not None else {}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], torch.Tensor):
        return a[0] == b[0] and torch.equal(a[1], b[1])
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.parametrize("heads", ["whole", "dims"])
def test_export_leaves_the_users_model_and_config(tmp_path: Path, heads: str) -> None:
    """``save_pretrained`` writes ``architectures`` and ``dtype`` into the config it saves,
    and a head-dim cut folds the attention scaling into the weights to write the folder: the
    folder has them, the user's model (config, generation config, every attribute, tensor
    object and value) is exactly as before."""
    lm = load_model("hf:llama?num_hidden_layers=2")
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.5, heads=heads, round_to=4)
    plan = Plan.from_pruner(pruner, lm.spec, reports=[pruner.step()])
    assert lm.model.config.architectures is None  # what the user's config holds
    before = _model_state(lm.model)
    res = export(lm.model, tmp_path / "out", "hf,pt,safetensors,report", plan=plan,
                 tokenizer=lm.tokenizer)
    after = _model_state(lm.model)
    for part, name in zip(range(3), ("module attributes", "config", "generation config"),
                          strict=True):
        diff = sorted(k for k in before[part].keys() | after[part].keys()
                      if k not in before[part] or k not in after[part]
                      or not _same(before[part][k], after[part][k]))
        assert not diff, f"export changed the user's {name}: {diff[:5]}"
    if heads == "whole":  # the folder's config is complete
        assert "hf" in res.files, res.messages
        saved = transformers.AutoConfig.from_pretrained(tmp_path / "out" / "hf")
        assert saved.architectures == ["LlamaForCausalLM"]
        assert saved.hidden_size == lm.model.config.hidden_size


def _bars_drawn_by_transformers(ckpt: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The oracle: loading the checkpoint directly does draw a bar on stderr."""
    capfd.readouterr()
    transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert any(s in capfd.readouterr().err for s in _BAR), "transformers draws no bar here"


def test_cli_prints_no_progress_bar_and_keeps_the_setting(ckpt: Path, tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str]
                                                         ) -> None:
    """A sharded local checkpoint: transformers draws its "Loading weights" bar when it
    loads it and "Writing model shards" when it saves one. The CLI's export prints neither,
    and a program calling its ``main`` still has transformers' bars on after."""
    from transformers.utils import logging as hf_logging

    _bars_drawn_by_transformers(ckpt, capfd)
    code = main(["export", "--model", f"hf:{ckpt}", "--ratio", "0.5", "--heads", "whole",
                 "--formats", "hf,safetensors", "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err
    assert code == 0 and not any(s in err for s in _BAR), err
    assert (tmp_path / "out" / "hf" / "config.json").is_file()
    assert hf_logging.is_progress_bar_enabled()


def test_loading_is_quiet_and_the_callers_setting_is_kept(ckpt: Path,
                                                          capfd: pytest.CaptureFixture[str]
                                                          ) -> None:
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    _bars_drawn_by_transformers(ckpt, capfd)
    assert hf_logging.is_progress_bar_enabled()
    load_model(f"hf:{ckpt}")
    assert not any(s in capfd.readouterr().err for s in _BAR)
    assert hf_logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # a caller who turned them off keeps them off
    try:
        with quiet_transformers(), quiet_transformers():
            pass
        load_model(f"hf:{ckpt}")
        assert not hf_logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
    with quiet_transformers():  # nested: the outer block's setting holds until it ends
        with quiet_transformers():
            assert not hf_logging.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


def test_quiet_drops_the_loading_threads_own_stderr_only(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A GGUF load draws a plain tqdm bar ("Converting and de-quantizing GGUF tensors") that
    no transformers switch reaches: what the loading thread writes to stderr inside the
    block is dropped, another thread's (a Streamlit session beside it) is not, and stderr is
    the caller's stream again after."""
    import sys
    import threading

    from tqdm.auto import tqdm

    before = sys.stderr
    with quiet_transformers(stderr=True):
        for _ in tqdm(range(3), desc="de-quantizing"):
            pass
        other = threading.Thread(target=lambda: print("beside it", file=sys.stderr))
        other.start()
        other.join()
        with quiet_transformers():  # nested: still quiet after the inner block ends
            print("inner", file=sys.stderr)
        print("still inside", file=sys.stderr)
    with quiet_transformers():  # other loads keep their warnings on stderr
        print("a plain load", file=sys.stderr)
    print("after", file=sys.stderr)
    assert sys.stderr is before
    assert capsys.readouterr().err == "beside it\na plain load\nafter\n"


def test_evaluating_puts_every_mode_and_the_random_state_back() -> None:
    """`graph.rng.evaluating`, the one eval-mode context: eval inside for every model given,
    each submodule's own flag (a train-mode child of an eval-mode parent too) and torch's
    random state back after, also when the body raises."""
    from explorer.graph.rng import evaluating

    a, b = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)), nn.Linear(2, 2)
    a.eval()
    a[1].train()
    state = torch.random.get_rng_state()
    with pytest.raises(RuntimeError, match="inside"), evaluating(a, b, (torch.ones(1, 2),)):
        assert not any(m.training for m in [*a.modules(), b])
        torch.rand(3)  # a draw on the fork
        raise RuntimeError("inside")
    assert [m.training for m in a.modules()] == [False, False, True] and b.training
    assert torch.equal(torch.random.get_rng_state(), state)
