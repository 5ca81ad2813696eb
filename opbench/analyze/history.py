"""`opbench history [PATHS...]`: which cases moved over a history of runs, at which run, and what
changed in the environment there.

Runs are read from storage folders (searched recursively) or files, kept apart per card (a GPU
model, or a CPU for CPU runs) and ordered by time or by a version (--by driver|cuda|torch|triton).
Every case becomes a series of medians. Where a record carries the card's mean SM clock during its
rounds, its median is normalised to the history's reference clock (median x clock / reference): a
card that ran slower clocks takes longer for the same cycles, which is the card's state, not the
kernel's.

Two detectors look at each series, in the log of the normalised median (a relative scale):
- steps, as asv finds them: the piecewise-constant fit minimising the sum of |x - level| plus a
  penalty per step, solved exactly by dynamic programming. The penalty is set from the series'
  own noise: gamma = BETA x sigma, where sigma is the robust spread of the run-to-run differences
  (which a few steps barely move), never below the records' own uncertainty of their medians;
- the newest run against the N runs before it (Conbench's lookback z-score): z = (x - mean) / sd.

A step or a newest run beyond its threshold (a global one, or per op family or case) is judged in
the vocabulary of `opbench compare`: regression or improvement; "ambiguous" where a record on
either side is unstable (its median's confidence interval was wide) or its host was busy, or, for
the newest run of records without clocks, where the whole run moved about as much (the machine,
not the kernel); "throttled" where the card slowed itself down; "clock" where the raw times moved
but the cycles did not. A step names the run where it happened and what changed in the environment
between that run and the one before. The exit status is 1 when the newest run has a regression.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from opbench.analyze.compare import DEFAULT_THRESHOLD_PCT, ROBUST_Z, threshold_pct
from opbench.analyze.runs import Run, RunError, environment, environment_diff, label, load_run, shape_id
from opbench.measure.storage import card_of_run
from opbench.record import OpCase
from opbench.text import format_seconds, table_lines

DEFAULT_LOOKBACK = 5  # runs before the newest that the z-score compares it with
DEFAULT_Z = 5.0  # Conbench's default z threshold
# Penalty per step in units of the series' noise. In 20 runs of Gaussian noise, 6 fits a spurious step in
# about 2% of series and finds a step of four times the noise in the middle in over 90% (the rest one run
# off, where a run's noise crossed half the step); tests/test_history.py holds it to that.
STEP_BETA = 6.0
MIN_SIGMA_REL = 0.002  # no series is trusted to be quieter than 0.2% between runs
MIN_LOOKBACK = 3  # fewer earlier runs give no standard deviation worth a z-score
FLAGGED = ("regression", "improvement")

# --by KEY: the environment facts (runs.environment labels) that order the runs, first one present
BY: dict[str, tuple[str, ...]] = {"time": (), "driver": ("driver",), "cuda": ("CUDA (runtime)", "CUDA (driver)"),
                                  "torch": ("torch",), "triton": ("Triton",)}
VERSIONS = ("driver", "CUDA (driver)", "CUDA (runtime)", "torch", "Triton")  # the version table's columns


class HistoryError(RunError):
    """Paths that do not make a history (no runs, no version to order by, a bad threshold)."""


# ---------------------------------------------------------------------------------------------- thresholds

def case_id(m: OpCase) -> str:
    """A case as its test id names it, with the op family in front: gemm[4096x6144x4096-bf16-fwd-cublas]."""
    return f"{m.op}[{shape_id(m)}-{m.dtype}-{m.pass_}-{m.backend}]"


@dataclass(frozen=True)
class Thresholds:
    """Relative changes that count: per case id (globs allowed), else per op family, else the default."""
    default: float = DEFAULT_THRESHOLD_PCT / 100
    families: dict[str, float] = field(default_factory=dict)
    cases: dict[str, float] = field(default_factory=dict)  # case id pattern -> fraction

    def of(self, m: OpCase) -> float:
        cid = case_id(m)
        for pattern, value in self.cases.items():
            if _glob(pattern, cid) or _glob(pattern, cid.split("[", 1)[1][:-1]):
                return value
        return self.families.get(m.op, self.default)

    @classmethod
    def parse(cls, text: str | None, families: set[str] | None = None) -> Thresholds:
        """"5", "5%", "gemm=3%,attention=5%", "4%,gemm=3%,gemm[*-fp8-*]=8%": a bare value is the default;
        KEY=VALUE sets an op family (a known op name) or a case (its id, or a glob over ids)."""
        from opbench.ops import FAMILIES

        known = set(FAMILIES) | (families or set())
        default, fams, cases = DEFAULT_THRESHOLD_PCT / 100, {}, {}
        for item in _split_items(text or ""):
            key, sep, value = item.rpartition("=")
            try:
                fraction = threshold_pct(value.strip().removesuffix("%")) / 100
            except (ValueError, argparse.ArgumentTypeError):
                raise HistoryError(f"threshold {item!r}: expected PCT or KEY=PCT (e.g. gemm=3%), "
                                   f"PCT a percentage >= 0") from None
            if not sep:
                default = fraction
            elif key.strip() in known:
                fams[key.strip()] = fraction
            else:
                cases[key.strip()] = fraction
        return cls(default, fams, cases)

    def describe(self) -> str:
        parts = [f"{self.default:.1%}"] + [f"{k}={v:.1%}" for k, v in {**self.families, **self.cases}.items()]
        return ", ".join(parts)


def _glob(pattern: str, text: str) -> bool:
    """`*` and `?` as wildcards, every other character itself (a case id's brackets included)."""
    regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, text) is not None


