"""The scoring pass's block outputs read by the reconstruction (`explorer.prune.trajectory`):
the same refits as running the original blocks again, with half the block runs, and never
read once the model or the batches changed. Real SmolLM2 weights cut to their first layers,
real prose."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from smollm2 import truncated
from torch import nn

from explorer import Pruner
from explorer.io.data import DataOptions, load_data
from explorer.io.specs import LoadedModel
from explorer.prune import reconstruct, trajectory
from explorer.prune.calibration import Calibration
from explorer.prune.importance import activation_norms

LAYERS = 2


@pytest.fixture(scope="module")
def small(smollm2: Path, prose: tuple[Path, Path]) -> tuple[LoadedModel, Calibration]:
    lm = truncated(smollm2, LAYERS)
    return lm, load_data(prose[0], lm, DataOptions(12, 32, 4))


def _consumers(model: nn.Module, keep: float = 0.7) -> list[reconstruct.Consumer]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(LAYERS):
        name = f"model.layers.{i}.mlp.down_proj"
        n = model.get_submodule(name).in_features
        kept = torch.randperm(n, generator=gen)[:round(keep * n)].sort().values.numpy()
        out.append(reconstruct.Consumer(name, f"{name}.weight", kept))
    return out


def _recorded(model: nn.Module, cal: Calibration) -> trajectory.Trajectory:
    """A trajectory of the activation scoring pass over the refit's batches."""
    traj = trajectory.Trajectory(model)
    with traj.recording(reconstruct.in_order(cal)):
        activation_norms(model, reconstruct.in_order(cal))
    assert traj.complete
    return traj


@contextmanager
def _block_runs(model: nn.Module) -> Iterator[list[int]]:
    """How many times the decoder layers run, while inside."""
    runs = [0]
    handles = [layer.register_forward_hook(lambda *_a: runs.__setitem__(0, runs[0] + 1))
               for layer in model.model.layers]
    try:
        yield runs
    finally:
        for h in handles:
            h.remove()


def test_the_refit_reads_the_scoring_pass_and_equals_running_the_blocks(
        small: tuple[LoadedModel, Calibration]) -> None:
    lm, cal = small
    consumers = _consumers(lm.model)
    with _block_runs(lm.model) as runs:
        ran = reconstruct.reconstruct(lm.model, consumers, cal)
    ran_blocks = runs[0]
    traj = _recorded(lm.model, cal)
    try:
        with _block_runs(lm.model) as runs:
            read = reconstruct.reconstruct(lm.model, consumers, cal, trajectory=traj)
    finally:
        traj.close()
    assert read.tensors.keys() == ran.tensors.keys() and len(read.tensors) == LAYERS
    for k, v in ran.tensors.items():
        assert torch.equal(read.tensors[k], v), k
    assert [f.choice for f in read.fits] == [f.choice for f in ran.fits]
    # the original blocks ran once a batch besides the pruned stream's run: no more
    batches = len(reconstruct.in_order(cal).batches)
    assert ran_blocks - runs[0] == LAYERS * batches, (ran_blocks, runs[0])


def test_a_changed_model_or_other_batches_are_not_read(
        small: tuple[LoadedModel, Calibration]) -> None:
    lm, cal = small
    consumers = _consumers(lm.model)
    traj = _recorded(lm.model, cal)
    try:
        batches = reconstruct.in_order(cal).batches
        assert traj.matches(lm.model, batches)
        assert not traj.matches(lm.model, batches[:-1])
        other = [tuple(a + (i == 0 and isinstance(a, torch.Tensor)) for i, a in enumerate(b))
                 for b in batches]
        assert not traj.matches(lm.model, other)
        weight = lm.model.get_submodule("model.layers.1.mlp.up_proj").weight
        before = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(0.5)  # in place: same tensor, a new version
        try:
            assert not traj.matches(lm.model, batches)
            with _block_runs(lm.model) as runs:
                read = reconstruct.reconstruct(lm.model, consumers, cal, trajectory=traj)
            ran = reconstruct.reconstruct(lm.model, consumers, cal)
        finally:
            with torch.no_grad():
                weight.copy_(before)
        assert runs[0] > 2 * LAYERS * len(batches)  # the original blocks ran
        for k, v in ran.tensors.items():
            assert torch.equal(read.tensors[k], v), k
    finally:
        traj.close()


