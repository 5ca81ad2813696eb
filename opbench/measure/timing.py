"""Clocks, rounds and the stopping rule: how one case's samples (seconds per call) are taken.

The suite times on its own clock and hands pytest-benchmark the samples (bench_adapter), so every
statistic in the JSON is this module's measurement:

- CUDA: each round is a CUDA-graph replay of `unroll` calls (or, where a call cannot be captured,
  the same calls launched eagerly), between two CUDA events. The start event is queued behind a
  short spin kernel, so the GPU is still busy when the host launches the replay and no host gap
  falls inside the interval. L2 modes: `rotate` (default) cycles through copies of the inputs whose
  working set exceeds twice the L2, as a model whose every layer has its own weights; `warm`
  replays the same buffers; `flush` reads a buffer of twice the L2 before each call (a read leaves
  no dirty lines for the timed call to write back), the call's start event queued right behind it.
- CPU: each round is `unroll` calls between two time.perf_counter readings; the machine's load is
  recorded and a busy one flagged.

Rounds go on until the median's 95% confidence half-width is within the target (0.5%, after
nvbench's relative-noise rule), or the case's time budget is spent.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from opbench.measure.hardware import HostWatch, energy_meter, gpu_watch
from opbench.record import Energy, GpuState, HostLoad, median_ci_rel

REPLAY_TARGET_S = 1e-3  # a graph replay (or a CPU round) lasts at least this long...
MAX_UNROLL = 64  # ...unless that would need more calls than this in one replay
MAX_COPIES = 256  # input copies a rotation cycles through, at most
MAX_ROUNDS = 10_000
CI_TARGET = 0.005  # stop once the median's 95% confidence half-width is within 0.5% of it
STABLE_CI = 0.01  # a case whose half-width ends above 1% is marked unstable
SPIN_S = 50e-6  # spin kernel before each timed replay: longer than the host's launch latency
ENERGY_WINDOW_S = 1.0  # NVML's energy counter moves in steps of milliseconds: read it over a second
L2_MODES = ("rotate", "warm", "flush")


@dataclass(frozen=True)
class RunSettings:
    device: str  # "cuda" or "cpu"
    budget_s: float  # time spent timing one case, beyond its warm-up and gate
    min_rounds: int
    l2: str = "rotate"  # rotate | warm | flush (CPU runs: warm, or rotate)
    energy: bool = False  # read NVML's energy counter over a window of ENERGY_WINDOW_S per case
    ci_target: float = CI_TARGET
    stable_ci: float = STABLE_CI

    def for_units(self) -> RunSettings:
        """Units (a layer, a model) take longer per call and vary more: ten times the budget."""
        return replace(self, budget_s=max(10 * self.budget_s, 0.5), min_rounds=max(self.min_rounds, 10))


@dataclass(frozen=True)
class Samples:
    """What measuring one case gave: per-call seconds of each round, and how they were taken."""
    per_call_s: list[float]
    timer: str  # cuda-graph | cuda-event | cpu
    unroll: int
    l2: str
    working_set_bytes: int | None = None
    host_s: float | None = None  # eager wall time per call with launches (GPU only)
    gpu: GpuState | None = None
    host: HostLoad | None = None
    energy: Energy | None = None


def calls_for(call_s: float) -> int:
    """Calls per timed replay (or CPU round) so that one lasts about REPLAY_TARGET_S."""
    if call_s <= 0 or not math.isfinite(call_s):
        return MAX_UNROLL
    return max(1, min(MAX_UNROLL, math.ceil(REPLAY_TARGET_S / call_s)))


def unroll_for(call_s: float, copies: int) -> int:
    """Calls per timed replay (or CPU round) cycling through `copies` input copies: about
    REPLAY_TARGET_S, and a whole number of passes over the copies, so that a replay ends with the
    last copy and the next one starts with the first: no copy runs twice in a row with its data
    still in the cache, and every copy runs as often as the others."""
    copies = max(1, copies)
    unroll = min(max(calls_for(call_s), copies), max(MAX_UNROLL, copies))
    return unroll // copies * copies


def copies_for(footprint_bytes: int, cache_bytes: int, l2: str) -> int:
    """Input copies a call must cycle through so that the working set exceeds twice the cache."""
    if l2 != "rotate" or footprint_bytes <= 0 or cache_bytes <= 0:
        return 1
    return max(1, min(MAX_COPIES, math.ceil(2 * cache_bytes / footprint_bytes)))


def take_rounds(one_round: Callable[[], float], budget_s: float, min_rounds: int, ci_target: float,
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Rounds until the median is known within ci_target (checked as rounds double), the budget is
    spent, or MAX_ROUNDS; at least min_rounds."""
    samples: list[float] = []
    start = clock()
    check_at = max(min_rounds, 10)
    while len(samples) < MAX_ROUNDS:
        samples.append(one_round())
        n = len(samples)
        if n < min_rounds:
            continue
        if clock() - start >= budget_s:
            break
        if n >= check_at:
            if median_ci_rel(sorted(samples)) <= ci_target:
                break
            check_at = n + max(1, n // 4)  # sorting is O(n log n): check a quarter further on
    return samples


def measure(calls: Sequence[Callable[[], Any]], settings: RunSettings, *, footprint_bytes: int = 0) -> Samples:
    """Time a case. `calls` run the same work on distinct copies of its inputs (one copy unless the
    L2 mode rotates); footprint_bytes is what one call touches."""
    if settings.device == "cuda":
        return _measure_cuda(list(calls), settings, footprint_bytes)
    return _measure_cpu(list(calls), settings, footprint_bytes)


# CPU -------------------------------------------------------------------------------------------------

def _measure_cpu(calls: list, settings: RunSettings, footprint_bytes: int) -> Samples:
    for fn in calls:
        fn()
    start = time.perf_counter()
    for i in range(3):
        calls[i % len(calls)]()
    unroll = unroll_for((time.perf_counter() - start) / 3, len(calls))

    def one_round() -> float:
        t0 = time.perf_counter()
        for i in range(unroll):
            calls[i % len(calls)]()
        return (time.perf_counter() - t0) / unroll

    with HostWatch() as watch:
        samples = take_rounds(one_round, settings.budget_s, settings.min_rounds, settings.ci_target)
    return Samples(samples, "cpu", unroll, settings.l2, footprint_bytes * len(calls) or None, host=watch.load)


# CUDA ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def measure_stream(device: str) -> Iterator[None]:
    """Where a case prepares its inputs, runs its gate and is captured: one side stream on CUDA, so
    that an autograd backward sees its forward on the stream it is captured on. On the way out,
    error or not, the stream in use before is current again."""
    if device != "cuda":
        yield
        return
    import torch

    previous = torch.cuda.current_stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(previous)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        torch.cuda.set_stream(previous)
        with contextlib.suppress(RuntimeError):  # a failed capture may have left the stream in error
            previous.wait_stream(stream)


def graph_replay(calls: list, unroll: int) -> Callable[[], None]:
    """Capture `unroll` calls, cycling through `calls`, in one CUDA graph on the current stream."""
    import torch

    stream = torch.cuda.current_stream()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            for i in range(unroll):
                calls[i % len(calls)]()
    finally:
        torch.cuda.set_stream(stream)  # torch.cuda.graph switches streams; a failed capture must not leave us there
    stream.synchronize()
    return graph.replay


def _spin_cycles() -> int:
    import torch

    rate_khz = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "clock_rate", 0) or 2_000_000
    return int(SPIN_S * rate_khz * 1e3)


