"""What a decision costs in quality, weighed: severity against thresholds, words, ordering, and
the trade-off curve (quality against parameters as decisions accumulate).

Streamlit-free, so the Groups page only draws these. A cost is a `Quality` measured against
the *original* model on held-out data (`Session.proposal_cost`), so its severity says how far
the model would be from where it started, not only what one step adds.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..coupling.groups import GroupKey
from ..prune.preflight import shared_clone
from ..prune.proposal import Counts, Proposal
from ..prune.removal import apply_removal
from ..quality.evaluate import Quality
from ..quality.generate import DEFAULT_NEW_TOKENS, Continuation, continuations
from ..quality.task import Metric
from .display import continuation_rows

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from .session import Session


class Severity(str, enum.Enum):
    """How bad a cost is against the user's `Thresholds`."""

    OK = "ok"
    WARN = "warn"
    ALARM = "alarm"


# glyphs every font has (emoji are boxes in a browser without an emoji font)
ICON = {Severity.OK: "✓", Severity.WARN: "▲", Severity.ALARM: "✖"}
COLOUR = {Severity.OK: "#2CA02C", Severity.WARN: "#FF7F0E", Severity.ALARM: "#D62728"}
_LEAD = {Severity.OK: "Accepting it costs little",
         Severity.WARN: "Accepting it costs noticeable quality",
         Severity.ALARM: "Accepting it breaks the model"}


@dataclass(frozen=True)
class Thresholds:
    """When a cost turns yellow (warn) or red (alarm); the user sets these on the page.

    Perplexity is read as a ratio to the original's (1.10 = 10 % higher); agreement (top-1
    for logits) and cosine similarity to the original as a floor.
    """

    perplexity_warn: float = 1.10
    perplexity_alarm: float = 1.50
    agreement_warn: float = 0.90
    agreement_alarm: float = 0.70

    def __post_init__(self) -> None:
        if not 1.0 <= self.perplexity_warn <= self.perplexity_alarm:
            raise ValueError(f"perplexity thresholds must satisfy 1 <= warn <= alarm, got "
                             f"{self.perplexity_warn} and {self.perplexity_alarm}")
        if not 0.0 <= self.agreement_alarm <= self.agreement_warn <= 1.0:
            raise ValueError(f"agreement thresholds must satisfy 0 <= alarm <= warn <= 1, got "
                             f"alarm {self.agreement_alarm} and warn {self.agreement_warn}")


def _ratio(after: float, before: float) -> float:
    if not math.isfinite(after):
        return math.inf
    return after / before if before > 0 else (1.0 if after <= before else math.inf)


def severity(q: Quality, t: Thresholds) -> Severity:
    """The worst of the perplexity ratio (causal LMs) and the agreement with the original
    (top-1 where the outputs are logits, else cosine), against ``t``."""
    found = Severity.OK
    if q.perplexity_after is not None and q.perplexity_before is not None:
        r = _ratio(q.perplexity_after, q.perplexity_before)
        found = Severity.ALARM if r > t.perplexity_alarm else \
            Severity.WARN if r > t.perplexity_warn else Severity.OK
    agree = q.top1 if q.top1 is not None else q.cosine
    if not math.isfinite(agree) or agree < t.agreement_alarm:
        return Severity.ALARM
    if agree < t.agreement_warn and found is Severity.OK:
        return Severity.WARN
    return found


