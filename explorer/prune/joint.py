"""Which removals are safe: alone, together with the others, or only as a joint set.

The one algorithm behind `Pruner.step`, the session's Accept all and its joint proposals.
Model code such as DINO's ``reshape(B, N, 3, self.num_heads, C // self.num_heads)`` ties
groups that the coupling keeps apart: cutting the residual width alone (or the head dims
alone) breaks the forward at that line, cutting both by the same fraction runs. Such groups
fail *alone* at the same model line; `solve` retries them together and, when the set passes,
reports it as one joint decision. A set that still fails at the line where another set
failed alone takes that set in (one width read at two lines, as XCiT's self- and
class-attention blocks both read ``C // num_heads``).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .preflight import Preflight, Verdict
from .removal import Removal

K = TypeVar("K", bound=Hashable)


@dataclass
class JointSet(Generic[K]):
    """Parts that are unsafe alone but run when cut together."""

    parts: list[K]
    location: str  # the model line every part fails at alone (or the shared error)
    module: str = ""


@dataclass
class Solution(Generic[K]):
    """The outcome of `solve`: what may be applied together and what may not."""

    safe: list[K] = field(default_factory=list)  # every part to apply (joint sets included)
    joint: list[JointSet[K]] = field(default_factory=list)
    unsafe: dict[K, Verdict] = field(default_factory=dict)  # left out, with the alone verdict
    rescaled: dict[K, Removal] = field(default_factory=dict)  # joint parts at one fraction
    # the passing pre-flight of exactly `removal` when one ran (its trace of the pruned copy
    # spares the caller a trace of the model after applying it); None when none did
    verdict: Verdict | None = None

    def removal(self, parts: Mapping[K, Removal]) -> Removal:
        """The union of the safe parts (joint parts rescaled to a common fraction, if so)."""
        return merge(self.rescaled.get(k, parts[k]) for k in self.safe)


def merge(removals: Iterable[Removal]) -> Removal:
    """One removal holding every pick of ``removals``."""
    out = Removal()
    for r in removals:
        for (g, a), idx in r.picks.items():
            if (g, a) in out.picks:
                out.add(g, a, idx)
            else:  # the first pick of an axis: what `Removal.add` keeps, without its loop
                out.picks[(g, a)] = list(dict.fromkeys(idx))
    return out


def _where(verdict: Verdict) -> str:
    return verdict.location or verdict.error


Progress = Callable[[float, str], None]


Rescale = Callable[[list[Removal]], list[Removal]]  # parts -> the same at one fraction
Check = Callable[[Removal], Verdict]


class _Checks:
    """``flight.check`` that remembers the last passing removal and its verdict."""

    def __init__(self, flight: Preflight) -> None:
        self.flight = flight
        self.last: tuple[Removal, Verdict] | None = None

    def __call__(self, removal: Removal) -> Verdict:
        verdict = self.flight.check(removal)
        if verdict.ok:
            self.last = (removal, verdict)
        return verdict

    def of(self, removal: Removal) -> Verdict | None:
        """The passing verdict of exactly ``removal`` when it was the last one checked."""
        if self.last is None or self.last[0].picks != removal.picks:
            return None
        return self.last[1]


def solve(flight: Preflight, parts: Mapping[K, Removal], alone: bool = False,
          progress: Progress | None = None, rescale: Rescale | None = None) -> Solution[K]:
    """Find the largest set of ``parts`` that runs when applied together.

    Bisection finds the failing parts in about log2(n) checks when few fail (``alone=False``,
    what a step and Accept all use). With ``alone=True`` every part is first checked on its
    own (n checks), so each one's alone verdict is known: what the app and the CLI show up
    front. Either way, parts that fail at the same model line are then retried as one set,
    as proposed and, when that fails and ``rescale`` is given, cut by one common fraction
    (global ranking proposes different fractions; ``C // num_heads`` needs the same one);
    a set failing at another failing set's line is merged with it and retried.
    """
    keys = list(parts)
    sol: Solution[K] = Solution()
    verdicts: dict[K, Verdict] = {}
    tell = progress or (lambda _f, _t: None)
    check = _Checks(flight)
    if alone:
        failed = []
        for i, k in enumerate(keys):
            tell(i / max(len(keys), 1), f"pre-flight of group {i + 1} of {len(keys)}, alone")
            v = check(parts[k])
            if v.ok:
                sol.safe.append(k)
            else:
                verdicts[k] = v
                failed.append(k)
        if failed and sol.safe and not check(sol.removal(parts)).ok:
            # safe alone but not together: fall back to the bisection for the whole set
            return solve(flight, parts, alone=False, progress=progress, rescale=rescale)
    else:
        failed = _bisect(check, parts, keys, sol.safe, verdicts, tell, len(keys))
    clusters: dict[str, list[K]] = {}
    for k in failed:
        clusters.setdefault(_where(verdicts[k]), []).append(k)
    done: set[str] = set()
    for start in list(clusters):
        if start in done or len(clusters[start]) < 2:
            continue  # a lone part failed alone at its own line: it joins a set when named
        ids, merged = list(clusters[start]), [start]
        while True:
            verdict, together = _together(check, sol.removal(parts), [parts[k] for k in ids],
                                          rescale)
            if verdict.ok:
                break
            # the set fails at another set's line: the width they share is cut in both
            # (XCiT's C // num_heads in its self- and class-attention blocks)
            nxt = _where(verdict)
            if nxt not in clusters or nxt in merged or nxt in done:
                break
            merged.append(nxt)
            ids += clusters[nxt]
        if not verdict.ok:
            continue
        done.update(merged)
        if together is not None:
            sol.rescaled.update(zip(ids, together, strict=True))
        sol.safe.extend(ids)
        sol.joint.append(JointSet(ids, start, verdicts[ids[0]].module))
    sol.unsafe = {k: verdicts[k] for k in failed if k not in sol.safe}
    if sol.safe:
        sol.verdict = check.of(sol.removal(parts))
    return sol


def _together(check: Check, base: Removal, together: list[Removal],
              rescale: Rescale | None) -> tuple[Verdict, list[Removal] | None]:
    """The check of ``together`` with ``base`` as proposed and, when that fails and
    ``rescale`` is given, at one common fraction; the rescaled parts when those ran."""
    verdict = check(merge([base, *together]))
    if verdict.ok or rescale is None:
        return verdict, None
    scaled = rescale(together)
    return check(merge([base, *scaled])), scaled


def _bisect(check: Check, parts: Mapping[K, Removal], ids: Sequence[K], safe: list[K],
            verdicts: dict[K, Verdict], tell: Progress, total: int) -> list[K]:
    """Add to ``safe`` the parts of ``ids`` that run with it; return the failing ones."""
    tell((len(safe) + len(verdicts)) / max(total, 1),
         f"pre-flight of {len(ids)} group(s) together ({len(safe)} of {total} safe so far)")
    verdict = check(merge(parts[k] for k in [*safe, *ids]))
    if verdict.ok:
        safe.extend(ids)
        return []
    if len(ids) == 1:
        verdicts[ids[0]] = verdict
        return list(ids)
    half = len(ids) // 2
    return (_bisect(check, parts, ids[:half], safe, verdicts, tell, total)
            + _bisect(check, parts, ids[half:], safe, verdicts, tell, total))
