"""The cost of a decision, weighed: severity, words, ordering, the trade-off curve."""
from __future__ import annotations

import math
from typing import Any

import pytest

from explorer.app.cost import (
    Severity,
    Thresholds,
    Trail,
    by_cost,
    cost_label,
    cost_sentence,
    number,
    severity,
)
from explorer.quality.evaluate import Quality
from explorer.quality.task import Metric, Task


def _lm(before: float, after: float, top1: float = 1.0) -> Quality:
    return Quality(Task.CAUSAL_LM, Metric.PERPLEXITY, before, after, 0.9, 0.1, top1, before,
                   after, 8)


def _encoder(cosine: float) -> Quality:
    return Quality(Task.ENCODER, Metric.COSINE, 1.0, cosine, cosine, None, None, None, None, 8)


def test_a_broken_model_looks_alarming() -> None:
    """Seen on SmolLM2: "perplexity 25 -> 181,010" sat in the same blue box as a harmless
    cost; it is red now, with the ratio to the original and thousands separators."""
    t = Thresholds()
    broken = _lm(25.0, 181_010.0, top1=0.03)
    assert severity(broken, t) is Severity.ALARM
    text = cost_sentence(_lm(25.0, 25.0), broken, t, "8 held-out samples")
    assert text.startswith("✖ **Accepting it breaks the model**")
    assert "perplexity 25.00 → 181,010 (×7,240)" in text and "top-1 agreement 0.030" in text
    assert severity(_lm(25.0, 26.0), t) is Severity.OK
    assert severity(_lm(25.0, 30.0), t) is Severity.WARN  # x1.2: over 1.10, under 1.50
    assert severity(_lm(25.0, 26.0, top1=0.5), t) is Severity.ALARM  # agreement counts too
    assert severity(_lm(25.0, math.nan), t) is Severity.ALARM


def test_thresholds_are_the_users() -> None:
    q = _lm(25.0, 30.0)
    assert severity(q, Thresholds(perplexity_warn=1.3, perplexity_alarm=2.0)) is Severity.OK
    assert severity(q, Thresholds(perplexity_warn=1.05, perplexity_alarm=1.1)) \
        is Severity.ALARM
    assert severity(_encoder(0.85), Thresholds()) is Severity.WARN
    assert severity(_encoder(0.85), Thresholds(agreement_warn=0.8, agreement_alarm=0.5)) \
        is Severity.OK


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"perplexity_warn": 2.0, "perplexity_alarm": 1.5}, "1 <= warn <= alarm"),
    ({"perplexity_warn": 0.5}, "1 <= warn <= alarm"),
    ({"agreement_warn": 0.5, "agreement_alarm": 0.7}, "0 <= alarm <= warn <= 1"),
    ({"agreement_warn": 1.5}, "0 <= alarm <= warn <= 1"),
])
def test_bad_thresholds_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Thresholds(**kwargs)


def test_numbers_read_well() -> None:
    assert [number(x) for x in (181_010.4, 123.45, 24.61, 0.1234, math.inf, None)] == [
        "181,010", "123.5", "24.61", "0.123", "∞", "n/a"]


class _P:
    def __init__(self, key: tuple[str, int, int]) -> None:
        self.key = key


def test_proposals_order_by_cost_cheapest_first_unmeasured_last() -> None:
    a, b, c, d = (_P(("g", i, 0)) for i in range(4))
    costs = {a.key: _lm(25, 900), b.key: _lm(25, 27), d.key: _lm(25, 40)}
    ordered = by_cost([a, b, c, d], costs)  # type: ignore[list-item]
    assert [p.key[1] for p in ordered] == [1, 3, 0, 2]
    assert cost_label(costs[a.key], Thresholds()) == "✖ perplexity 900.0"
    assert cost_label(None, Thresholds()) == "not measured"
    assert cost_label(_encoder(0.99), Thresholds()) == "✓ cosine 0.990"


def test_trail_keeps_the_chain_of_decisions_across_undo() -> None:
    trail = Trail()
    trail.record(0, 100, _lm(25, 25), "the original")
    trail.record(1, 80, _lm(25, 27), "accepted a")
    trail.record(2, 60, _lm(25, 40), "accepted b")
    trail.record(1, 80, _lm(25, 27), "accepted a")  # undo of b: the point past it goes
    assert [p[0] for p in trail.points.values()] == [100, 80]
    trail.record(2, 70, _lm(25, 30), "accepted c")  # another decision instead
    assert [(p[0], p[1]) for p in trail.points.values()] == [(100, 25), (80, 27), (70, 30)]
    fig = trail.figure(_lm(25, 30), would_be=(50, _lm(25, 9000)))
    assert fig.layout.yaxis.type == "log"  # perplexity spans orders of magnitude
    assert fig.layout.yaxis.title.text == "perplexity (held-out)"
    near = trail.figure(_lm(25, 30), would_be=(50, _lm(25, 700)))  # x28: a linear axis
    assert near.layout.yaxis.type == "linear"  # (a log one labelled 200, 300 as "2", "3")
    said = trail.figure(_lm(25, 30), source="2 held-out samples × 32 tokens").layout.yaxis
    assert said.title.text == "perplexity (2 held-out samples × 32 tokens)"
    assert [tr.name for tr in fig.data] == ["decisions so far", "if accepted"]
    assert fig.data[1].line.color == "#D62728"  # the red of an alarming cost
