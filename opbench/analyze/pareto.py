"""Latency against cost: the Pareto frontier of a set of configurations, and the cheapest one that
meets a service-level objective (SLO), with the constraint that binds.

Shared by the inference and training trade-offs (opbench.analyze.tradeoff, .training) and the
serving simulation's rate search (opbench.analyze.simulate).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

_UNITS_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0, "h": 3600.0}


class SloError(ValueError):
    """An SLO that cannot be read."""


def parse_seconds(text: str) -> float:
    """'500ms', '2s', '1.5 min', '30' (seconds): a duration in seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z]*)\s*", text, re.IGNORECASE)
    if not m or m.group(2).lower() not in (*_UNITS_S, ""):
        raise SloError(f"{text!r} is not a duration (a number with s, ms, us, min or h)")
    return float(m.group(1)) * _UNITS_S[m.group(2).lower() or "s"]


@dataclass(frozen=True)
class Slo:
    """Upper limits in seconds, by the name of the figure they bound ("ttft", "tpot", "e2e", "step")."""
    limits_s: dict[str, float]

    def __str__(self) -> str:
        from opbench.text import format_seconds
        return ", ".join(f"{name} <= {format_seconds(s)}" for name, s in self.limits_s.items())


def parse_slo(text: str, known: Sequence[str]) -> Slo:
    """'ttft=500ms,tpot=50ms' into an Slo over the figures in `known`."""
    limits: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in known:
            raise SloError(f"SLO {text!r}: {item!r} is not NAME=DURATION with NAME one of {', '.join(known)}")
        limits[name] = parse_seconds(value)
    if not limits:
        raise SloError(f"SLO {text!r} sets no limit (e.g. {known[0]}=500ms)")
    return Slo(limits)


def pareto_front(items: Sequence[T], latency: Callable[[T], float], cost: Callable[[T], float],
                 tie_rel: float = 1e-3) -> list[T]:
    """The items no other item dominates (at most the latency and at most the cost, one of them
    strictly less), sorted by latency. Costs within tie_rel of each other are a tie: a slower item
    joins only when it is cheaper than everything faster by more than that, so that rounding in
    composed times (configurations that scale perfectly) does not fill the frontier."""
    ordered = sorted(items, key=lambda x: (latency(x), cost(x)))
    front: list[T] = []
    for item in ordered:  # by latency: an item joins when it is cheaper than everything faster than it
        if not front or cost(item) < cost(front[-1]) * (1 - tie_rel):
            front.append(item)
    return front


@dataclass(frozen=True)
class Choice(Generic[T]):
    """The cheapest item meeting an SLO, the next cheapest, and why nothing cheaper was chosen."""
    slo: Slo
    best: T | None
    runner_up: T | None
    binding: str | None  # the limit the best uses the most of (or, when nothing meets it, fails the most)
    binding_use: float | None  # that figure over its limit: 0.9 is 90% of the limit
    cheaper_fail: dict[str, int]  # over the cheaper candidates: how many fail each limit
    closest: T | None = None  # when nothing meets it: the item least over its worst limit


def choose(items: Sequence[T], slo: Slo, figures: Callable[[T], dict[str, float]],
           cost: Callable[[T], float]) -> Choice[T]:
    """Among `items` (configurations that fit), the cheapest that meets every limit of `slo`."""
    def use(item: T) -> dict[str, float]:
        f = figures(item)
        return {name: f[name] / limit for name, limit in slo.limits_s.items()}

    ordered = sorted(items, key=cost)
    meeting = [x for x in ordered if max(use(x).values()) <= 1.0]
    if meeting:
        best = meeting[0]
        name, ratio = max(use(best).items(), key=lambda kv: kv[1])
        cheaper = ordered[:ordered.index(best)]
    else:  # nothing meets it: the limit that even the closest configuration is furthest over
        best, cheaper = None, ordered
        closest = min(ordered, key=lambda x: max(use(x).values()), default=None)
        name, ratio = max(use(closest).items(), key=lambda kv: kv[1]) if closest is not None else (None, None)
    fails = {n: sum(1 for x in cheaper if use(x)[n] > 1.0) for n in slo.limits_s}
    return Choice(slo, best, meeting[1] if len(meeting) > 1 else None, name, ratio,
                  {n: k for n, k in fails.items() if k}, None if meeting else closest)
