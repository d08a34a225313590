"""The teaching path: prune real, trained models and measure what each criterion costs.

`run` trains a small CNN and a small ViT on sklearn's 8x8 digits (bundled, no download),
then for every criterion and ratio prunes a copy (the classifier is left whole), measures
test accuracy, parameters and MACs (from the `StepReport`), fine-tunes briefly and measures
again; and prunes every group alone at a few ratios to show which groups are sensitive.
Results are plain dataclasses, cached as JSON keyed by a hash of the settings.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..coupling.groups import Group
from ..prune.calibration import Calibration
from ..prune.importance import CRITERIA, criterion_names
from ..prune.pruner import Pruner, StepReport
from ..prune.sensitivity import scan
from ..prune.settings import head_mode
from .models import (
    MODEL_KINDS,
    Digits,
    accuracy,
    build_model,
    calibration_batches,
    classifier_name,
    load_digits,
    logits,
    train,
)

if TYPE_CHECKING:
    import plotly.graph_objects as go

Progress = Callable[[float, str], None]
TAUGHT_CRITERIA = criterion_names(aliases=False, general=True)  # the registry's own
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
CACHE_ENV = "PRUNING_EXPLORER_CACHE"
_FORMAT = 1  # bump when the result layout or the experiment changes, to miss old caches


@dataclass(frozen=True)
class LearnSettings:
    """Everything that changes the numbers; its hash names the cache file."""

    models: tuple[str, ...] = ("cnn", "vit")
    criteria: tuple[str, ...] = TAUGHT_CRITERIA
    ratios: tuple[float, ...] = RATIOS
    epochs: tuple[tuple[str, int], ...] = (("cnn", 15), ("vit", 40), ("vit-dino", 40))
    finetune_epochs: int = 2
    sensitivity_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    sensitivity_criterion: str = "magnitude"
    calib_batches: int = 4  # real training batches for taylor, fisher and activation
    calib_batch_size: int = 16
    heads: str = "dims"
    seed: int = 0
    test_fraction: float = 0.25

    def __post_init__(self) -> None:
        bad = [m for m in self.models if m not in MODEL_KINDS]
        if bad:
            raise ValueError(f"unknown model kind(s) {bad}; choose from {MODEL_KINDS}")
        if any(not 0.0 < r < 1.0 for r in (*self.ratios, *self.sensitivity_ratios)):
            raise ValueError("every ratio must be in (0, 1)")
        head_mode(self.heads)  # the pruner's own check: one of `HEAD_MODES`
        unknown = [c for c in (*self.criteria, self.sensitivity_criterion) if c not in CRITERIA]
        if unknown:
            raise ValueError(f"unknown criteria {unknown}; choose from {sorted(CRITERIA)}")
        missing = [m for m in self.models if m not in dict(self.epochs)]
        if missing:
            raise ValueError(f"no training epochs given for {missing}")

    def epochs_for(self, kind: str) -> int:
        return dict(self.epochs)[kind]

    def key(self) -> str:
        """A short stable hash of the settings (and of the result format)."""
        text = json.dumps({"format": _FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class GroupInfo:
    """A coupled group of the trained model, as the page explains it."""

    id: int
    label: str
    channels: int
    heads: str  # "3 heads x 16" or "" when the group has no head structure
    prunable: bool
    reason: str
    members: list[str]  # "conv2.weight[0]" : parameter and the dim the group cuts


@dataclass(frozen=True)
class ModelSummary:
    """The trained, unpruned model."""

    model: str
    accuracy: float  # test accuracy in [0, 1]
    params: int
    macs: int  # per image
    train_seconds: float
    losses: list[float]  # training loss per epoch
    groups: list[GroupInfo]


@dataclass(frozen=True)
class PrunePoint:
    """One (model, criterion, ratio) experiment."""

    model: str
    criterion: str
    ratio: float
    accuracy: float  # right after pruning
    accuracy_finetuned: float  # after `LearnSettings.finetune_epochs` of training
    similarity: float  # mean cosine of logits to the unpruned model, after pruning
    params: int
    macs: int
    params_before: int
    macs_before: int
    pruned: bool  # False when the step removed nothing (see `unsafe`)
    unsafe: list[str] = field(default_factory=list)  # "module at file:line: error"


@dataclass(frozen=True)
class SensitivityPoint:
    """One group pruned alone at one ratio (lowest-scored indices first)."""

    model: str
    group: int
    label: str
    ratio: float
    removed: int
    params_removed: int
    accuracy: float  # NaN when the pruned model no longer runs
    drop: float  # unpruned accuracy minus ``accuracy``
    error: str = ""


@dataclass(frozen=True)
class LearnResult:
    settings: LearnSettings
    models: list[ModelSummary]
    points: list[PrunePoint]
    sensitivity: list[SensitivityPoint]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnResult:
        """Inverse of `to_dict` (lists in the JSON become the tuples of the settings)."""
        s = data["settings"]
        settings = LearnSettings(**{f.name: _tuples(s[f.name]) for f in fields(LearnSettings)})
        models = [ModelSummary(**{**m, "groups": [GroupInfo(**g) for g in m["groups"]]})
                  for m in data["models"]]
        return cls(settings, models, [PrunePoint(**p) for p in data["points"]],
                   [SensitivityPoint(**p) for p in data["sensitivity"]], data["seconds"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# -- cache ------------------------------------------------------------------------------------
def cache_dir(override: str | Path | None = None) -> Path:
    """``override``, else ``$PRUNING_EXPLORER_CACHE``, else ``~/.cache/pruning-explorer``."""
    if override is not None:
        return Path(override)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "pruning-explorer"


def cache_path(settings: LearnSettings, directory: str | Path | None = None) -> Path:
    return cache_dir(directory) / f"learn-{settings.key()}.json"


def load_cached(settings: LearnSettings, directory: str | Path | None = None
                ) -> LearnResult | None:
    """The cached result for ``settings``, or None (also for an unreadable file)."""
    path = cache_path(settings, directory)
    if not path.is_file():
        return None
    try:
        return LearnResult.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None


def save(result: LearnResult, directory: str | Path | None = None) -> Path:
    path = cache_path(result.settings, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict(), allow_nan=True))
    tmp.replace(path)
    return path


# -- experiments ------------------------------------------------------------------------------
@dataclass
class Trained:
    """A trained model with what pruning it needs."""

    kind: str
    model: nn.Module
    data: Digits
    calibration: Calibration
    summary: ModelSummary


def example_inputs(data: Digits) -> tuple[torch.Tensor]:
    """One training image: MACs in the reports are per image."""
    return (data.x_train[:1],)


def train_model(kind: str, data: Digits, settings: LearnSettings) -> Trained:
    """Build and train one model; the summary lists its coupled groups."""
    model = build_model(kind, seed=settings.seed)
    start = time.perf_counter()
    losses = train(model, data, settings.epochs_for(kind), seed=settings.seed)
    seconds = time.perf_counter() - start
    xs, ys = calibration_batches(data, settings.calib_batches, settings.calib_batch_size,
                                 seed=settings.seed)
    calib = Calibration(xs, loss="ce", labels=ys)
    pruner = Pruner(model, example_inputs(data), ignored=[classifier_name(kind)])
    summary = ModelSummary(kind, accuracy(model, data.x_test, data.y_test),
                           pruner.params_original, pruner.macs_original, round(seconds, 2),
                           losses, [group_info(g) for g in pruner.groups])
    return Trained(kind, model, data, calib, summary)


def group_info(group: Group) -> GroupInfo:
    heads = f"{group.heads.num_heads} heads x {group.heads.head_dim}" if group.heads else ""
    return GroupInfo(group.id, group.title, group.channels, heads, group.prunable,
                     group.reason, [f"{m.param}[{m.dim}]" for m in group.members])


def prune_copy(trained: Trained, criterion: str, ratio: float,
               settings: LearnSettings) -> tuple[nn.Module, StepReport]:
    """A pruned deep copy of the trained model (the classifier is never pruned)."""
    model = copy.deepcopy(trained.model)
    pruner = Pruner(model, example_inputs(trained.data), importance=criterion, ratio=ratio,
                    heads=settings.heads, ignored=[classifier_name(trained.kind)],
                    calibration=trained.calibration)
    report = pruner.step()
    assert isinstance(report, StepReport)  # step() without interactive returns a report
    return model, report


def logit_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of two models' logits over the same images."""
    return float(nn.functional.cosine_similarity(a, b, dim=1).mean())