def test_a_recording_of_another_pass_is_dropped(
        small: tuple[LoadedModel, Calibration]) -> None:
    lm, cal = small
    traj = trajectory.Trajectory(lm.model)
    folder = traj._dir
    with traj.recording(reconstruct.in_order(cal)):
        activation_norms(lm.model, cal)  # the batches as given, not the refit's
    assert not traj.complete and not folder.exists()


def test_a_step_records_once_reads_and_leaves_no_file(
        small: tuple[LoadedModel, Calibration], monkeypatch: pytest.MonkeyPatch) -> None:
    """`Pruner`: the scoring pass records when the step will refit; the step's refit equals
    one that runs the original blocks; the files are gone after the cut."""
    lm, cal = small
    results = []
    for read in (True, False):
        if not read:
            monkeypatch.setattr(trajectory.Trajectory, "matches", lambda *_a: False)
        pruner = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=0.3,
                        heads="keep", targets="mlp", calibration=cal, compensate="lstsq")
        pruner.checked()  # what the statement runs before the step: the scoring pass
        traj = pruner.trajectory
        assert traj is not None and traj.complete and any(traj._dir.iterdir())
        report = pruner.step()
        assert pruner.trajectory is None and not traj._dir.exists()
        assert any("reconstruction" in n for n in report.notes), report.notes
        results.append({k: v.detach().clone() for k, v in lm.model.state_dict().items()})
        pruner.undo()
    read_state, ran_state = results
    assert read_state.keys() == ran_state.keys()
    widths = {v.shape for k, v in read_state.items() if k.endswith("down_proj.weight")}
    assert len(widths) == 1 and next(iter(widths))[1] < 1536, widths
    for k, v in ran_state.items():
        assert torch.equal(read_state[k], v), k
    assert np.isfinite([float(v.float().abs().max()) for v in read_state.values()]).all()


def test_no_recording_without_a_refit_to_read_it(
        small: tuple[LoadedModel, Calibration]) -> None:
    lm, cal = small
    for compensate in (None, "bias"):
        pruner = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=0.3,
                        heads="keep", targets="mlp", calibration=cal, compensate=compensate)
        pruner.checked()
        assert pruner.trajectory is None


