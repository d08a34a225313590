"""Score every importance criterion on the trained digits CNN and ViT, against random.

For each model, criterion and ratio (30 %, 50 %) a copy is pruned (classifier untouched, no
fine-tune) and measured: test accuracy and the mean cosine similarity of its logits to the
unpruned model's, averaged over ``--seeds`` training seeds. Prints one table; also writes
the teaching path's accuracy-vs-ratio plot (``docs/learn_accuracy.png``, or ``.html`` when
no image export is available).

    python benchmarks/criteria.py [--seeds 3] [--png docs/learn_accuracy.png]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from explorer.teach import learn  # noqa: E402
from explorer.teach.learn import LearnSettings  # noqa: E402
from explorer.teach.models import load_digits  # noqa: E402

RATIOS = (0.3, 0.5)
Scores = dict[tuple[str, str, float], list[tuple[float, float]]]  # -> [(accuracy, cosine)]


def score(models: tuple[str, ...], seeds: int) -> Scores:
    """(model, criterion, ratio) -> [(accuracy, cosine)] over the training seeds."""
    out: Scores = {}
    for seed in range(seeds):
        settings = LearnSettings(models=models, seed=seed, finetune_epochs=0)
        data = load_digits(settings.test_fraction, seed=0)  # one split; seeds vary training
        for kind in models:
            trained = learn.train_model(kind, data, settings)
            out.setdefault((kind, "unpruned", 0.0), []).append((trained.summary.accuracy, 1.0))
            for crit in settings.criteria:
                for ratio in RATIOS:
                    p = learn.measure_point(trained, crit, ratio, settings)
                    out.setdefault((kind, crit, ratio), []).append((p.accuracy, p.similarity))
    return out


def table(scores: Scores) -> str:
    """One text table: accuracy and logit cosine at each ratio, and the gain over random."""
    head = ["model", "criterion"] + [f"{k} @{r:.0%}" for r in RATIOS for k in ("acc", "cos")] \
        + [f"vs random @{r:.0%}" for r in RATIOS]
    lines = [head]
    models = list(dict.fromkeys(k[0] for k in scores))
    for model in models:
        base = statistics.mean(a for a, _ in scores[(model, "unpruned", 0.0)])
        lines.append([model, "unpruned"] + [f"{base:.3f}", "1.000"] * len(RATIOS)
                     + [""] * len(RATIOS))
        for crit in dict.fromkeys(k[1] for k in scores if k[0] == model and k[1] != "unpruned"):
            row = [model, crit]
            for r in RATIOS:
                vals = scores[(model, crit, r)]
                row += [f"{statistics.mean(a for a, _ in vals):.3f}",
                        f"{statistics.mean(c for _, c in vals):.3f}"]
            for r in RATIOS:
                gain = statistics.mean(a for a, _ in scores[(model, crit, r)]) - \
                    statistics.mean(a for a, _ in scores[(model, "random", r)])
                row.append("" if crit == "random" else f"{gain:+.3f}")
            lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in lines)


def write_plot(path: Path) -> Path:
    """Accuracy vs ratio per criterion for every model of the default teaching run."""
    from plotly.subplots import make_subplots

    result = learn.run(LearnSettings())
    fig = make_subplots(rows=1, cols=len(result.models),
                        subplot_titles=[f"{m.model} (unpruned {m.accuracy:.1%})"
                                        for m in result.models])
    for col, m in enumerate(result.models, start=1):
        for trace in learn.accuracy_figure(result, m.model).data:
            trace.showlegend = col == 1
            fig.add_trace(trace, row=1, col=col)
        fig.update_xaxes(title_text="ratio removed per group", row=1, col=col)
    fig.update_yaxes(title_text="test accuracy", range=[0, 1.02])
    fig.update_layout(title="Digits: accuracy after pruning (solid) and after "
                            f"{result.settings.finetune_epochs} fine-tune epochs (dashed)",
                      width=1200, height=500)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.write_image(str(path))
        return path
    except (ValueError, RuntimeError, ImportError) as exc:  # no kaleido or no browser
        html = path.with_suffix(".html")
        fig.write_html(str(html), include_plotlyjs=True)
        print(f"image export unavailable ({type(exc).__name__}); wrote {html}", file=sys.stderr)
        return html


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds to average")
    parser.add_argument("--models", default="cnn,vit")
    parser.add_argument("--png", default=str(ROOT / "docs" / "learn_accuracy.png"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    scores = score(tuple(args.models.split(",")), args.seeds)
    print(table(scores))
    print(f"\n{args.seeds} seed(s), {time.perf_counter() - start:.1f} s; acc = test accuracy "
          f"right after pruning, cos = mean cosine of logits to the unpruned model")
    if not args.no_plot:
        print(f"plot: {write_plot(Path(args.png))}")


if __name__ == "__main__":
    main()