def measure_point(trained: Trained, criterion: str, ratio: float, settings: LearnSettings,
                  reference: torch.Tensor | None = None) -> PrunePoint:
    """Prune, test, fine-tune, test again."""
    data = trained.data
    if reference is None:
        reference = logits(trained.model, data.x_test)
    model, report = prune_copy(trained, criterion, ratio, settings)
    acc = accuracy(model, data.x_test, data.y_test)
    sim = logit_similarity(logits(model, data.x_test), reference)
    if settings.finetune_epochs > 0:
        train(model, data, settings.finetune_epochs, lr=1e-3, seed=settings.seed + 1)
    tuned = accuracy(model, data.x_test, data.y_test)
    unsafe = [f"{u.module} at {u.location}: {u.error}" for u in report.unsafe]
    return PrunePoint(trained.kind, criterion, ratio, acc, tuned, sim, report.params_after,
                      report.macs_after, report.params_before, report.macs_before,
                      bool(report), unsafe)


def sweep(trained: Trained, settings: LearnSettings, progress: Progress | None = None
          ) -> list[PrunePoint]:
    """Every criterion at every ratio on copies of one trained model."""
    reference = logits(trained.model, trained.data.x_test)
    jobs = [(c, r) for c in settings.criteria for r in settings.ratios]
    points = []
    for i, (crit, ratio) in enumerate(jobs):
        if progress:
            progress(i / len(jobs), f"{trained.kind}: {crit} at {ratio:.0%}")
        points.append(measure_point(trained, crit, ratio, settings, reference))
    return points


