"""`opbench compare BASE NEW [NEW ...]`: per-case speed changes between runs, regressions flagged.

Cases are matched by identity (op, shape, dtype, backend, pass). A change of a case's median beyond
the threshold is a regression (or an improvement) only when all of these hold:
- the interquartile ranges (q1..q3) of the two runs' rounds do not overlap;
- both records are stable (their medians' confidence intervals are tight): otherwise "ambiguous",
  as nvbench's robust compare has it;
- it stands out of the run-wide drift: between two runs a machine moves every case a little (clocks,
  the host's load), so the change is taken against the median change of the matched cases of about its
  duration and must exceed the threshold on top of their spread of changes (three robust standard
  deviations, never less than the whole run's), and --noise;
- neither run was throttled during the case ("throttled"), and where both records carry the SM
  clock, the change holds in cycles (time x clock) too ("clock": the card's clock moved, not the
  kernel).
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

from opbench.analyze.roofline import Ceilings, bound, run_ceilings
from opbench.analyze.runs import Run, environment_diff, label, load_run, resolve_run
from opbench.record import OpCase
from opbench.text import format_seconds, table_lines

DEFAULT_THRESHOLD_PCT = 5.0
ROBUST_Z = 3.0  # a case stands out of the run-wide drift beyond this many robust standard deviations
NEIGHBOURS = 15  # cases of about the same duration whose changes set a case's drift
# Two CPU runs of the same code moved microsecond cases by up to +56% and -40% with tight rounds on a 2-core
# virtual machine (process placement, frequency, the host's other tenants): within a factor of 1 + CPU_NOISE
# either way no CPU change is called one
CPU_NOISE = 1.0


@dataclass(frozen=True)
class Change:
    base: OpCase
    new: OpCase
    verdict: str  # regression | improvement | throttled | clock | ambiguous | same

    @property
    def change(self) -> float:
        """Relative change of the median time: +0.10 is 10% slower."""
        return self.new.median_s / self.base.median_s - 1

    @property
    def speedup(self) -> float:
        return self.base.median_s / self.new.median_s


@dataclass(frozen=True)
class Drift:
    """How the whole run moved: the median log change of the matched cases and its robust spread."""
    log_shift: float = 0.0
    log_sigma: float = 0.0  # 1.4826 x the median absolute deviation of the log changes

    @classmethod
    def of(cls, pairs: list[tuple[OpCase, OpCase]]) -> Drift:
        logs = [math.log(n.median_s / b.median_s) for b, n in pairs if b.median_s and n.median_s]
        if len(logs) < 5:  # too few cases to tell a machine's drift from a change
            return cls()
        shift = statistics.median(logs)
        return cls(shift, 1.4826 * statistics.median(abs(x - shift) for x in logs))

    @classmethod
    def by_scale(cls, pairs: list[tuple[OpCase, OpCase]]) -> list[Drift]:
        """Each pair's drift among the cases of about its duration (its NEIGHBOURS nearest by median time),
        never below the whole run's: a microsecond case drifts more between two runs than a
        millisecond one (on a CPU, by 10% and more with tight rounds), which the run-wide spread hides."""
        run = cls.of(pairs)
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0].median_s or 0.0)
        drifts: list[Drift] = [run] * len(pairs)
        for rank, i in enumerate(order):
            lo = max(0, min(rank - NEIGHBOURS // 2, len(order) - NEIGHBOURS))
            local = cls.of([pairs[j] for j in order[lo:lo + NEIGHBOURS]])
            drifts[i] = local if local.log_sigma > run.log_sigma else cls(local.log_shift, run.log_sigma)
        return drifts


def _quartiles(m: OpCase) -> tuple[float, float]:
    return (m.stability.q1_s, m.stability.q3_s) if m.stability else (m.median_s, m.median_s)


def _cycles_change(base: OpCase, new: OpCase) -> float | None:
    """The change in cycles (time x mean SM clock), where both records carry the clock."""
    bc, nc = (m.gpu.sm_clock_mhz if m.gpu else None for m in (base, new))
    if not bc or not nc:
        return None
    return (new.median_s * nc) / (base.median_s * bc) - 1


def verdict(base: OpCase, new: OpCase, threshold: float, drift: Drift = Drift(), noise: float = 0.0) -> str:
    change = new.median_s / base.median_s - 1
    (bq1, bq3), (nq1, nq3) = _quartiles(base), _quartiles(new)
    beyond = abs(math.log1p(change)) > math.log1p(max(threshold, noise))  # a factor, slower or faster
    apart = nq1 > bq3 if change > 0 else nq3 < bq1
    if not beyond:
        return "same"
    if not apart:
        return "ambiguous"  # beyond the threshold, within the rounds' own spread
    if not (base.stability and base.stability.stable and new.stability and new.stability.stable):
        return "ambiguous"
    # beyond the threshold on top of the run's own drift: the drift of two runs of the same code (on a
    # CPU, several percent for microsecond ops) is no change of the code
    if abs(math.log(1 + change) - drift.log_shift) <= ROBUST_Z * drift.log_sigma + math.log(1 + threshold):
        return "ambiguous"
    if base.throttled or new.throttled:
        return "throttled"
    cycles = _cycles_change(base, new)
    if cycles is not None and abs(cycles) <= threshold:
        return "clock"
    return "regression" if change > 0 else "improvement"


@dataclass(frozen=True)
class Comparison:
    base: Run
    new: Run
    threshold: float  # a fraction: 0.05 is 5%
    changes: tuple[Change, ...]
    only_base: tuple[OpCase, ...]
    only_new: tuple[OpCase, ...]
    environment: list[tuple[str, str | None, str | None]]  # the facts that differ
    drift: Drift = Drift()

    def of(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.verdict == kind]

    @property
    def regressions(self) -> list[Change]:
        return self.of("regression")


def _by_key(run: Run) -> dict[tuple, OpCase]:
    cases: dict[tuple, OpCase] = {}
    for m in run.measurements:
        cases.setdefault(m.key, m)  # one run holds each identity once; keep the first if not
    return cases


def compare_runs(base: Run, new: Run, threshold: float = DEFAULT_THRESHOLD_PCT / 100,
                 noise: float | None = None) -> Comparison:
    """noise: the between-run drift the machine is known to show (None: CPU_NOISE for two CPU runs, else 0)."""
    if noise is None:
        noise = CPU_NOISE if base.device == new.device == "cpu" else 0.0
    a, b = _by_key(base), _by_key(new)
    keys = [k for k in a if k in b]
    pairs = [(a[k], b[k]) for k in keys]
    drift = Drift.of(pairs)
    changes = tuple(Change(a[k], b[k], verdict(a[k], b[k], threshold, local, noise))
                    for k, local in zip(keys, Drift.by_scale(pairs)))
    return Comparison(base, new, threshold, changes, tuple(a[k] for k in a if k not in b),
                      tuple(b[k] for k in b if k not in a), environment_diff(base.machine_info, new.machine_info),
                      drift)


def share_pct(share: float) -> str:
    return f"{share:.0%}" if share >= 0.01 else "<1%"


def _share(m: OpCase, ceil: Ceilings | None) -> str:
    case_bound = bound(m, ceil)
    return share_pct(case_bound.share) if case_bound else "-"


def change_rows(c: Comparison, changes: list[Change]) -> list[tuple]:
    """A header and one row per change, largest first; the roofline column where a run has ceilings."""
    ceil_base, ceil_new = run_ceilings(c.base), run_ceilings(c.new)
    roofline = ceil_base is not None or ceil_new is not None
    rows = [("case", "base median", "new median", "change", "base IQR", "new IQR", "roofline", "throttled")]
    for ch in sorted(changes, key=lambda ch: -abs(ch.change)):
        rows.append((label(ch.base), format_seconds(ch.base.median_s), format_seconds(ch.new.median_s),
                     f"{ch.change:+.1%} (x{ch.speedup:.3g})",
                     "..".join(map(format_seconds, _quartiles(ch.base))),
                     "..".join(map(format_seconds, _quartiles(ch.new))),
                     f"{_share(ch.base, ceil_base)} -> {_share(ch.new, ceil_new)}",
                     ", ".join(sorted(set(ch.base.throttled) | set(ch.new.throttled))) or "-"))
    return rows if roofline else [row[:6] + row[7:] for row in rows]


SECTIONS = (("regression", "regressions"), ("improvement", "improvements"),
            ("throttled", "throttled in either run, not counted as regressions"),
            ("clock", "the same in cycles: the SM clock moved, not the kernel"),
            ("ambiguous", "beyond the threshold but unstable, within the rounds' spread or the run's drift"),
            ("same", "unchanged"))


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
                 "(q1..q3 of the rounds) does not overlap the base's, in stable records, beyond the run-wide drift "
                 f"(median change {math.expm1(c.drift.log_shift):+.1%}, spread {c.drift.log_sigma:.1%})")
    ceil_base, ceil_new = run_ceilings(c.base), run_ceilings(c.new)
    if ceil_base or ceil_new:
        lines.append(f"roofline shares: base's ceilings {ceil_base.source if ceil_base else 'unknown'}; "
                     f"new's {ceil_new.source if ceil_new else 'unknown'}")
    for kind, title in SECTIONS:
        changes = c.of(kind)
        if changes and (show_all or kind not in ("ambiguous", "same")):
            lines.append(f"{title} ({len(changes)}):")
            lines += table_lines(change_rows(c, changes), indent="  ")
    for title, cases in (("only in base", c.only_base), ("only in new", c.only_new)):
        if cases:
            lines.append(f"{title} ({len(cases)}):")
            lines += [f"  {label(m)}" for m in cases]
    counts = ", ".join(f"{kind}: {len(c.of(kind))}" for kind, _ in SECTIONS)
    lines.append(f"{len(c.changes)} cases matched: {counts}; {len(c.only_base)} only in base, "
                 f"{len(c.only_new)} only in new")
    if c.base.units or c.new.units:
        lines.append(units_line(c))
    return lines


def units_line(c: Comparison) -> str:
    """Units are checks of the composition at one plan, not kernels: counted, not compared."""
    return (f"units (a decoder layer or a small model timed whole): {len(c.base.units)} in base, "
            f"{len(c.new.units)} in new; validation figures of the composition (opbench estimates), "
            "not compared")


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
    p.add_argument("--noise", type=threshold_pct, default=None, metavar="PCT",
                   help="the between-run drift this machine is known to show: no change within it is a regression "
                        f"(a factor 1 + PCT either way; default {CPU_NOISE * 100:.0f}%% for two CPU runs, whose microsecond cases "
                        "were seen to move by up to +56%% between processes of the same code; 0 on GPUs, where the "
                        "comparison learns the drift from the run's spread of changes)")
    p.add_argument("--all", action="store_true", help="also list the unchanged and the ambiguous cases")
    p.set_defaults(func=run_command)


def run_command(args) -> int:
    base = load_run(resolve_run(args.base, args.storage))
    news = [load_run(resolve_run(spec, args.storage)) for spec in args.new]
    status = 0
    for new in news:
        comparison = compare_runs(base, new, args.threshold / 100, None if args.noise is None else args.noise / 100)
        print("\n".join(format_comparison(comparison, args.all)), end="\n\n")
        status = status or int(bool(comparison.regressions))
    return status