def number(x: float | None) -> str:
    """A reader's number: ``181,010`` for big values, ``25.12`` for small ones."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "∞"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def cost_words(after: Quality) -> str:
    """Every measure of ``after`` against the original, e.g. ``perplexity 31.44 → 157,507
    (×5,009) · top-1 agreement 0.030 · KL 8.62``."""
    parts = []
    if after.perplexity_after is not None and after.perplexity_before is not None:
        r = _ratio(after.perplexity_after, after.perplexity_before)
        parts.append(f"perplexity {number(after.perplexity_before)} → "
                     f"{number(after.perplexity_after)} (×{number(r)})")
    if after.top1 is not None:
        parts.append(f"top-1 agreement {after.top1:.3f}")
    if after.kl is not None:
        parts.append(f"KL {number(after.kl)}")
    if after.metric is Metric.COSINE or after.top1 is None:
        parts.append(f"cosine to original {after.cosine:.4f}")
    return " · ".join(parts)


def cost_sentence(now: Quality | None, after: Quality, t: Thresholds, source: str,
                  refit: str = "none") -> str:
    """The cost box of the Groups page: a lead by severity, the measures, the step's share;
    with a ``refit`` (the session's compensation), that the cost is measured without it."""
    level = severity(after, t)
    step = ""
    if now is not None and now.metric is Metric.PERPLEXITY and after.perplexity_after \
            is not None and now.perplexity_after is not None and \
            number(now.perplexity_after) != number(after.perplexity_before):  # not the first
        step = f"; this step alone: perplexity {number(now.perplexity_after)} → " \
               f"{number(after.perplexity_after)}"
    without = "" if refit == "none" else (
        f". Measured without the {refit} refit that Accept applies (too slow to run for every "
        f"proposal): after Accept the cost is usually lower")
    return (f"{ICON[level]} **{_LEAD[level]}**: {cost_words(after)} (against the original, "
            f"measured on a copy with weights, {source}{step}){without}")


def cost_key(q: Quality | None) -> tuple[int, float]:
    """Sort key, cheapest first; unmeasured last."""
    if q is None:
        return (1, 0.0)
    if q.perplexity_after is not None:
        return (0, q.perplexity_after if math.isfinite(q.perplexity_after) else math.inf)
    agree = q.top1 if q.top1 is not None else q.cosine
    return (0, -agree if math.isfinite(agree) else math.inf)


def by_cost(pending: Sequence[Proposal], costs: Mapping[GroupKey, Quality | None]
            ) -> list[Proposal]:
    """``pending`` cheapest first by measured cost (stable; unmeasured ones last, in order)."""
    return sorted(pending, key=lambda p: cost_key(costs.get(p.key)))


def cost_label(q: Quality | None, t: Thresholds) -> str:
    """A short cell for a table or a picker: ``✖ perplexity 157,507``."""
    if q is None:
        return "not measured"
    if q.perplexity_after is not None:
        return f"{ICON[severity(q, t)]} perplexity {number(q.perplexity_after)}"
    agree = q.top1 if q.top1 is not None else q.cosine
    name = "top-1" if q.top1 is not None else "cosine"
    return f"{ICON[severity(q, t)]} {name} {agree:.3f}"


def headline(q: Quality) -> float:
    """The value the trade-off curve plots: perplexity, else top-1, else cosine."""
    if q.perplexity_after is not None:
        return q.perplexity_after
    return q.top1 if q.top1 is not None else q.cosine


def headline_name(q: Quality, source: str = "held-out") -> str:
    """The trade-off curve's axis title, with what it was measured on (``source``)."""
    if q.perplexity_after is not None:
        return f"perplexity ({source})"
    return "top-1 agreement with the original" if q.top1 is not None else \
        "cosine to the original"


LOG_SPREAD = 100  # a trade-off curve spanning more than this factor gets a log axis


@dataclass
class Trail:
    """Quality against parameters after each model change of a session, for the trade-off
    curve. Keyed by how many changes the model holds: after an undo, the points past it are
    dropped when the next one is recorded (undo is exact, so the earlier points still hold).
    """

    points: dict[int, tuple[int, float, str]] = field(default_factory=dict)

    def record(self, changes: int, params: int, q: Quality, label: str) -> None:
        for k in [k for k in self.points if k > changes]:
            del self.points[k]
        if changes not in self.points or self.points[changes][0] != params:
            self.points[changes] = (params, headline(q), label)

    def figure(self, q: Quality, *, would_be: tuple[int, Quality] | None = None,
               thresholds: Thresholds | None = None, source: str = "held-out") -> go.Figure:
        """The curve so far; ``would_be`` (params, cost) adds the proposal on screen;
        ``source``: what the quality is measured on."""
        import plotly.graph_objects as go

        keys = sorted(self.points)
        xs = [self.points[k][0] for k in keys]
        ys = [self.points[k][1] for k in keys]
        fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines+markers", name="decisions so far",
                                   text=[self.points[k][2] for k in keys],
                                   hovertemplate="%{text}<br>%{x:,} params<br>%{y:.4g}"))
        if would_be is not None and xs:
            level = severity(would_be[1], thresholds or Thresholds())
            fig.add_scatter(x=[xs[-1], would_be[0]], y=[ys[-1], headline(would_be[1])],
                            mode="lines+markers", name="if accepted",
                            line={"dash": "dash", "color": COLOUR[level]},
                            marker={"color": COLOUR[level], "size": [6, 12]})
        # log only across orders of magnitude: over 60 -> 700 plotly labels the log axis
        # 100, 2, 3 (for 200, 300), which reads as perplexities of 2 and 3
        shown = [y for y in ys + ([headline(would_be[1])] if would_be else [])
                 if math.isfinite(y) and y > 0]
        log = q.perplexity_after is not None and bool(shown) and \
            max(shown) > LOG_SPREAD * min(shown)
        fig.update_layout(title="trade-off: quality against parameters",
                          xaxis={"title": "parameters", "autorange": "reversed"},
                          yaxis={"title": headline_name(q, source),
                                 "type": "log" if log else "linear"},
                          height=320, margin={"l": 50, "r": 10, "t": 40, "b": 40})
        return fig