def sensitivity(trained: Trained, settings: LearnSettings, progress: Progress | None = None
                ) -> list[SensitivityPoint]:
    """Prune each group alone (lowest scores first) and measure the accuracy drop.

    Runs `explorer.prune.sensitivity.scan` with accuracy on the test split as the measure.
    """
    pruner = Pruner(trained.model, example_inputs(trained.data),
                    importance=settings.sensitivity_criterion, heads=settings.heads,
                    ignored=[classifier_name(trained.kind)], calibration=trained.calibration)
    base = trained.summary.accuracy

    def drop(model: nn.Module) -> float:
        return base - accuracy(model, trained.data.x_test, trained.data.y_test)

    def report(done: float, text: str) -> None:
        if progress:
            progress(done, f"{trained.kind}: {text}")

    rows = scan(pruner, settings.sensitivity_ratios, measure=drop, progress=report)
    out = []
    for r in rows:
        label = f"{pruner.groups[r.group].title} [{r.role}]"
        acc = float("nan") if r.error else base - r.output_change
        out.append(SensitivityPoint(trained.kind, r.group, label, r.ratio, r.removed,
                                    0 if r.error else r.params_removed, acc,
                                    base - acc, r.error))
    return out


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads, restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(settings: LearnSettings | None = None, progress: Progress | None = None,
        directory: str | Path | None = None, use_cache: bool = True,
        threads: int | None = 1) -> LearnResult:
    """Train, sweep and scan every model of ``settings``; cached on disk by settings hash.

    Args:
        settings: the experiment (defaults: CNN and ViT, six criteria, ratios 0.1..0.7).
        progress: called as ``progress(fraction, text)`` with fraction in [0, 1].
        directory: cache folder (see `cache_dir`).
        use_cache: read and write the cache; False always recomputes and writes nothing.
        threads: torch threads while computing (one is fastest for these tiny models and
            keeps float sums identical from run to run); None leaves the setting alone.
    """
    settings = settings or LearnSettings()
    report = progress or (lambda _f, _t: None)
    if use_cache:
        cached = load_cached(settings, directory)
        if cached is not None:
            report(1.0, "loaded from cache")
            return cached
    with _threads(threads):
        result = _compute(settings, report)
    if use_cache:
        save(result, directory)
    return result


def _compute(settings: LearnSettings, report: Progress) -> LearnResult:
    with torch.random.fork_rng(devices=[]):  # seeded; the caller's random state kept
        torch.manual_seed(settings.seed)
        return _computed(settings, report)


def _computed(settings: LearnSettings, report: Progress) -> LearnResult:
    start = time.perf_counter()
    data = load_digits(settings.test_fraction, seed=settings.seed)
    models, points, sens = [], [], []
    share = 1.0 / len(settings.models)
    for k, kind in enumerate(settings.models):
        part = _scaled(report, k * share, share)
        part(0.0, f"{kind}: training {settings.epochs_for(kind)} epochs")
        trained = train_model(kind, data, settings)
        models.append(trained.summary)
        points += sweep(trained, settings, _scaled(part, 0.3, 0.55))
        sens += sensitivity(trained, settings, _scaled(part, 0.85, 0.15))
    report(1.0, "done")
    return LearnResult(settings, models, points, sens, round(time.perf_counter() - start, 2))


def _scaled(progress: Progress, offset: float, width: float) -> Progress:
    return lambda f, text: progress(min(1.0, offset + width * f), text)


# -- views for plots and tables ---------------------------------------------------------------
def mean_accuracy(points: Sequence[PrunePoint], model: str, criterion: str,
                  finetuned: bool = False) -> float:
    """Accuracy of one criterion averaged over the swept ratios."""
    sel = [p for p in points if p.model == model and p.criterion == criterion]
    if not sel:
        raise ValueError(f"no points for model '{model}' and criterion '{criterion}'")
    vals = [p.accuracy_finetuned if finetuned else p.accuracy for p in sel]
    return sum(vals) / len(vals)


