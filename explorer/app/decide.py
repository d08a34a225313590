"""What the Groups page decides on, Streamlit-free: which proposal is on screen, in which
order, and whether the counts on screen keep a ``from_pretrained`` folder.

The page draws these (`pages/_groups/`); the choices here are tested without a browser.
"""
from __future__ import annotations

from collections.abc import Hashable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..coupling.groups import GroupKey
from ..prune.proposal import Counts, Proposal
from ..prune.uniform import breaks_uniform
from ..quality.evaluate import Quality
from .cost import by_cost, measured
from .session import Session


@dataclass(frozen=True)
class Order:
    """The pending proposals as the picker lists them, and what is known of their costs."""

    pending: list[Proposal]  # cheapest first when asked and measurable, else as proposed
    costs: dict[GroupKey, Quality | None]  # measured costs (None: not measured yet)
    measurable: bool  # the model has weights: costs can be measured (not on meta)
    by_cost: bool  # ordered by cost

    @property
    def missing(self) -> list[Proposal]:
        """Proposals whose cost is not measured yet."""
        return [p for p in self.pending if self.costs.get(p.key) is None]


def order(pe: Session, pending: Sequence[Proposal], cheapest_first: bool) -> Order:
    """``pending`` as the picker lists it (cheapest first when asked and the model has
    weights), with the costs measured so far; measures nothing."""
    costs = measured(pe, pending)
    measurable = pe.quality() is not None
    ordered = cheapest_first and measurable
    listed = by_cost(list(pending), costs) if ordered else list(pending)
    return Order(listed, costs, measurable, ordered)


def picked(listing: Order, pe: Session, before: Any, state_before: Hashable
           ) -> tuple[GroupKey, Hashable]:
    """The proposal to show: ``before`` (the one picked on the last run) while the model,
    the settings and the order are those it was picked under (``state_before``), else the
    first; and the state it is picked under now."""
    keys = [p.key for p in listing.pending]
    state = (id(pe), pe.version, pe.settings(), listing.by_cost)
    if before in keys and state_before == state:
        return before, state
    return keys[0], state


def widths_differ(pe: Session, proposal: Proposal, counts: Counts | None,
                  cache: MutableMapping[Hashable, list[str]]) -> list[str]:
    """The widths accepting ``proposal`` with ``counts`` would make differ between layers
    (`explorer.prune.uniform.breaks_uniform`: then no transformers config describes the
    result); [] when they stay equal or the check cannot run (the pre-flight already said
    the cut fits). Cached in ``cache`` per session, model version, groups and counts."""
    key = (id(pe), pe.version, tuple(proposal.keys), tuple(sorted((counts or {}).items())))
    if key not in cache:
        try:
            cache[key] = breaks_uniform(pe.model, pe.graph.coupling, proposal.removal(counts))
        except Exception:  # noqa: BLE001 - the pre-flight already said the cut fits
            cache[key] = []
    return cache[key]