def _split_items(text: str) -> list[str]:
    """Comma-separated items; commas inside a case id's brackets belong to it."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [i.strip() for i in items + [current] if i.strip()]


# ------------------------------------------------------------------------------------------ step detection

def _segment_costs(xs: list[float]) -> tuple[list[list[float]], list[list[float]]]:
    """cost[i][j]: sum of |x - median| over xs[i:j]; median[i][j] the median. Two heaps per start i
    keep the running median and the sums below and above it: O(n^2 log n)."""
    n = len(xs)
    cost = [[0.0] * (n + 1) for _ in range(n + 1)]
    median = [[0.0] * (n + 1) for _ in range(n + 1)]
    for i in range(n):
        low: list[float] = []  # max-heap (negated) of the lower half
        high: list[float] = []  # min-heap of the upper half
        sum_low = sum_high = 0.0
        for j in range(i, n):
            x = xs[j]
            if not low or x <= -low[0]:
                heapq.heappush(low, -x)
                sum_low += x
            else:
                heapq.heappush(high, x)
                sum_high += x
            if len(low) > len(high) + 1:
                moved = -heapq.heappop(low)
                sum_low -= moved
                heapq.heappush(high, moved)
                sum_high += moved
            elif len(high) > len(low):
                moved = heapq.heappop(high)
                sum_high -= moved
                heapq.heappush(low, -moved)
                sum_low += moved
            m = -low[0]  # any value between the two middle ones minimises the sum
            cost[i][j + 1] = (m * len(low) - sum_low) + (sum_high - m * len(high))
            median[i][j + 1] = m if len(low) > len(high) else (m + high[0]) / 2
    return cost, median


def fit_steps(xs: list[float], gamma: float) -> tuple[list[int], list[float]]:
    """The exact minimiser of sum |x_i - level_i| + gamma x (number of steps) over piecewise-constant
    levels (the L1 Potts problem): the positions where a new level starts, and the level at each
    position."""
    n = len(xs)
    if n == 0:
        return [], []
    cost, median = _segment_costs(xs)
    best = [0.0] * (n + 1)
    start = [0] * (n + 1)
    best[0] = -gamma  # the first segment pays no step
    for j in range(1, n + 1):
        best[j], start[j] = min((best[i] + gamma + cost[i][j], i) for i in range(j))
    bounds, j = [], n
    while j > 0:
        bounds.append(start[j])
        j = start[j]
    bounds = sorted(bounds)  # segment starts, 0 first
    levels = []
    for a, b in zip(bounds, bounds[1:] + [n]):
        levels += [median[a][b]] * (b - a)
    return bounds[1:], levels


def robust_sigma(xs: list[float]) -> float:
    """The noise of a series from its run-to-run differences: 1.4826 x their median absolute value,
    over sqrt(2) (a difference has two runs' noise). A step moves one difference, so a few steps
    leave it be; 0 with fewer than two values."""
    diffs = [abs(b - a) for a, b in zip(xs, xs[1:])]
    return 1.4826 * statistics.median(diffs) / math.sqrt(2) if diffs else 0.0


# ------------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Point:
    """One run's record of a case, its times scaled to the reference clock where it has a clock."""
    run: int  # position of the run in the ordered history, from 0
    median_s: float  # as measured
    normalised_s: float  # median_s x clock / reference clock; median_s without a clock
    q1_s: float  # quartiles of the rounds, normalised alike
    q3_s: float
    sm_clock_mhz: float | None
    stable: bool  # the median's confidence interval within the run's stability limit
    busy: bool  # the host was loaded or stolen from during a CPU case
    throttled: tuple[str, ...]
    noise_rel: float | None  # standard error of the median over the median (95% CI half-width / 1.96)

    @property
    def trusted(self) -> bool:
        return self.stable and not self.busy


def _point(run: int, m: OpCase, reference_mhz: float | None) -> Point:
    clock = m.gpu.sm_clock_mhz if m.gpu else None
    scale = clock / reference_mhz if clock and reference_mhz else 1.0
    st = m.stability
    q1, q3 = (st.q1_s, st.q3_s) if st else (m.median_s, m.median_s)
    noise = st.ci_rel / 1.96 if st and st.ci_rel is not None else None
    return Point(run, m.median_s, m.median_s * scale, q1 * scale, q3 * scale, clock, bool(st and st.stable),
                 bool(m.host and m.host.busy), m.throttled, noise)


@dataclass(frozen=True)
class Step:
    """A new level of a series, starting at run `run` (positions from 0; the one before it: `prev_run`)."""
    run: int
    prev_run: int
    before_s: float  # the fitted levels either side (normalised seconds, or an index for a family)
    after_s: float
    verdict: str  # regression | improvement | throttled | clock | ambiguous | same
    environment: tuple[tuple[str, str | None, str | None], ...]  # the facts that changed between the two runs
    why: str = ""

    @property
    def change(self) -> float:
        return self.after_s / self.before_s - 1

    @property
    def flagged(self) -> bool:
        return self.verdict in FLAGGED


@dataclass(frozen=True)
class Lookback:
    """The newest run against the mean of the runs before it (Conbench): z in the log of the medians."""
    run: int
    newest_s: float  # the newest run's normalised median
    mean_s: float  # geometric mean of the lookback's normalised medians
    runs: int  # how many earlier runs it looked back over
    z: float | None  # None with fewer than MIN_LOOKBACK earlier runs
    verdict: str
    why: str = ""

    @property
    def change(self) -> float:
        return self.newest_s / self.mean_s - 1


@dataclass(frozen=True)
class CaseHistory:
    case: OpCase  # the newest record of the case
    points: tuple[Point, ...]
    levels_s: tuple[float, ...]  # the fitted level at each point (normalised seconds)
    sigma_rel: float  # the noise that set the step penalty
    threshold: float
    steps: tuple[Step, ...]  # steps of the normalised series, and "clock" steps of the raw one
    lookback: Lookback | None
    verdict: str  # for the newest run of the history; "absent" when the case did not run in it

    @property
    def label(self) -> str:
        return label(self.case)

    @property
    def flagged(self) -> list[Step]:
        return [s for s in self.steps if s.flagged]


@dataclass(frozen=True)
class FamilyHistory:
    """An op family in aggregate: per run, the geometric mean of its cases' normalised medians over
    each case's own median level (1.0 = the case's usual time)."""
    op: str
    cases: int
    index: tuple[tuple[int, float], ...]  # (run, index)
    levels: tuple[float, ...]
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class History:
    card: str
    by: str
    runs: tuple[Run, ...]
    reference_clock_mhz: float | None
    thresholds: Thresholds
    cases: tuple[CaseHistory, ...]
    families: tuple[FamilyHistory, ...]
    lookback: int
    z: float

    @property
    def flagged(self) -> list[tuple[CaseHistory, Step]]:
        return [(c, s) for c in self.cases for s in c.flagged]

    @property
    def newest_regressions(self) -> list[CaseHistory]:
        return [c for c in self.cases if c.verdict == "regression"]

    def run_name(self, run: int) -> str:
        return f"#{run + 1} {self.runs[run].path.name}"


# ------------------------------------------------------------------------------------------ loading, order

def load_runs(paths: list[str]) -> tuple[list[Run], list[str]]:
    """The runs of files and of folders (searched recursively, files that are not opbench runs passed
    over with a note); each file once."""
    runs, notes, seen = [], [], set()
    for spec in paths:
        path = Path(spec.removeprefix("file://"))
        if path.is_dir():
            files = sorted(path.rglob("*.json"))
            if not files:
                notes.append(f"{path}: no .json files")
            for f in files:
                if f.resolve() in seen:
                    continue
                seen.add(f.resolve())
                try:
                    runs.append(load_run(f))
                except RunError as error:
                    notes.append(f"passed over {f}: {str(error).split(';')[0]}")
        elif path.resolve() not in seen:
            seen.add(path.resolve())
            runs.append(load_run(path))
    return runs, notes


def card(run: Run) -> str:
    device = run.device
    name = card_of_run(run.machine_info, device)
    return name if device == "cuda" else f"CPU {name}"


def by_card(runs: list[Run]) -> dict[str, list[Run]]:
    cards: dict[str, list[Run]] = {}
    for run in runs:
        cards.setdefault(card(run), []).append(run)
    return cards


def _time_key(run: Run) -> tuple:
    try:
        when = datetime.fromisoformat(run.datetime).timestamp() if run.datetime else float("-inf")
    except ValueError:
        when = float("-inf")
    return when, run.path.name, str(run.path)


def version_of(run: Run, by: str) -> str | None:
    env = environment(run.machine_info)
    return next((env[k] for k in BY[by] if env.get(k)), None)


def _version_key(text: str | None) -> tuple:
    """Versions compare by their numbers: 2.13 after 2.9, 560.28.03 after 550.54.15."""
    if text is None:
        return ()
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|[^\d.+\-_]+", text))


def order_runs(runs: list[Run], by: str = "time") -> list[Run]:
    """By time; or by a version, runs of the same version by time. Runs without that version first."""
    if by not in BY:
        raise HistoryError(f"--by {by}: expected one of {', '.join(BY)}")
    if by != "time" and not any(version_of(r, by) for r in runs):
        raise HistoryError(f"--by {by}: no run records a {by} version")
    return sorted(runs, key=lambda r: (_version_key(version_of(r, by)) if by != "time" else (), _time_key(r)))


# ---------------------------------------------------------------------------------------------- analysis

def _judge(change: float, threshold: float, points: list[Point], raw_change: float | None = None) -> tuple[str, str]:
    """The verdict of a change between the records in `points` (the runs either side of it)."""
    if abs(change) <= threshold:
        if raw_change is not None and abs(raw_change) > threshold:
            return "clock", "the SM clock moved; the cycles did not"
        return "same", ""
    untrusted = [p for p in points if not p.trusted]
    if untrusted:
        reasons = sorted({"busy host" if p.busy else "unstable record" for p in untrusted})
        return "ambiguous", ", ".join(reasons) + f" at {', '.join(f'#{p.run + 1}' for p in untrusted)}"
    throttled = sorted({r for p in points for r in p.throttled})
    if throttled:
        return "throttled", ", ".join(throttled)
    return ("regression" if change > 0 else "improvement"), ""


def _sigma(logs: list[float], points: list[Point]) -> float:
    """The series' noise (relative): its robust run-to-run spread, never below the records' own
    uncertainty (the median of their medians' standard errors) nor MIN_SIGMA_REL."""
    floors = [p.noise_rel for p in points if p.noise_rel is not None]
    return max(robust_sigma(logs), statistics.median(floors) if floors else 0.0, MIN_SIGMA_REL)


def _steps(values: list[float], sigma: float) -> tuple[list[int], list[float]]:
    """Steps of a series of positive values, fitted in their log; the levels back in their unit."""
    logs = [math.log(v) for v in values]
    bounds, levels = fit_steps(logs, STEP_BETA * sigma)
    return bounds, [math.exp(v) for v in levels]


@dataclass
class _Series:
    """A case's series while the history is analysed (before the newest run is judged against the drift)."""
    key: tuple
    newest: OpCase
    points: list[Point]
    threshold: float
    sigma: float = 0.0
    bounds: list[int] = field(default_factory=list)
    levels: list[float] = field(default_factory=list)
    raw_bounds: list[int] = field(default_factory=list)
    raw_levels: list[float] = field(default_factory=list)
    lookback: tuple[float, int, float | None] | None = None  # (mean_s, runs, z) of the newest point


def _series(runs: list[Run], thresholds: Thresholds, reference_mhz: float | None) -> list[_Series]:
    records: dict[tuple, list[tuple[int, OpCase]]] = {}
    for i, run in enumerate(runs):
        seen = set()
        for m in run.measurements:
            if m.kind == "peak" or m.key in seen or not m.median_s:
                continue  # peaks are the card's ceilings, not kernels; a run holds each case once
            seen.add(m.key)
            records.setdefault(m.key, []).append((i, m))
    out = []
    for key, recs in records.items():
        points = [_point(i, m, reference_mhz) for i, m in recs]
        out.append(_Series(key, recs[-1][1], points, thresholds.of(recs[-1][1])))
    return out


def _fit(s: _Series, lookback: int) -> None:
    normalised = [p.normalised_s for p in s.points]
    s.sigma = _sigma([math.log(v) for v in normalised], s.points)
    s.bounds, s.levels = _steps(normalised, s.sigma)
    if any(p.sm_clock_mhz for p in s.points):  # steps in the raw times that the clock explains
        raw = [p.median_s for p in s.points]
        s.raw_bounds, s.raw_levels = _steps(raw, _sigma([math.log(v) for v in raw], s.points))
    earlier = [math.log(p.normalised_s) for p in s.points[:-1]][-lookback:]
    if earlier:
        mean = statistics.fmean(earlier)
        z = None
        if len(earlier) >= MIN_LOOKBACK:
            # the lookback's spread, never below the noise of the series before the newest run
            sd = max(statistics.stdev(earlier), _sigma([math.log(v) for v in normalised[:-1]], s.points[:-1]))
            z = (math.log(normalised[-1]) - mean) / sd
        s.lookback = (math.exp(mean), len(earlier), z)


def _newest_drift(series: list[_Series], newest: int) -> tuple[float, float] | None:
    """How the newest run moved as a whole against the lookback (median log change, robust spread),
    from the cases without clocks; None with fewer than five (too few to tell the machine from a change)."""
    logs = [math.log(s.points[-1].normalised_s / s.lookback[0]) for s in series
            if s.lookback and s.points[-1].run == newest and not s.points[-1].sm_clock_mhz]
    if len(logs) < 5:
        return None
    shift = statistics.median(logs)
    return shift, 1.4826 * statistics.median(abs(x - shift) for x in logs)


@functools.cache
def _commit(path: Path) -> str | None:
    """The suite's own commit a run was made at (pytest-benchmark's commit_info): its Triton kernels are
    among what moves. Read apart from load_run, which keeps no commit."""
    try:
        info = json.loads(path.read_text()).get("commit_info") or {}
    except (OSError, ValueError):
        return None
    return (str(info["id"])[:10] + ("+dirty" if info.get("dirty") else "")) if info.get("id") else None


def _env(runs: list[Run], prev: int, run: int) -> tuple:
    """What changed between two runs: the environment facts, then the suite's commit."""
    diff = environment_diff(runs[prev].machine_info, runs[run].machine_info)
    before, after = _commit(runs[prev].path), _commit(runs[run].path)
    if before != after:
        diff.append(("commit", before, after))
    return tuple(diff)


def _case_history(s: _Series, runs: list[Run], z_limit: float, drift: tuple[float, float] | None) -> CaseHistory:
    newest = len(runs) - 1
    pts = s.points
    steps = []
    for b in s.bounds:
        before, after = s.levels[b - 1], s.levels[b]
        verdict, why = _judge(after / before - 1, s.threshold, [pts[b - 1], pts[b]])
        if pts[b].run == newest and verdict in FLAGGED and drift and _moved_with_run(after / before, s, drift):
            verdict, why = "ambiguous", "the whole newest run moved about as much"
        steps.append(Step(pts[b].run, pts[b - 1].run, before, after, verdict, _env(runs, pts[b - 1].run, pts[b].run),
                          why))
    normalised_runs = {pts[b].run for b in s.bounds}
    for b in s.raw_bounds:  # a step in the raw times alone: the clock moved
        if pts[b].run in normalised_runs:
            continue
        before, after = s.raw_levels[b - 1], s.raw_levels[b]
        if abs(after / before - 1) <= s.threshold:
            continue
        clocks = [p.sm_clock_mhz for p in (pts[b - 1], pts[b])]
        why = "SM clock " + " -> ".join(f"{c:.0f} MHz" if c else "?" for c in clocks) + "; the cycles did not move"
        steps.append(Step(pts[b].run, pts[b - 1].run, before, after, "clock", _env(runs, pts[b - 1].run, pts[b].run),
                          why))
    steps.sort(key=lambda st: st.run)
    lookback = None
    if s.lookback and pts[-1].run == newest:
        mean, n, z = s.lookback
        change = pts[-1].normalised_s / mean - 1
        raw_mean = math.exp(statistics.fmean(math.log(p.median_s) for p in pts[:-1][-n:]))
        verdict, why = _judge(change, s.threshold, [pts[-1]], pts[-1].median_s / raw_mean - 1)
        if verdict in FLAGGED and z is None:
            verdict, why = "ambiguous", f"{n} earlier run(s), too few for a z-score ({MIN_LOOKBACK} needed)"
        elif verdict in FLAGGED and abs(z) <= z_limit:
            verdict, why = "ambiguous", f"within the history's noise (|z| {abs(z):.1f} <= {z_limit:g})"
        elif verdict in FLAGGED and drift and _moved_with_run(1 + change, s, drift):
            verdict, why = "ambiguous", "the whole newest run moved about as much"
        lookback = Lookback(newest, pts[-1].normalised_s, mean, n, z, verdict, why)
    return CaseHistory(s.newest, tuple(pts), tuple(s.levels), s.sigma, s.threshold, tuple(steps), lookback,
                       _newest_verdict(pts, steps, lookback, newest))


def _moved_with_run(ratio: float, s: _Series, drift: tuple[float, float]) -> bool:
    if s.points[-1].sm_clock_mhz:
        return False  # the clock accounts for the card's state; a move in cycles is the kernel's
    shift, spread = drift
    return abs(math.log(ratio) - shift) <= max(ROBUST_Z * spread, math.log(1 + s.threshold))


RANK = ("regression", "improvement", "throttled", "ambiguous", "clock", "same")


def _newest_verdict(points: list[Point], steps: list[Step], lookback: Lookback | None, newest: int) -> str:
    if points[-1].run != newest:
        return "absent"
    verdicts = [s.verdict for s in steps if s.run == newest] + ([lookback.verdict] if lookback else [])
    return min(verdicts, key=RANK.index, default="same")


def _families(cases: list[CaseHistory], runs: list[Run], thresholds: Thresholds) -> list[FamilyHistory]:
    out = []
    for op in sorted({c.case.op for c in cases}):
        mine = [c for c in cases if c.case.op == op]
        logs: dict[int, list[float]] = {}
        trusted: dict[int, list[bool]] = {}
        for c in mine:
            usual = statistics.median(p.normalised_s for p in c.points)
            for p in c.points:
                logs.setdefault(p.run, []).append(math.log(p.normalised_s / usual))
                trusted.setdefault(p.run, []).append(p.trusted)
        order = sorted(logs)
        # the trusted records of a run make its point: an unstable case's jumps are not the family's;
        # a run without any trusted record keeps them all and is itself not trusted
        index = [math.exp(statistics.fmean([x for x, ok in zip(logs[r], trusted[r]) if ok] or logs[r]))
                 for r in order]
        points = [Point(r, v, v, v, v, None, any(trusted[r]), False, (), None) for r, v in zip(order, index)]
        sigma = _sigma([math.log(v) for v in index], points)
        bounds, levels = _steps(index, sigma)
        threshold = thresholds.families.get(op, thresholds.default)
        steps = []
        for b in bounds:
            verdict, why = _judge(levels[b] / levels[b - 1] - 1, threshold, [points[b - 1], points[b]])
            steps.append(Step(order[b], order[b - 1], levels[b - 1], levels[b], verdict,
                              _env(runs, order[b - 1], order[b]), why))
        out.append(FamilyHistory(op, len(mine), tuple(zip(order, index)), tuple(levels), tuple(steps)))
    return out


def build_history(runs: list[Run], by: str = "time", thresholds: Thresholds | None = None,
                  lookback: int = DEFAULT_LOOKBACK, z: float = DEFAULT_Z) -> History:
    """The history of one card's runs (see the module's docstring for the method)."""
    if not runs:
        raise HistoryError("no runs to make a history of")
    cards = {card(r) for r in runs}
    if len(cards) > 1:
        raise HistoryError(f"runs of {len(cards)} cards ({', '.join(sorted(cards))}): a history is one card's")
    thresholds = thresholds or Thresholds()
    ordered = order_runs(runs, by)
    clocks = [m.gpu.sm_clock_mhz for r in ordered for m in r.measurements if m.gpu and m.gpu.sm_clock_mhz]
    reference = statistics.median(clocks) if clocks else None
    series = _series(ordered, thresholds, reference)
    for s in series:
        _fit(s, lookback)
    drift = _newest_drift(series, len(ordered) - 1)
    cases = [_case_history(s, ordered, z, drift) for s in series]
    cases.sort(key=lambda c: (RANK.index(c.verdict) if c.verdict in RANK else len(RANK), -len(c.flagged), c.label))
    return History(card(ordered[0]), by, tuple(ordered), reference, thresholds, tuple(cases),
                   tuple(_families(cases, ordered, thresholds)), lookback, z)


def histories(paths: list[str], by: str = "time", thresholds: str | None = None, lookback: int = DEFAULT_LOOKBACK,
              z: float = DEFAULT_Z) -> tuple[list[History], list[str]]:
    """One history per card among the runs at `paths`, and notes on files passed over."""
    runs, notes = load_runs(paths)
    if not runs:
        raise HistoryError(f"no opbench runs in {', '.join(paths)}" + (f" ({'; '.join(notes)})" if notes else ""))
    ops = {m.op for r in runs for m in r.measurements}
    parsed = Thresholds.parse(thresholds, ops)
    return [build_history(group, by, parsed, lookback, z) for _, group in sorted(by_card(runs).items())], notes


# ------------------------------------------------------------------------------------------------- output

def change_text(env: tuple | list) -> str:
    """"torch 2.12.0 -> 2.13.0; driver 550.54 -> 560.28", or that nothing recorded changed."""
    return "; ".join(f"{k} {a or '-'} -> {b or '-'}" for k, a, b in env) or "no recorded environment change"


def version_rows(h: History) -> list[tuple]:
    """The version table: one row per run, in the history's order."""
    rows = [("#", "run", "date", *VERSIONS)]
    for i, run in enumerate(h.runs):
        env = environment(run.machine_info)
        rows.append((i + 1, run.path.name, run.datetime[:19] or "-", *(env.get(k) or "-" for k in VERSIONS)))
    return rows


def _case_row(h: History, c: CaseHistory) -> tuple:
    newest = c.points[-1]
    lb = c.lookback
    steps = "; ".join(f"#{s.run + 1} {s.change:+.1%} {s.verdict}" for s in c.steps if s.verdict != "same") or "-"
    return (c.label, len(c.points), format_seconds(newest.normalised_s),
            "..".join(format_seconds(v) for v in (newest.q1_s, newest.q3_s)), f"{c.sigma_rel:.1%}",
            f"{lb.change:+.1%}" if lb else "-", f"{lb.z:+.1f}" if lb and lb.z is not None else "-", steps, c.verdict)


def format_history(h: History) -> list[str]:
    clock = (f"times normalised to the reference SM clock {h.reference_clock_mhz:.0f} MHz (median x clock / "
             "reference)" if h.reference_clock_mhz else "no SM clocks recorded: raw medians")
    rule = (f"rule: steps of a piecewise-constant fit (penalty {STEP_BETA:g} x each series' noise per step) and the "
            f"newest run's z-score against the {h.lookback} before it (|z| > {h.z:g}); a change counts beyond "
            f"{h.thresholds.describe()}, in stable records of an unthrottled card")
    lines = [f"opbench history: {h.card}, {len(h.runs)} runs ordered by {h.by}; {clock}", rule]
    lines += ["runs:"] + table_lines(version_rows(h), indent="  ")
    flagged = h.flagged
    lines.append(f"flagged steps ({len(flagged)}):" if flagged else "flagged steps: none")
    if flagged:
        rows = [("case", "at run", "change", "level before -> after", "environment change")]
        rows += [(c.label, h.run_name(s.run), f"{s.change:+.1%}",
                  f"{format_seconds(s.before_s)} -> {format_seconds(s.after_s)}", change_text(s.environment))
                 for c, s in flagged]
        lines += table_lines(rows, indent="  ")
    others = [(c, s) for c in h.cases for s in c.steps if s.verdict not in FLAGGED + ("same",)]
    if others:
        lines.append(f"steps not counted ({len(others)}):")
        rows = [("case", "at run", "change", "verdict", "why", "environment change")]
        rows += [(c.label, h.run_name(s.run), f"{s.change:+.1%}", s.verdict, s.why, change_text(s.environment))
                 for c, s in others]
        lines += table_lines(rows, indent="  ")
    moved = [f for f in h.families if any(s.verdict != "same" for s in f.steps)]
    if moved:
        lines.append("op families in aggregate (geometric mean of their cases, each over its usual time):")
        lines += [f"  {f.op} ({f.cases} cases): " + "; ".join(
            f"#{s.run + 1} {s.change:+.1%} {s.verdict} ({change_text(s.environment)})"
            for s in f.steps if s.verdict != "same") for f in moved]
    lines.append(f"per case, the newest run ({h.run_name(len(h.runs) - 1)}):")
    header = ("case", "runs", "newest", "newest IQR", "noise", "vs lookback", "z", "steps", "verdict")
    lines += table_lines([header] + [_case_row(h, c) for c in h.cases], indent="  ")
    counts = {}
    for c in h.cases:
        counts[c.verdict] = counts.get(c.verdict, 0) + 1
    lines.append(f"{len(h.cases)} cases: " + ", ".join(f"{k}: {counts.get(k, 0)}" for k in RANK + ("absent",))
                 + f"; newest run has {len(h.newest_regressions)} regression(s)")
    return lines


def _step_dict(h: History, s: Step) -> dict:
    return {"run": s.run + 1, "run_file": h.runs[s.run].path.name, "previous_run": s.prev_run + 1,
            "before": s.before_s, "after": s.after_s, "change": s.change, "verdict": s.verdict, "why": s.why,
            "environment": [{"fact": k, "before": a, "after": b} for k, a, b in s.environment]}


def history_dict(h: History) -> dict:
    return {
        "card": h.card, "by": h.by, "reference_clock_mhz": h.reference_clock_mhz,
        "thresholds": {"default": h.thresholds.default, "families": h.thresholds.families,
                       "cases": h.thresholds.cases},
        "lookback": h.lookback, "z": h.z, "step_beta": STEP_BETA,
        "runs": [{"run": i + 1, "path": str(r.path), "datetime": r.datetime,
                  "versions": {k: environment(r.machine_info).get(k) for k in VERSIONS}} for i, r in enumerate(h.runs)],
        "cases": [{
            "case": case_id(c.case), "label": c.label, "op": c.case.op, "verdict": c.verdict,
            "threshold": c.threshold, "noise_rel": c.sigma_rel,
            "points": [{"run": p.run + 1, "median_s": p.median_s, "normalised_s": p.normalised_s, "q1_s": p.q1_s,
                        "q3_s": p.q3_s, "sm_clock_mhz": p.sm_clock_mhz, "stable": p.stable, "busy": p.busy,
                        "throttled": list(p.throttled), "level_s": level}
                       for p, level in zip(c.points, c.levels_s)],
            "steps": [_step_dict(h, s) for s in c.steps],
            "lookback": None if c.lookback is None else {
                "runs": c.lookback.runs, "mean_s": c.lookback.mean_s, "change": c.lookback.change,
                "z": c.lookback.z, "verdict": c.lookback.verdict, "why": c.lookback.why},
        } for c in h.cases],
        "families": [{"op": f.op, "cases": f.cases, "index": [{"run": r + 1, "index": v} for r, v in f.index],
                      "steps": [_step_dict(h, s) for s in f.steps]} for f in h.families],
        "flagged": [{"case": case_id(c.case), **_step_dict(h, s)} for c, s in h.flagged],
        "newest_regressions": [case_id(c.case) for c in h.newest_regressions],
    }


def add_command(sub) -> None:
    p = sub.add_parser("history", help="which cases moved over a history of runs, where, and what changed there; "
                                       "exit 1 when the newest run has a regression",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=[".benchmarks"], metavar="PATH",
                   help="storage folders (searched recursively) or run files (default: .benchmarks)")
    p.add_argument("--by", choices=tuple(BY), default="time", help="order the runs by time (default) or by a version")
    p.add_argument("--threshold", metavar="SPEC", default=None,
                   help=f"changes that count: PCT for all (default {DEFAULT_THRESHOLD_PCT:g}%%), and KEY=PCT per op "
                        "family or per case id (globs allowed), comma-separated: gemm=3%%,attention=5%%,4%%")
    p.add_argument("--lookback", type=int, default=DEFAULT_LOOKBACK, metavar="N",
                   help=f"runs before the newest that its z-score is taken against (default {DEFAULT_LOOKBACK})")
    p.add_argument("--z", type=float, default=DEFAULT_Z, help=f"|z| beyond which the newest run stands out "
                                                               f"(default {DEFAULT_Z:g}, as Conbench)")
    p.add_argument("--json", action="store_true", help="print the histories as JSON")
    p.set_defaults(func=run_command)


def run_command(args) -> int:
    found, notes = histories(args.paths, args.by, args.threshold, args.lookback, args.z)
    if args.json:
        json.dump({"histories": [history_dict(h) for h in found], "notes": notes}, sys.stdout, indent=1)
        print()
    else:
        for h in found:
            print("\n".join(format_history(h)), end="\n\n")
        for note in notes:
            print(f"note: {note}")
    return int(any(h.newest_regressions for h in found))


def add_report_options(p) -> None:
    """`opbench report RUN --history PATH`: the trends of RUN's card over the runs at PATH."""
    p.add_argument("--history", action="append", metavar="PATH",
                   help="add the trends of the run's card over the runs in this storage folder or file (repeatable); "
                        "the run itself is the newest unless the history holds later ones")
    p.add_argument("--history-by", choices=tuple(BY), default="time", help="order of the history's runs")
    p.add_argument("--history-threshold", metavar="SPEC", help="the history's thresholds, as in `opbench history`")


def report_history(run: Run, args) -> History | None:
    """The history of `run`'s card among the runs at --history, the run included; None without --history."""
    if not getattr(args, "history", None):
        return None
    runs, _ = load_runs([str(run.path), *args.history])
    mine = [r for r in runs if card(r) == card(run)]
    ops = {m.op for r in mine for m in r.measurements}
    return build_history(mine, args.history_by, Thresholds.parse(args.history_threshold, ops))