def summary_text(result: LearnResult) -> str:
    """Accuracy per criterion and ratio, one block per model ("after / after fine-tune")."""
    ratios = result.settings.ratios
    lines = []
    for m in result.models:
        lines.append(f"{m.model}: test accuracy {m.accuracy:.3f}, {m.params:,} params, "
                     f"{m.macs:,} MACs/image")
        lines.append(f"  {'criterion':<11}" + "".join(f"{r:>13.0%}" for r in ratios))
        for crit in result.settings.criteria:
            pts = {p.ratio: p for p in result.points if p.model == m.model
                   and p.criterion == crit}
            cells = [f"{pts[r].accuracy:.2f}/{pts[r].accuracy_finetuned:.2f}" if r in pts
                     else "-" for r in ratios]
            lines.append(f"  {crit:<11}" + "".join(f"{c:>13}" for c in cells))
    lines.append(f"(accuracy after pruning / after {result.settings.finetune_epochs} fine-tune "
                 f"epoch(s); {result.seconds:.0f} s to compute)")
    return "\n".join(lines)


def rows(result: LearnResult) -> list[dict[str, Any]]:
    """The sweep as flat dicts (one per point) for tables and plotly."""
    return [asdict(p) for p in result.points]


# -- figures (read a `LearnResult`; the page and the benchmark draw the same ones) --------------
_COLOURS = {"magnitude": "#1f77b4", "l1": "#17becf", "taylor": "#ff7f0e", "fisher": "#d62728",
            "activation": "#2ca02c", "random": "#7f7f7f", "bn-scale": "#9467bd"}
_X_AXES = {"ratio": "channels removed per group (ratio)", "params": "parameters",
           "macs": "MACs per image"}


def accuracy_figure(result: LearnResult, model: str, x: str = "ratio",
                    finetuned: bool = True) -> go.Figure:
    """Test accuracy per criterion against ``x`` ("ratio", "params" or "macs").

    Solid lines: right after pruning; dashed: after the short fine-tune (when ``finetuned``).
    The dotted line is the unpruned model.
    """
    import plotly.graph_objects as go

    if x not in _X_AXES:
        raise ValueError(f"x must be one of {sorted(_X_AXES)}, got {x!r}")
    base = _summary(result, model)
    fig = go.Figure()
    for crit in result.settings.criteria:
        pts = sorted((p for p in result.points if p.model == model and p.criterion == crit),
                     key=lambda p: p.ratio)
        if not pts:
            continue
        xs = [{"ratio": p.ratio, "params": p.params, "macs": p.macs}[x] for p in pts]
        colour = _COLOURS.get(crit, "#8c564b")
        fig.add_scatter(x=xs, y=[p.accuracy for p in pts], name=crit, mode="lines+markers",
                        line={"color": colour}, legendgroup=crit)
        if finetuned:
            fig.add_scatter(x=xs, y=[p.accuracy_finetuned for p in pts], mode="lines+markers",
                            name=f"{crit} + fine-tune", legendgroup=crit,
                            line={"color": colour, "dash": "dash"}, marker={"symbol": "x"})
    fig.add_hline(y=base.accuracy, line={"dash": "dot", "color": "black"},
                  annotation_text=f"unpruned {base.accuracy:.1%}")
    fig.update_layout(title=f"{model}: test accuracy after pruning", yaxis_title="accuracy",
                      xaxis_title=_X_AXES[x], yaxis_range=[0, 1.02], height=420,
                      margin={"t": 50, "b": 40, "l": 50, "r": 20})
    if x != "ratio":
        fig.update_xaxes(autorange="reversed")  # smaller models to the right, like ratio
    return fig


def learn_sensitivity_figure(result: LearnResult, model: str) -> go.Figure:
    """Accuracy drop when each group is pruned alone, per ratio."""
    import plotly.graph_objects as go

    fig = go.Figure()
    rows = [r for r in result.sensitivity if r.model == model]
    for label in dict.fromkeys(r.label for r in rows):
        sel = [r for r in rows if r.label == label]
        fig.add_scatter(x=[r.ratio for r in sel], y=[r.drop for r in sel], name=label,
                        mode="lines+markers",
                        hovertext=[f"{r.removed} removed, {r.params_removed:,} params"
                                   for r in sel])
    fig.update_layout(title=f"{model}: accuracy drop when one group is pruned alone "
                            f"({result.settings.sensitivity_criterion})",
                      xaxis_title="ratio of the group removed", yaxis_title="accuracy drop",
                      height=380, margin={"t": 50, "b": 40, "l": 50, "r": 20})
    return fig


def _summary(result: LearnResult, model: str) -> ModelSummary:
    for m in result.models:
        if m.model == model:
            return m
    raise ValueError(f"model '{model}' is not in this result; it has "
                     f"{[m.model for m in result.models]}")