def _event_round(launch: Callable[[], None], calls_per_round: int, before: Callable[[], None]) -> Callable[[], float]:
    """A round: `before` (the spin, or the L2 flush), then start event, launch, end event."""
    import torch

    def one_round() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before()
        start.record()
        launch()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / calls_per_round
    return one_round


def host_time(calls: list, n: int = 20) -> float:
    """Eager wall time per call, launches included: what an eager framework pays."""
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(n):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def l2_bytes() -> int:
    import torch

    return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 64 * 2**20


def l2_flusher() -> Callable[[], None]:
    """Evicts the L2 by reading (not writing) a buffer twice its size: no dirty line is left for the
    timed call to write back."""
    import torch

    buf = torch.ones(2 * l2_bytes() // 4, dtype=torch.float32, device="cuda")
    out = torch.empty((), dtype=torch.float32, device="cuda")
    return lambda: torch.sum(buf, out=out)


def _measure_cuda(calls: list, settings: RunSettings, footprint_bytes: int) -> Samples:
    import torch

    for fn in calls:
        fn()
    host_s = host_time(calls)  # also the warm-up
    probe = _event_round(lambda: [calls[i % len(calls)]() for i in range(3)], 3, lambda: None)
    call_s = min(probe() for _ in range(3))
    spin_cycles = _spin_cycles()

    def spin() -> None:
        torch.cuda._sleep(spin_cycles)

    if settings.l2 == "flush":
        flush = l2_flusher()
        timer, unroll, launch, before = "cuda-event", 1, calls[0], flush
    else:
        unroll = unroll_for(call_s, len(calls))
        try:
            launch, timer = graph_replay(calls, unroll), "cuda-graph"
        except RuntimeError:  # not capturable (host syncs, dynamic allocation): time plain launches
            torch.cuda.synchronize()

            def launch() -> None:
                for i in range(unroll):
                    calls[i % len(calls)]()
            timer = "cuda-event"
        before = spin
    one_round = _event_round(launch, unroll, before)
    one_round()  # a replay to warm the graph
    with gpu_watch() as watch:
        samples = take_rounds(one_round, settings.budget_s, settings.min_rounds, settings.ci_target)
    energy = None
    if settings.energy:
        energy = energy_per_call(launch, unroll, sorted(samples)[len(samples) // 2] * unroll)
    working_set = footprint_bytes * min(len(calls), unroll) if footprint_bytes else None
    return Samples(samples, timer, unroll, settings.l2, working_set, host_s, watch.state, None, energy)


def energy_per_call(launch: Callable[[], None], calls: int, replay_s: float) -> Energy | None:
    """Joules per call from NVML's energy counter around back-to-back replays filling the window,
    the window sized from the replay's device time."""
    meter = energy_meter()
    if meter is None:
        return None
    import torch

    replays = max(1, math.ceil(ENERGY_WINDOW_S / max(replay_s, 1e-9)))
    torch.cuda.synchronize()
    start_j, start_s = meter(), time.perf_counter()
    for _ in range(replays):
        launch()
    torch.cuda.synchronize()
    return Energy((meter() - start_j) / (replays * calls), time.perf_counter() - start_s)


