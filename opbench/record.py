"""The case record: what one measured case is, written by the runner into pytest-benchmark's
extra_info and read back by load_run into the same types.

One small family, tagged by `kind`: an op case (`op`), a collective (`collective`), a peak of the
card (`peak`) and a unit timed whole (`unit`: a decoder layer or a small model). Nothing reads raw
extra_info keys: `to_info` writes a record, `from_info` reads one, and a dict without a known kind
is refused, never guessed from the keys it happens to have.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any, ClassVar

RECORD_VERSION = 2  # extra_info["record"]: bumped when a field changes meaning


class RecordError(ValueError):
    """An extra_info that is not a record of this version of opbench."""


@dataclass(frozen=True)
class Gate:
    """The correctness gate's verdict: relative error (Frobenius norm) of the worst output."""
    rel_err: float
    tol: float
    worst_output: int = 0  # which output was worst, for ops with several (dq, dk, dv)
    worst_rank: int | None = None  # collectives: the rank whose output was worst
    passed: bool = dataclasses.field(default=False, compare=False)  # derived: written for a reader of the JSON

    def __post_init__(self) -> None:
        object.__setattr__(self, "passed", self.rel_err <= self.tol)  # NaN fails


@dataclass(frozen=True)
class Stability:
    """The rounds' statistics (seconds per call) and how far the median can be trusted."""
    rounds: int
    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    max_s: float
    cv: float  # standard deviation over mean
    iqr_rel: float  # (q3 - q1) / median
    ci_rel: float | None  # half-width of the median's 95% confidence interval, over it; None: too few rounds
    outliers: int  # rounds beyond 1.5 IQR of the quartiles
    stable: bool  # ci_rel within the run's stability limit

    @classmethod
    def of(cls, samples_s: list[float], stable_ci_rel: float) -> Stability:
        xs = sorted(samples_s)
        n = len(xs)
        median = statistics.median(xs)
        q1, q3 = (statistics.quantiles(xs, n=4, method="inclusive")[::2] if n > 1 else (xs[0], xs[0]))
        mean = statistics.fmean(xs)
        cv = statistics.stdev(xs) / mean if n > 1 and mean > 0 else 0.0
        ci = median_ci_rel(xs)  # inf below 6 rounds: written as None, JSON has no infinity
        fence = 1.5 * (q3 - q1)
        outliers = sum(1 for x in xs if x < q1 - fence or x > q3 + fence)
        return cls(n, median, q1, q3, xs[0], xs[-1], cv, (q3 - q1) / median if median > 0 else 0.0,
                   ci if math.isfinite(ci) else None, outliers, ci <= stable_ci_rel)


def median_ci_rel(sorted_s: list[float]) -> float:
    """Half-width of a distribution-free 95% confidence interval of the median, over the median: the
    order statistics x(j) and x(n + 1 - j) (1-based) with j = round(n/2 - 0.98 sqrt(n)), the normal
    approximation of the binomial tables (n = 10: x(2)..x(9); n = 20: x(6)..x(15); n = 100:
    x(40)..x(61)), never below 95% coverage; inf with fewer than 6 samples, where no interval reaches 95%."""
    n = len(sorted_s)
    if n < 6:
        return float("inf")
    j = max(1, round(n / 2 - 0.98 * n ** 0.5))
    lo, hi = j - 1, n - j  # 0-based
    median = statistics.median(sorted_s)
    return (sorted_s[hi] - sorted_s[lo]) / 2 / median if median > 0 else float("inf")


@dataclass(frozen=True)
class GpuState:
    """What NVML said of the card while the rounds ran."""
    sm_clock_mhz: float | None  # mean of the samples taken during the rounds
    power_w: float | None  # mean
    temperature_c: float | None  # highest
    samples: int
    power_violation_s: float | None  # time the card spent held back by its power limit during the rounds
    thermal_violation_s: float | None
    throttled: tuple[str, ...] = ()  # slowdown reasons seen: sw_power_cap, hw_slowdown, sw_thermal, ...


@dataclass(frozen=True)
class HostLoad:
    """The CPU's state around a CPU case: a busy machine makes CPU timings unreliable."""
    load_per_core: float  # 1-minute load average over the cores
    steal: float  # share of CPU time the hypervisor took during the rounds
    busy: bool


@dataclass(frozen=True)
class Energy:
    """NVML's energy counter over a window of back-to-back replays."""
    j_per_call: float
    window_s: float  # wall time of the window, at least a second
    scope: str = "whole board, idle power included"  # what the counter covers


@dataclass(frozen=True)
class Bound:
    """A case's share of the roofline ceiling that bounds it (analyze.roofline)."""
    share: float  # achieved rate / attainable rate, from the median
    limit: str  # "compute" or "memory"
    attainable_tflops: float
    source: str


_NESTED = {"correct": Gate, "stability": Stability, "gpu": GpuState, "host": HostLoad, "energy": Energy,
           "roofline": Bound}


