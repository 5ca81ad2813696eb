"""Clocks, CUDA-graph replay, L2 flush, and the correctness gate.

pytest-benchmark keeps the statistics; this module decides what its clock reads and what one timed
round is. On CUDA the clock is GPU time between CUDA events, so host-side overhead does not count;
short kernels are captured several times over in a CUDA graph and replayed, so launch gaps do not
count either, and the clock divides by the number of calls in the graph so that every statistic
pytest-benchmark reports is per call. On CPU the clock is time.perf_counter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from opbench.measure.hardware import energy_meter

REPLAY_TARGET_S = 1e-3  # a graph replay (or a CPU round) lasts at least this long...
MAX_UNROLL = 64  # ...unless that would need more calls than this in one replay
MAX_ROUNDS = 10_000


@dataclass(frozen=True)
class Check:
    """The correctness gate's verdict: relative error (Frobenius norm) of the worst output."""
    rel_err: float
    tol: float
    output: int = 0  # which output was worst, for ops with several (dq, dk, dv)

    @property
    def passed(self) -> bool:
        return self.rel_err <= self.tol  # NaN fails

    def as_dict(self) -> dict:
        return {"rel_err": self.rel_err, "tol": self.tol, "passed": self.passed, "worst_output": self.output}


def check(out: Any, ref: Any, tol: float) -> Check:
    """Compare an output (or a tuple of them) with its reference, each upcast to the reference's dtype."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(outs) != len(refs):
        raise ValueError(f"{len(outs)} outputs but {len(refs)} references")
    worst = Check(0.0, tol)
    for i, (o, r) in enumerate(zip(outs, refs)):
        if tuple(o.shape) != tuple(r.shape):
            return Check(math.inf, tol, i)
        o = o.to(r.dtype)
        denom = torch.linalg.vector_norm(r).item()
        err = torch.linalg.vector_norm(o - r).item() / (denom if denom > 0 else 1.0)
        if not err <= worst.rel_err:  # keeps NaN as the worst
            worst = Check(err, tol, i)
    return worst


class CudaEventClock:
    """Seconds of GPU time, as pytest-benchmark's timer, divided by `calls_per_tick`.

    Each reading records an event and waits for it. Differences are accumulated in float64 from
    event to event, since cudaEventElapsedTime's float32 milliseconds lose precision over long spans.
    """

    def __init__(self, calls_per_tick: int = 1):
        self.scale = 1e-3 / calls_per_tick
        self.__name__ = f"cuda_event_clock(/{calls_per_tick})"
        self._last = self._record()
        self._total = 0.0

    @staticmethod
    def _record() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        return event

    def __call__(self) -> float:
        now = self._record()
        self._total += self._last.elapsed_time(now) * self.scale
        self._last = now
        return self._total


@dataclass(frozen=True)
class RunSettings:
    device: str  # "cuda" or "cpu"
    budget_s: float  # time spent timing one case, beyond its warm-up and gate
    min_rounds: int
    cold_l2: bool = False
    energy: bool = False  # read NVML's energy counter over a window of ENERGY_WINDOW_S per case


@dataclass(frozen=True)
class Timing:
    """How a case was timed; copied into extra_info."""
    timer: str  # "cuda-graph", "cuda-event" or "cpu"
    unroll: int  # calls per timed replay (CUDA graph) or per round (CPU iterations)
    rounds: int
    energy_j: float | None = None  # per call


def rounds_for(round_s: float, budget_s: float, min_rounds: int) -> int:
    """Rounds that fill the time budget, at least min_rounds."""
    if round_s <= 0 or not math.isfinite(round_s):
        return min_rounds
    return max(min_rounds, min(MAX_ROUNDS, int(budget_s / round_s)))


def calls_for(call_s: float) -> int:
    """Calls per timed replay so that one replay lasts about REPLAY_TARGET_S."""
    if call_s <= 0:
        return MAX_UNROLL
    return max(1, min(MAX_UNROLL, math.ceil(REPLAY_TARGET_S / call_s)))


def cuda_call_time(fn: Callable[[], Any], calls: int = 3) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / calls


def cpu_call_time(fn: Callable[[], Any], calls: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def graph_replay(fn: Callable[[], Any], calls: int) -> Callable[[], None]:
    """Capture `calls` back-to-back calls of fn in a CUDA graph; return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # a warm-up on a side stream, as capture requires
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    return graph.replay


def l2_flusher(device: torch.device | str = "cuda") -> Callable[[], None]:
    """A function that evicts the L2 cache by writing a buffer twice its size."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
    buf = torch.empty(2 * l2, dtype=torch.uint8, device=device)

    def flush() -> None:
        buf.zero_()
    return flush


def measure(benchmark, fn: Callable[[], Any], settings: RunSettings) -> Timing:
    """Time fn with pytest-benchmark after a warm-up; statistics come out per call."""
    if settings.device == "cuda":
        return _measure_cuda(benchmark, fn, settings)
    fn()
    call_s = cpu_call_time(fn)
    iterations = calls_for(call_s)
    rounds = rounds_for(call_s * iterations, settings.budget_s, settings.min_rounds)
    benchmark._timer = time.perf_counter
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
    return Timing("cpu", iterations, rounds)


def _measure_cuda(benchmark, fn, settings: RunSettings) -> Timing:
    for _ in range(2):
        fn()
    call_s = cuda_call_time(fn)
    budget_s, min_rounds = settings.budget_s, settings.min_rounds
    if settings.cold_l2:  # one call a round, the flush in pedantic's untimed setup
        flush = l2_flusher()
        rounds = rounds_for(call_s + cuda_call_time(flush, 1), budget_s, min_rounds)
        benchmark._timer = CudaEventClock()
        benchmark.pedantic(fn, setup=flush, rounds=rounds, warmup_rounds=1)
        return Timing("cuda-event", 1, rounds)
    calls = calls_for(call_s)
    try:
        target, timer = graph_replay(fn, calls), "cuda-graph"
    except RuntimeError:  # not capturable (host syncs, dynamic allocation): time plain launches
        torch.cuda.synchronize()

        def target():
            for _ in range(calls):
                fn()
        timer = "cuda-event"
    rounds = rounds_for(call_s * calls, budget_s, min_rounds)
    benchmark._timer = CudaEventClock(calls)
    benchmark.pedantic(target, rounds=rounds, warmup_rounds=2)
    energy = energy_per_call(target, calls, call_s) if settings.energy else None
    return Timing(timer, calls, rounds, energy)


ENERGY_WINDOW_S = 1.0  # NVML's energy counter moves in steps of milliseconds: read it over a second


def energy_per_call(target: Callable[[], Any], calls: int, call_s: float) -> float | None:
    """Joules per call from NVML's energy counter around back-to-back replays filling the window."""
    meter = energy_meter()
    if meter is None:
        return None
    replays = max(1, math.ceil(ENERGY_WINDOW_S / max(call_s * calls, 1e-9)))
    torch.cuda.synchronize()
    start = meter()
    for _ in range(replays):
        target()
    torch.cuda.synchronize()
    return (meter() - start) / (replays * calls)