def would_be_texts(pe: Session, proposal: Proposal, counts: Counts | None,
                   prompts: Sequence[str], cache: dict[Any, list[Continuation]],
                   new_tokens: int = DEFAULT_NEW_TOKENS) -> list[Continuation]:
    """Greedy continuations of ``prompts`` by the original and by the model as it would be
    after accepting ``proposal`` (with ``counts``), on a CPU copy; cached in ``cache``.

    Raises:
        GenerateError: if the model cannot generate text (no tokenizer, not a generator).
        PruneError: if the removal does not fit the model.
    """
    if pe.on_meta or not prompts:
        return []
    key = (id(pe), pe.version, tuple(proposal.keys), pe.settings(),
           tuple(sorted((counts or {}).items())), tuple(prompts), new_tokens)
    if key not in cache:
        trial = shared_clone(pe.model)  # the cut replaces tensors: no copy of the weights
        apply_removal(trial, pe.graph.coupling, proposal.removal(counts))
        cache[key] = continuations(trial, pe.original, pe.tokenizer, list(prompts), new_tokens)
    return cache[key]


def would_be_rows(pe: Session, proposal: Proposal, counts: Counts | None,
                  prompts: Sequence[str], cache: dict[Any, list[Continuation]]
                  ) -> list[dict[str, str]]:
    """`would_be_texts` as table rows (prompt, original continues, pruned continues)."""
    return continuation_rows(would_be_texts(pe, proposal, counts, prompts, cache))


def measure_all(pe: Session, pending: Sequence[Proposal],
                progress: Callable[[float, str], None] | None = None) -> list[str]:
    """Measure the cost of every proposal in ``pending`` as proposed (cached by the session);
    returns a line per proposal that could not be measured."""
    failed = []
    for i, p in enumerate(pending):
        if progress:
            progress(i / max(len(pending), 1), f"measuring {i + 1} of {len(pending)}: "
                                               f"{p.group.title}")
        try:
            pe.proposal_cost(p)
        except Exception as exc:  # noqa: BLE001 - one proposal's failure is one line
            failed.append(f"{p.group.title}: {exc}")
    return failed


def measured(pe: Session, pending: Sequence[Proposal]) -> dict[GroupKey, Quality | None]:
    """The costs of ``pending`` as proposed that are already measured (no new measurement)."""
    return {p.key: pe.cost_if_measured(p) for p in pending}