@dataclass(frozen=True, kw_only=True)
class Record:
    """What every kind shares: its dtype and pass, and how it was timed (None until it was)."""
    kind: ClassVar[str] = ""
    dtype: str
    pass_: str = "fwd"
    timer: str | None = None  # "cuda-graph", "cuda-event" or "cpu"
    unroll: int = 1  # calls per timed replay (CUDA graph) or per round (CPU)
    l2: str | None = None  # "rotate", "warm" or "flush": what the cache held when a call began
    working_set_bytes: int | None = None  # bytes the timed calls cycle through (rotate: all copies)
    host_s: float | None = None  # eager wall time per call, launches included (GPU; None on CPU)
    median_s: float | None = None  # per call; None when pytest-benchmark is disabled
    stability: Stability | None = None
    gpu: GpuState | None = None
    host: HostLoad | None = None
    energy: Energy | None = None
    correct: Gate | None = None
    setup_s: float | None = None  # case start to first timed round: gate, compile, autotune, copies, capture
    timing_s: float | None = None  # the timed rounds and the energy window

    def to_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "record": RECORD_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            info["pass" if f.name == "pass_" else f.name] = (
                dataclasses.asdict(value) if dataclasses.is_dataclass(value) else
                list(value) if isinstance(value, tuple) else value)
        info.update(self.extra())
        return info

    def extra(self) -> dict[str, Any]:
        """Derived figures written beside the fields for a reader of the JSON (not read back)."""
        return {}

    @property
    def timed(self) -> bool:
        return self.median_s is not None

    @property
    def throttled(self) -> tuple[str, ...]:
        """The card's slowdowns (power, thermal) seen while the rounds ran."""
        return self.gpu.throttled if self.gpu else ()


@dataclass(frozen=True, kw_only=True)
class OpCase(Record):
    """One op family at one shape, dtype, pass and backend."""
    kind: ClassVar[str] = "op"
    op: str
    backend: str
    shape: dict[str, int]
    roles: tuple[str, ...] = ()  # "model/phase/role" of every plan call this case serves
    flops: int = 0  # one call
    bytes: int = 0  # one call
    impl: str = ""  # what actually ran
    roofline: Bound | None = None  # added when the JSON is written

    @property
    def key(self) -> tuple:
        """Identity across runs: op, shape, dtype, backend, pass."""
        return (self.op, tuple(sorted(self.shape.items())), self.dtype, self.backend, self.pass_)

    @property
    def tflops(self) -> float | None:
        return self.flops / self.median_s / 1e12 if self.median_s else None

    @property
    def gbps(self) -> float | None:
        return self.bytes / self.median_s / 1e9 if self.median_s else None

    def extra(self) -> dict[str, Any]:
        return {"tflops": self.tflops, "gbps": self.gbps}


@dataclass(frozen=True, kw_only=True)
class CollectiveCase(OpCase):
    """A collective among `world` ranks; times are the slowest rank's, bandwidths as nccl-tests has them."""
    kind: ClassVar[str] = "collective"
    world: int
    busbw_factor: float
    rank_median_s: tuple[float, ...] = ()  # each rank's own median
    graph: bool = False  # timed as CUDA-graph replays of the collective (no dispatch cost per call)

    @property
    def key(self) -> tuple:
        """An op case's identity, marked where the collective was timed as CUDA-graph replays: a
        message's plain and graph timings are two cases."""
        return super().key + (("graph",) if self.graph else ())

    @property
    def algbw_gbps(self) -> float | None:
        return self.gbps

    @property
    def busbw_gbps(self) -> float | None:
        return self.gbps * self.busbw_factor if self.gbps is not None else None

    @property
    def slowest_rank(self) -> int | None:
        return self.rank_median_s.index(max(self.rank_median_s)) if self.rank_median_s else None

    @property
    def rank_spread(self) -> float | None:
        """Slowest over fastest rank's median, minus one."""
        if not self.rank_median_s or min(self.rank_median_s) <= 0:
            return None
        return max(self.rank_median_s) / min(self.rank_median_s) - 1

    def extra(self) -> dict[str, Any]:
        return {**super().extra(), "algbw_gbps": self.algbw_gbps, "busbw_gbps": self.busbw_gbps,
                "slowest_rank": self.slowest_rank, "rank_spread": self.rank_spread}


@dataclass(frozen=True, kw_only=True)
class PeakCase(OpCase):
    """A ceiling of the card: `metric` is matmul_tflops, copy_gbps, h2d_gbps, d2h_gbps or launch_s."""
    kind: ClassVar[str] = "peak"
    metric: str


@dataclass(frozen=True, kw_only=True)
class UnitCase(Record):
    """A decoder layer or a whole small model timed as one, against which composition is checked."""
    kind: ClassVar[str] = "unit"
    unit: str  # "layer" or "model"
    plan: str  # the plan's name: model/workload/dtype


KINDS: dict[str, type[Record]] = {k.kind: k for k in (OpCase, CollectiveCase, PeakCase, UnitCase)}


def from_info(info: dict) -> Record:
    """The record an extra_info holds; RecordError for anything else."""
    if not isinstance(info, dict) or info.get("kind") not in KINDS:
        what = f"kind {info.get('kind')!r}" if isinstance(info, dict) and "kind" in info else "no record kind"
        raise RecordError(f"{what} (known: {', '.join(KINDS)})")
    if info.get("record") != RECORD_VERSION:
        raise RecordError(f"record version {info.get('record')!r}, this opbench reads version {RECORD_VERSION}")
    cls = KINDS[info["kind"]]
    values = {}
    for f in dataclasses.fields(cls):
        name = "pass" if f.name == "pass_" else f.name
        if name not in info:
            continue
        value = info[name]
        if f.name in _NESTED and value is not None:
            value = _nested(_NESTED[f.name], value)
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    try:
        return cls(**values)
    except TypeError as error:  # a required field is missing
        raise RecordError(f"{info['kind']} record: {error}") from None


def _nested(cls: type, value: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items() if k in names})
