"""The teaching path on real data: models learn, criteria beat random, fine-tuning recovers."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from explorer.teach import learn
from explorer.teach.learn import LearnResult, LearnSettings
from explorer.teach.models import accuracy, build_model, load_digits, train

CNN_EPOCHS = 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and deterministic
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> learn.Digits:
    return load_digits()


@pytest.fixture(scope="module")
def settings() -> LearnSettings:
    return LearnSettings(models=("cnn",), epochs=(("cnn", CNN_EPOCHS), ("vit", 12)))


@pytest.fixture(scope="module")
def trained(digits: learn.Digits, settings: LearnSettings) -> dict[int, learn.Trained]:
    """The digits CNN trained with three seeds (a second each on one core)."""
    out = {}
    for seed in (0, 1, 2):
        s = LearnSettings(models=("cnn",), epochs=settings.epochs, seed=seed)
        out[seed] = learn.train_model("cnn", digits, s)
    return out


def test_split_is_fixed_and_disjoint(digits: learn.Digits) -> None:
    again = load_digits()
    assert torch.equal(digits.y_test, again.y_test)
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert digits.x_train.shape[1:] == (1, 8, 8) and float(digits.x_train.max()) <= 1.0


def test_cnn_learns_the_digits(trained: dict[int, learn.Trained]) -> None:
    summary = trained[0].summary
    assert summary.losses[-1] < summary.losses[0] / 5
    assert summary.accuracy > 0.90, summary.accuracy
    assert all(t.summary.accuracy > 0.90 for t in trained.values())


def test_training_is_deterministic(digits: learn.Digits) -> None:
    a, b = build_model("cnn", seed=3), build_model("cnn", seed=3)
    train(a, digits, 1, seed=3)
    train(b, digits, 1, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=False))


def test_informed_criteria_beat_random_at_half(trained: dict[int, learn.Trained],
                                               settings: LearnSettings) -> None:
    """Averaged over three training seeds, magnitude and fisher keep more accuracy."""
    s = LearnSettings(models=("cnn",), epochs=settings.epochs, finetune_epochs=0)
    mean = {}
    for crit in ("magnitude", "fisher", "random"):
        accs = [learn.measure_point(t, crit, 0.5, s).accuracy for t in trained.values()]
        mean[crit] = sum(accs) / len(accs)
    assert max(mean["magnitude"], mean["fisher"]) > mean["random"] + 0.05, mean


def test_pruning_really_shrinks_and_fine_tuning_recovers(trained: dict[int, learn.Trained],
                                                         settings: LearnSettings) -> None:
    point = learn.measure_point(trained[0], "magnitude", 0.5, settings)
    assert point.pruned and not point.unsafe
    assert point.params < 0.5 * point.params_before and point.macs < 0.5 * point.macs_before
    assert point.accuracy_finetuned > point.accuracy
    assert point.accuracy_finetuned > 0.9
    assert 0.0 < point.similarity < 1.0


def test_gradient_criteria_use_real_labelled_data(trained: dict[int, learn.Trained]) -> None:
    calib = trained[0].calibration
    assert calib.loss == "ce" and calib.labels is not None
    assert len(calib.batches) == 4 and calib.batches[0][0].shape == (16, 1, 8, 8)


def test_sensitivity_scans_every_group(trained: dict[int, learn.Trained],
                                       settings: LearnSettings) -> None:
    rows = learn.sensitivity(trained[0], settings)
    groups = {r.group for r in rows}
    assert len(groups) == 2  # conv1 and conv2 outputs; the classifier is never cut
    for g in groups:
        drops = [r.drop for r in rows if r.group == g]
        assert drops[-1] >= drops[0] and drops[-1] > 0.0  # pruning more hurts more
    assert all(r.params_removed > 0 and not r.error for r in rows)


def test_vit_prunes_per_head_and_runs(digits: learn.Digits) -> None:
    s = LearnSettings(models=("vit",), epochs=(("vit", 3),), finetune_epochs=0)
    vit = learn.train_model("vit", digits, s)
    heads = [g for g in vit.summary.groups if g.heads]
    assert [g.heads for g in heads] == ["3 heads x 16", "3 heads x 16"]
    model, report = learn.prune_copy(vit, "fisher", 0.25, s)
    assert report.forward_ok and not report.unsafe
    assert {m.head_dim for m in model.modules() if hasattr(m, "head_dim")} == {12}
    assert model(digits.x_test[:4]).shape == (4, 10)


def test_dino_attention_makes_head_dim_pruning_unsafe(digits: learn.Digits) -> None:
    s = LearnSettings(models=("vit-dino",), epochs=(("vit-dino", 1),), finetune_epochs=0)
    vit = learn.train_model("vit-dino", digits, s)
    # 25 %: stream 48 -> 36 and head dim 16 -> 12, so C // H = 36 // 3 = 12 still holds
    _model, report = learn.prune_copy(vit, "magnitude", 0.25, s)
    assert report and not report.unsafe
    # 34 %: stream 48 -> 32 but head dim 16 -> 11 breaks DINO's reshape(B, N, 3, H, C // H);
    # the solver (explorer.prune.joint) then cuts both by one fraction snapped to 1/16
    model, report = learn.prune_copy(vit, "magnitude", 0.34, s)
    assert report and not report.unsafe
    stream = next(c.width_after for c in report.changes if c.axis == "channels"
                  and c.width_before == 48)
    dims = {c.width_after for c in report.changes if c.axis == "head-dim"}
    assert dims == {stream // 3} and stream % 3 == 0
    assert model(digits.x_test[:4]).shape == (4, 10)
    whole = LearnSettings(models=("vit-dino",), epochs=s.epochs, heads="whole")
    _model, report = learn.prune_copy(vit, "magnitude", 1 / 3, whole)
    assert report and not report.unsafe  # 2 heads of 16 on a 32-wide stream: C // H holds


def test_run_caches_and_round_trips(tmp_path: Path) -> None:
    s = LearnSettings(models=("cnn",), criteria=("magnitude", "random"), ratios=(0.3,),
                      epochs=(("cnn", 2),), sensitivity_ratios=(0.5,))
    seen: list[tuple[float, str]] = []
    result = learn.run(s, progress=lambda f, t: seen.append((f, t)), directory=tmp_path)
    assert learn.cache_path(s, tmp_path).is_file()
    assert [f for f, _ in seen] == sorted(f for f, _ in seen) and seen[-1][0] == 1.0
    assert len(result.points) == 2 and result.points[0].params < result.models[0].params
    again = learn.run(s, progress=lambda f, t: seen.append((f, t)), directory=tmp_path)
    assert seen[-1] == (1.0, "loaded from cache")
    assert again == result
    assert LearnResult.from_dict(result.to_dict()) == result
    assert not math.isnan(learn.mean_accuracy(result.points, "cnn", "magnitude"))


def test_cache_key_depends_on_settings() -> None:
    assert LearnSettings().key() == LearnSettings().key()
    assert LearnSettings().key() != LearnSettings(seed=1).key()
    assert learn.cache_path(LearnSettings(), "/x").name == f"learn-{LearnSettings().key()}.json"


@pytest.mark.parametrize("kwargs, match", [
    ({"models": ("resnet",)}, "unknown model kind"),
    ({"criteria": ("magic",)}, "unknown criteria"),
    ({"ratios": (0.0,)}, "every ratio must be in"),
    ({"heads": "some"}, "heads must be one of"),
    ({"models": ("vit",), "epochs": (("cnn", 1),)}, "no training epochs given"),
])
def test_bad_settings_say_what_is_wrong(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LearnSettings(**kwargs)  # type: ignore[arg-type]


def test_mean_accuracy_needs_points() -> None:
    with pytest.raises(ValueError, match="no points for model"):
        learn.mean_accuracy([], "cnn", "magnitude")


def test_accuracy_of_untrained_model_is_chance(digits: learn.Digits) -> None:
    assert accuracy(build_model("cnn", seed=0), digits.x_test, digits.y_test) < 0.3


PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "6_learn.py")


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory: pytest.TempPathFactory) -> LearnResult:
    s = LearnSettings(models=("cnn",), criteria=("magnitude", "random"), ratios=(0.3, 0.5),
                      epochs=(("cnn", 2),), sensitivity_ratios=(0.5,))
    return learn.run(s, directory=tmp_path_factory.mktemp("tiny"))


def test_page_asks_to_run_when_nothing_is_cached(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    st_testing = pytest.importorskip("streamlit.testing.v1")
    monkeypatch.setenv(learn.CACHE_ENV, str(tmp_path))
    at = st_testing.AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    assert "Run the experiment" in at.info[0].value


def test_page_draws_a_cached_result(tiny_result: LearnResult, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's default settings, filled with the tiny run's numbers, from the cache."""
    import dataclasses

    st_testing = pytest.importorskip("streamlit.testing.v1")
    monkeypatch.setenv(learn.CACHE_ENV, str(tmp_path))
    learn.save(dataclasses.replace(tiny_result, settings=LearnSettings()))
    at = st_testing.AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    assert not at.error
    assert len(at.get("plotly_chart")) == 3
    assert at.metric[0].value.endswith("%")


def test_cli_learn_prints_the_cached_table(tiny_result: LearnResult, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from explorer.app.cli import main

    settings = LearnSettings(models=("cnn",), finetune_epochs=2)
    learn.save(dataclasses.replace(tiny_result, settings=settings), tmp_path)
    assert main(["learn", "--models", "cnn", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cnn: test accuracy") and "magnitude" in out
    assert main(["learn", "--models", "cnn,resnet", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown model kind" in capsys.readouterr().err