def test_the_last_consumer_is_not_run_where_its_output_adds_to_the_block(
        small: tuple[LoadedModel, Calibration], monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLP down projection of every block after the first of its class is muted in the
    pruned stream (`reconstruct._muted`: its output adds to the block's, the refit's output
    is added after): the same refits as running it, and it runs on no pruned-stream batch."""
    lm, cal = small
    consumers = _consumers(lm.model)
    calls = [0]
    for c in consumers:
        module = lm.model.get_submodule(c.module)
        plain = module.forward

        def counted(x: torch.Tensor, plain: object = plain) -> torch.Tensor:
            calls[0] += 1
            return plain(x)  # type: ignore[operator, no-any-return]

        monkeypatch.setattr(module, "forward", counted, raising=False)
    muted = reconstruct.reconstruct(lm.model, consumers, cal)
    muted_calls = calls[0]

    @contextmanager
    def running(_module: nn.Module, _out: int) -> Iterator[None]:
        yield

    monkeypatch.setattr(reconstruct, "_muted", running)
    calls[0] = 0
    ran = reconstruct.reconstruct(lm.model, consumers, cal)
    batches = len(reconstruct.in_order(cal).batches)
    # running: every block's down projection on every batch of both streams, plus the
    # two runs of the additivity check; muted: the original stream's, and the first batch
    # of the first block in the pruned stream (it finds the additivity)
    assert calls[0] == 2 * LAYERS * batches + 2, calls[0]
    assert muted_calls == LAYERS * batches + 1 + 2, muted_calls
    assert [f.choice for f in muted.fits] == [f.choice for f in ran.fits]
    for k, v in ran.tensors.items():
        torch.testing.assert_close(muted.tensors[k], v, rtol=1e-3, atol=1e-4)  # float rounding


def test_producers_run_at_the_cut_width_where_that_gives_the_same_inputs(
        small: tuple[LoadedModel, Calibration], monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's refit (`compensate.block_consumers` names the gate and up projections as
    the down projection's producers) runs them at the cut width in the pruned stream once
    one batch showed the same kept inputs and block output: the same refits as at full
    width, and a check that fails keeps the full width."""
    lm, cal = small
    uses = [0]
    narrowed = reconstruct._narrowed

    def counted(*args: object) -> object:
        uses[0] += 1
        return narrowed(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(reconstruct, "_narrowed", counted)
    results = []
    for same in (True, False):
        if not same:
            monkeypatch.setattr(reconstruct, "_narrow_same", lambda *_a: False)
        uses[0] = 0
        pruner = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=0.3,
                        heads="keep", targets="mlp", calibration=cal, compensate="lstsq")
        pruner.step()
        results.append(({k: v.detach().clone() for k, v in lm.model.state_dict().items()},
                        uses[0]))
        pruner.undo()
    (narrow, narrow_uses), (wide, wide_uses) = results
    batches = len(reconstruct.in_order(cal).batches)
    # the first block's first batch finds the additivity, its second checks the cut width
    # (plus the one check run): every other pruned-stream batch runs narrow
    assert narrow_uses == LAYERS * batches - 2 + 1, narrow_uses
    assert wide_uses == 0
    for k, v in wide.items():
        torch.testing.assert_close(narrow[k], v, rtol=1e-3, atol=1e-4)  # float rounding


def test_blocks_given_other_inputs_than_the_first_are_not_read() -> None:
    """A model whose blocks get per-layer inputs (Qwen2 with a sliding-window layer: its own
    attention mask) is not read from the recording: the refit runs every block on block 0's
    other inputs, so the recorded outputs would not line up with its pruned stream."""
    import transformers

    torch.manual_seed(0)
    results = []
    for types in (["full_attention"] * 3,
                  ["full_attention", "sliding_attention", "full_attention"]):
        cfg = transformers.Qwen2Config(
            layer_types=types, use_sliding_window=True, sliding_window=4, hidden_size=64,
            intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, attn_implementation="eager")
        model = transformers.Qwen2ForCausalLM(cfg).eval()
        gen = torch.Generator().manual_seed(1)
        cal = Calibration([(torch.randint(0, 100, (4, 16), generator=gen),)
                           for _ in range(5)])
        consumers = []
        for i in range(3):
            name = f"model.layers.{i}.mlp.down_proj"
            kept = torch.randperm(128, generator=gen)[:90].sort().values.numpy()
            consumers.append(reconstruct.Consumer(name, f"{name}.weight", kept))
        ran = reconstruct.reconstruct(model, consumers, cal)
        traj = trajectory.Trajectory(model)
        with traj.recording(reconstruct.in_order(cal)):
            activation_norms(model, reconstruct.in_order(cal))
        read = reconstruct.reconstruct(model, consumers, cal, trajectory=traj)
        traj.close()
        assert [f.error for f in read.fits] == [f.error for f in ran.fits]
        results.append(traj)
    assert [t._dir.exists() for t in results] == [False, False]


def test_a_full_disk_leaves_the_scoring_and_the_refit_to_run_the_blocks(
        small: tuple[LoadedModel, Calibration], monkeypatch: pytest.MonkeyPatch) -> None:
    lm, cal = small

    plain_open = Path.open

    def full(self: Path, *a: Any, **k: Any) -> Any:
        if self.suffix == ".bin" and self.parent.name.startswith("pe-trajectory-"):
            raise OSError(28, "No space left on device")
        return plain_open(self, *a, **k)

    monkeypatch.setattr(Path, "open", full)
    pruner = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=0.3,
                    heads="keep", targets="mlp", calibration=cal, compensate="lstsq")
    removal, _report = pruner.checked()
    assert removal and pruner.trajectory is None
