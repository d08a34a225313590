"""GPT-2's ``Conv1D`` (weight stored transposed, (in, out)) is a consumer the sequential
reconstruction refits like ``nn.Linear``: one reader (`reconstruct.affine`) gives every
consumer as ``y = W x + b``, and the refit goes back in the module's own layout."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from explorer import Pruner, load_model
from explorer.io.specs import LoadedModel
from explorer.prune.calibration import Calibration
from explorer.prune.reconstruct import affine

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402 - needs transformers


def _ids(seed: int, n: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (4, 24), generator=g),) for _ in range(n)]


@pytest.fixture()
def gpt2() -> LoadedModel:
    """A tiny random GPT-2 (2 blocks, Conv1D everywhere); its MLP weights scaled up so the
    cut units carry a visible share of each block's output."""
    torch.manual_seed(0)
    lm = load_model("hf:gpt2")
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")):
                p.mul_(10)
    return lm


def _kl(model: nn.Module, dense: list[torch.Tensor], held: list[tuple[torch.Tensor]]
        ) -> float:
    """Mean KL(dense || model) of the next-token distributions on ``held``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for (ids,), ref in zip(held, dense, strict=True):
            now = torch.log_softmax(model(ids).logits.flatten(0, 1), -1)
            total += float((ref.exp() * (ref - now)).sum())
            count += now.shape[0]
    return total / count


def test_affine_reads_conv1d_and_linear_alike() -> None:
    conv, x = Conv1D(5, 3), torch.randn(2, 3)
    form = affine(conv)
    assert form is not None and form.out_dim == 1 and form.weight.shape == (5, 3)
    assert form.bias is not None
    torch.testing.assert_close(x @ form.weight.T + form.bias, conv(x))
    assert torch.equal(form.oriented(form.weight), conv.weight)  # back in its (in, out) layout
    linear = nn.Linear(3, 5, bias=False)
    got = affine(linear)
    assert got is not None and got.out_dim == 0 and got.bias is None
    assert torch.equal(got.weight, linear.weight)
    assert affine(nn.Conv1d(3, 5, 3)) is None and affine(nn.LayerNorm(3)) is None


def test_gpt2_conv1d_mlp_is_refit_and_comes_back_to_the_dense_model(gpt2: LoadedModel
                                                                     ) -> None:
    """Before, the refit read Linear layers only: GPT-2 got the plain cut and "compensation
    'lstsq' refit nothing"."""
    model = gpt2.model
    cal, held = Calibration(_ids(1, 10)), _ids(2, 3)
    with torch.no_grad():
        dense = [torch.log_softmax(model(ids).logits.flatten(0, 1), -1) for (ids,) in held]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kl = {}
    for comp in (None, "lstsq"):
        pruner = Pruner(model, gpt2.example_inputs, importance="activation", ratio=0.4,
                        heads="keep", targets="mlp", calibration=cal, compensate=comp)
        report = pruner.step()
        assert report.forward_ok and report.output_shape_ok
        proj = model.transformer.h[1].mlp.c_proj  # type: ignore[union-attr, index]
        assert isinstance(proj, Conv1D) and tuple(proj.weight.shape) == (154, 64)
        kl[comp] = _kl(model, dense, held)
        if comp == "lstsq":
            [note] = [n for n in report.notes if n.startswith("reconstruction")]
            assert "kept in 2/2 layers" in note, note
        pruner.undo()
        now = model.state_dict()
        assert all(torch.equal(now[k], v) for k, v in before.items())
    assert 0 < kl["lstsq"] < 0.67 * kl[None], kl
