"""The module-wise breakdowns a report draws: the run's composed breakdowns (opbench.breakdowns,
written by opbench.analyze.session), read back as small records."""

from __future__ import annotations

from dataclasses import dataclass

from opbench.analyze.compose import MODULE_ORDER
from opbench.analyze.runs import Run


@dataclass(frozen=True)
class Breakdown:
    plan: str  # model/workload/dtype
    modules_s: dict[str, float]  # module -> seconds per model step
    sources: dict[str, int]  # calls measured / interpolated / modeled

    @property
    def total_s(self) -> float:
        return sum(self.modules_s.values())

    @property
    def not_measured(self) -> int:
        return sum(n for source, n in self.sources.items() if source != "measured")


def breakdowns(run: Run) -> list[Breakdown]:
    rows = [Breakdown(e["plan"], {m: v["time_s"] for m, v in e["modules"].items()}, e.get("sources", {}))
            for e in run.section.get("breakdowns") or ()]
    return [Breakdown(b.plan, dict(sorted(b.modules_s.items(), key=lambda kv: MODULE_ORDER.index(kv[0]))), b.sources)
            for b in rows]
