"""`opbench compare BASE NEW [NEW ...]`: per-case speed changes between runs, regressions flagged.

Cases are matched by identity (op, shape, dtype, backend, pass). A case is a regression only when
its median got slower by more than the threshold AND the interquartile ranges (q1..q3) of the two
runs' rounds do not overlap: the IQR, unlike min..max, ignores the odd preempted round, yet a shift
that leaves the middle halves of the rounds overlapping is within what the runs' own noise spans.
A regression or improvement in a case that ran thermally or power throttled in either run is listed
as throttled instead: it is the card's state that changed, not necessarily the kernel.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from opbench.analyze.roofline import Ceilings, bound, run_ceilings
from opbench.analyze.runs import Measurement, Run, environment_diff, load_run, resolve_run
from opbench.text import format_seconds, table_lines

DEFAULT_THRESHOLD_PCT = 5.0


@dataclass(frozen=True)
class Change:
    base: Measurement
    new: Measurement
    verdict: str  # regression | improvement | throttled | noise | same

    @property
    def change(self) -> float:
        """Relative change of the median time: +0.10 is 10% slower."""
        return self.new.median_s / self.base.median_s - 1

    @property
    def speedup(self) -> float:
        return self.base.median_s / self.new.median_s


def verdict(base: Measurement, new: Measurement, threshold: float) -> str:
    change = new.median_s / base.median_s - 1
    slower = change > threshold and new.q1_s > base.q3_s
    faster = change < -threshold and new.q3_s < base.q1_s
    if (slower or faster) and (base.throttled or new.throttled):
        return "throttled"
    if slower:
        return "regression"
    if faster:
        return "improvement"
    return "noise" if abs(change) > threshold else "same"


@dataclass(frozen=True)
class Comparison:
    base: Run
    new: Run
    threshold: float  # a fraction: 0.05 is 5%
    changes: tuple[Change, ...]
    only_base: tuple[Measurement, ...]
    only_new: tuple[Measurement, ...]
    environment: list[tuple[str, str | None, str | None]]  # the facts that differ

    def of(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.verdict == kind]

    @property
    def regressions(self) -> list[Change]:
        return self.of("regression")


def _by_key(run: Run) -> dict[tuple, Measurement]:
    cases: dict[tuple, Measurement] = {}
    for m in run.measurements:
        cases.setdefault(m.key, m)  # one run holds each identity once; keep the first if not
    return cases


def compare_runs(base: Run, new: Run, threshold: float = DEFAULT_THRESHOLD_PCT / 100) -> Comparison:
    a, b = _by_key(base), _by_key(new)
    changes = tuple(Change(a[k], b[k], verdict(a[k], b[k], threshold)) for k in a if k in b)
    return Comparison(base, new, threshold, changes, tuple(a[k] for k in a if k not in b),
                      tuple(b[k] for k in b if k not in a), environment_diff(base.machine_info, new.machine_info))


def share_pct(share: float) -> str:
    return f"{share:.0%}" if share >= 0.01 else "<1%"


def _share(m: Measurement, ceil: Ceilings | None) -> str:
    case_bound = bound(m.info, ceil)
    return share_pct(case_bound.share) if case_bound else "-"


def change_rows(c: Comparison, changes: list[Change]) -> list[tuple]:
    """A header and one row per change, largest first; the roofline column where a run has ceilings."""
    ceil_base, ceil_new = run_ceilings(c.base), run_ceilings(c.new)
    roofline = ceil_base is not None or ceil_new is not None
    rows = [("case", "base median", "new median", "change", "base IQR", "new IQR", "roofline", "throttled")]
    for ch in sorted(changes, key=lambda ch: -abs(ch.change)):
        rows.append((ch.base.label, format_seconds(ch.base.median_s), format_seconds(ch.new.median_s),
                     f"{ch.change:+.1%} (x{ch.speedup:.3g})",
                     f"{format_seconds(ch.base.q1_s)}..{format_seconds(ch.base.q3_s)}",
                     f"{format_seconds(ch.new.q1_s)}..{format_seconds(ch.new.q3_s)}",
                     f"{_share(ch.base, ceil_base)} -> {_share(ch.new, ceil_new)}",
                     ", ".join(sorted(set(ch.base.throttled) | set(ch.new.throttled))) or "-"))
    return rows if roofline else [row[:6] + row[7:] for row in rows]


SECTIONS = (("regression", "regressions"), ("improvement", "improvements"),
            ("throttled", "throttled in either run, not counted as regressions"),
            ("noise", "beyond the threshold but within the runs' spread"), ("same", "unchanged"))


def format_comparison(c: Comparison, show_all: bool = False) -> list[str]:
    lines = [f"opbench compare: base {c.base.path} ({c.base.datetime or 'no date'}) "
             f"vs new {c.new.path} ({c.new.datetime or 'no date'})"]
    if c.environment:
        lines.append("environment differences:")
        lines += table_lines([("fact", "base", "new")] + [(k, a or "-", b or "-") for k, a, b in c.environment],
                             indent="  ")
    else:
        lines.append("environment: no difference in driver, CUDA, software, GPU, clocks or host")
    lines.append(f"rule: a regression is a median more than {c.threshold:.0%} slower whose interquartile range "
                 "(q1..q3 of the rounds) does not overlap the base's")
    ceil_base, ceil_new = run_ceilings(c.base), run_ceilings(c.new)
    if ceil_base or ceil_new:
        lines.append(f"roofline shares: base's ceilings {ceil_base.source if ceil_base else 'unknown'}; "
                     f"new's {ceil_new.source if ceil_new else 'unknown'}")
    for kind, title in SECTIONS:
        changes = c.of(kind)
        if changes and (show_all or kind not in ("noise", "same")):
            lines.append(f"{title} ({len(changes)}):")
            lines += table_lines(change_rows(c, changes), indent="  ")
    for title, cases in (("only in base", c.only_base), ("only in new", c.only_new)):
        if cases:
            lines.append(f"{title} ({len(cases)}):")
            lines += [f"  {m.label}" for m in cases]
    counts = ", ".join(f"{kind}: {len(c.of(kind))}" for kind, _ in SECTIONS)
    lines.append(f"{len(c.changes)} cases matched: {counts}; {len(c.only_base)} only in base, "
                 f"{len(c.only_new)} only in new")
    return lines


def threshold_pct(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a percentage >= 0, got {text}")
    return value


def add_command(sub) -> None:
    p = sub.add_parser("compare", help="compare runs case by case; exit 1 on a regression",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("base", help="the base run: a JSON file, or a run id with --storage")
    p.add_argument("new", nargs="+", help="the run(s) to compare with the base")
    p.add_argument("--threshold", type=threshold_pct, default=DEFAULT_THRESHOLD_PCT, metavar="PCT",
                   help=f"slow-down of the median that counts (default {DEFAULT_THRESHOLD_PCT:g}%%)")
    p.add_argument("--storage", metavar="DIR",
                   help="a pytest-benchmark storage folder (--benchmark-storage) in which BASE and NEW name runs "
                        "by id (0001), saved name, or MACHINE-ID/0001")
    p.add_argument("--all", action="store_true", help="also list the unchanged cases and those within noise")
    p.set_defaults(func=run_command)


def run_command(args) -> int:
    base = load_run(resolve_run(args.base, args.storage))
    news = [load_run(resolve_run(spec, args.storage)) for spec in args.new]
    status = 0
    for new in news:
        comparison = compare_runs(base, new, args.threshold / 100)
        print("\n".join(format_comparison(comparison, args.all)), end="\n\n")
        status = status or int(bool(comparison.regressions))
    return status
