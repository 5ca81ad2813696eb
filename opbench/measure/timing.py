"""Clocks, rounds and the stopping rule: how one case's samples (seconds per call) are taken.

The suite times on its own clock and hands pytest-benchmark the samples (bench_adapter), so every
statistic in the JSON is this module's measurement:

- CUDA: each round is a CUDA-graph replay of `unroll` calls (or, where a call cannot be captured,
  the same calls launched one by one, labelled `cuda-event`), between two CUDA events. A spin
  kernel is queued before the start event, long enough for the host to queue what follows, so the
  GPU is still busy when the replay is launched and no host gap falls inside the interval. The
  capture runs on the stream the case prepared its inputs on (measure_stream), so a backward is
  captured with its forward's streams. L2 modes: `rotate` (default) cycles through copies of the
  inputs whose working set exceeds twice the L2, as a model whose every layer has its own weights;
  `warm` replays the same buffers; `flush` reads a buffer of twice the L2 before each call (a read
  leaves no dirty lines for the timed call to write back), the start event queued right behind it.
- CPU: each round is `unroll` calls between two time.perf_counter readings; the machine's load is
  recorded and a busy one flagged.

Rounds go on until the median's 95% confidence half-width is within the target (0.5%, after
nvbench's relative-noise rule), or the case's time budget is spent. What a case spends before its
first timed round (compilation, autotuning, the gate, input copies, capture) is its `setup_s`,
the rounds and the energy window its `timing_s`.
"""

from __future__ import annotations

import contextlib
import math
import statistics
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
SPIN_S = 50e-6  # shortest spin before a timed round: several times a graph launch's host cost
MAX_SPIN_S = 10e-3  # longest: an eager round whose launches take longer has host gaps inside it
HOST_TIME_S = 0.05  # eager calls timed for host_s, at most about this long
ENERGY_WINDOW_S = 1.0  # NVML's energy counter moves in steps of milliseconds: read it over a second
ENERGY_EXTENSIONS = 8  # a window that falls short is extended at most this many times
ENERGY_SCOPE = "whole board (NVML total energy counter): idle, memory and fan power included"
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
    setup_s: float | None = None  # from the case's start to its first timed round
    timing_s: float | None = None  # the timed rounds and the energy window


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


def measure(calls: Sequence[Callable[[], Any]], settings: RunSettings, *, footprint_bytes: int = 0,
            started: float | None = None) -> Samples:
    """Time a case. `calls` run the same work on distinct copies of its inputs (one copy unless the
    L2 mode rotates); footprint_bytes is what one call touches; `started` is the time.perf_counter
    reading at the case's start (default: now), from which its setup time is counted."""
    started = time.perf_counter() if started is None else started
    if settings.device == "cuda":
        return _measure_cuda(list(calls), settings, footprint_bytes, started)
    return _measure_cpu(list(calls), settings, footprint_bytes, started)


# CPU -------------------------------------------------------------------------------------------------

def _measure_cpu(calls: list, settings: RunSettings, footprint_bytes: int, started: float) -> Samples:
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

    rounds_start = time.perf_counter()
    with HostWatch() as watch:
        samples = take_rounds(one_round, settings.budget_s, settings.min_rounds, settings.ci_target)
    return Samples(samples, "cpu", unroll, settings.l2, footprint_bytes * len(calls) or None, host=watch.load,
                   setup_s=rounds_start - started, timing_s=time.perf_counter() - rounds_start)


# CUDA ------------------------------------------------------------------------------------------------

def torch_cuda():
    """torch.cuda, looked up at each use so that tests can stand a fake in for it."""
    import torch

    return torch.cuda


@contextlib.contextmanager
def measure_stream(device: str) -> Iterator[None]:
    """Where a case prepares its inputs, runs its gate and is captured: one side stream on CUDA, so
    that an autograd backward sees its forward on the stream it is captured on. On the way out,
    error or not, the stream in use before is current again."""
    if device != "cuda":
        yield
        return
    cuda = torch_cuda()
    previous = cuda.current_stream()
    stream = cuda.Stream()
    stream.wait_stream(previous)
    try:
        with cuda.stream(stream):
            yield
    finally:
        cuda.set_stream(previous)
        with contextlib.suppress(RuntimeError):  # a failed capture may have left the stream in error
            previous.wait_stream(stream)


def graph_replay(calls: list, unroll: int, capture_error_mode: str = "global") -> Callable[[], None]:
    """Capture `unroll` calls, cycling through `calls`, in one CUDA graph; returns its replay.

    The capture runs on the current stream: the one the case prepared its inputs and ran its forward
    on (measure_stream), since autograd runs a backward kernel on its forward's stream and only the
    capturing stream's work is captured. Error or not, the stream current before is current again:
    when a capture fails, torch.cuda.graph raises from its exit before restoring the stream."""
    cuda = torch_cuda()
    previous = cuda.current_stream()
    stream = previous
    if stream == cuda.default_stream():  # the legacy default stream cannot be captured
        stream = cuda.Stream()
        stream.wait_stream(previous)
    graph = cuda.CUDAGraph()
    try:
        with cuda.graph(graph, stream=stream, capture_error_mode=capture_error_mode):
            for i in range(unroll):
                calls[i % len(calls)]()
    finally:
        cuda.set_stream(previous)
    return graph.replay


def timed_launch(calls: list, unroll: int, capture_error_mode: str = "global") -> tuple[Callable[[], None], str]:
    """(the timed work of one round, its timer): a CUDA graph of `unroll` calls, or where they cannot
    be captured (a host sync, an allocation the graph pool refuses) the same calls launched one by one."""
    try:
        return graph_replay(calls, unroll, capture_error_mode), "cuda-graph"
    except RuntimeError:  # torch's CUDA errors (AcceleratorError, OutOfMemoryError) are RuntimeErrors
        torch_cuda().synchronize()

        def launch() -> None:
            for i in range(unroll):
                calls[i % len(calls)]()
        return launch, "cuda-event"


def spin_s(launch_host_s: float) -> float:
    """How long the GPU spins before the start event: twice what the host takes to issue the timed
    work, so the start event is reached only once that work is queued behind it."""
    return min(MAX_SPIN_S, max(SPIN_S, 2 * launch_host_s))


def spinner(launch_host_s: float) -> Callable[[], None]:
    """The spin kernel (torch.cuda._sleep) sized for work whose launch takes launch_host_s."""
    cuda = torch_cuda()
    rate_khz = getattr(cuda.get_device_properties(cuda.current_device()), "clock_rate", 0) or 2_000_000
    cycles = int(spin_s(launch_host_s) * rate_khz * 1e3)
    return lambda: cuda._sleep(cycles)


def host_launch_s(launch: Callable[[], None], tries: int = 2) -> float:
    """Host time to issue `launch` on an idle GPU, nothing waited for: the best of a few tries (the
    first replay of a graph also uploads it)."""
    cuda = torch_cuda()
    best = math.inf
    for _ in range(tries):
        cuda.synchronize()
        t0 = time.perf_counter()
        launch()
        best = min(best, time.perf_counter() - t0)
    cuda.synchronize()
    return best


def event_round(launch: Callable[[], None], calls_per_round: int, before: Callable[[], None]) -> Callable[[], float]:
    """A round: `before` (the spin, and the flush in flush mode), then the start event, the launch,
    the end event; returns device seconds per call between the events."""
    cuda = torch_cuda()
    start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)

    def one_round() -> float:
        before()
        start.record()
        launch()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / calls_per_round
    return one_round


def host_time(calls: list, n: int = 20) -> float:
    """Eager wall time per call, launches included: what an eager framework pays."""
    cuda = torch_cuda()
    cuda.synchronize()
    start = time.perf_counter()
    for i in range(n):
        calls[i % len(calls)]()
    cuda.synchronize()
    return (time.perf_counter() - start) / n


def _warm_up(calls: list) -> float:
    """Each copy once (lazy initialisation, compilation and autotuning happen here, untimed); returns
    the wall time per call."""
    cuda = torch_cuda()
    cuda.synchronize()
    start = time.perf_counter()
    for fn in calls:
        fn()
    cuda.synchronize()
    return (time.perf_counter() - start) / len(calls)


def host_calls(call_wall_s: float) -> int:
    """Calls host_time makes: 20, fewer for calls so long that 20 would outlast HOST_TIME_S."""
    return max(1, min(20, int(HOST_TIME_S / max(call_wall_s, 1e-9))))


def l2_bytes() -> int:
    cuda = torch_cuda()
    return getattr(cuda.get_device_properties(cuda.current_device()), "L2_cache_size", 0) or 64 * 2**20


class L2Flush:
    """Evicts the L2 by reading (not writing) a buffer twice its size: the lines the last call left
    dirty are written back during the flush, and the flush leaves none but its one scalar output's."""

    def __init__(self, cache_bytes: int, device: str = "cuda"):
        import torch

        self.buf = torch.ones(2 * cache_bytes // 4, dtype=torch.float32, device=device)
        self.out = torch.empty((), dtype=torch.float32, device=device)

    def __call__(self) -> None:
        import torch

        torch.sum(self.buf, dim=0, out=self.out)


def l2_flusher() -> Callable[[], None]:
    return L2Flush(l2_bytes())


def _probe_call_s(calls: list, host_s: float) -> float:
    """Device seconds per call of a few calls launched one by one behind a spin: what sets the calls
    per replay. One call is enough where a call outlasts a replay's target."""
    n = 1 if host_s >= REPLAY_TARGET_S else 3

    def launch() -> None:
        for i in range(n):
            calls[i % len(calls)]()
    probe = event_round(launch, n, spinner(n * host_s))
    return min(probe() for _ in range(2))


def _before_round(launch: Callable[[], None], flush: bool) -> Callable[[], None]:
    """What precedes the start event: the spin, and in flush mode the L2 flush after it (the spin
    then also covers the flush's launch)."""
    if not flush:
        return spinner(host_launch_s(launch))
    flush_l2 = l2_flusher()
    spin = spinner(host_launch_s(lambda: (flush_l2(), launch())))

    def spin_then_flush() -> None:
        spin()
        flush_l2()
    return spin_then_flush


def _measure_cuda(calls: list, settings: RunSettings, footprint_bytes: int, started: float) -> Samples:
    host_s = host_time(calls, host_calls(_warm_up(calls)))
    flush = settings.l2 == "flush"
    unroll = 1 if flush else unroll_for(_probe_call_s(calls, host_s), len(calls))
    launch, timer = timed_launch(calls, unroll)
    one_round = event_round(launch, unroll, _before_round(launch, flush))  # its launches warm the graph
    rounds_start = time.perf_counter()
    with gpu_watch() as watch:
        samples = take_rounds(one_round, settings.budget_s, settings.min_rounds, settings.ci_target)
    energy = None
    if settings.energy:  # flush mode replays without its flushes here: their joules are not the call's
        energy = energy_per_call(launch, unroll, statistics.median(samples) * unroll)
    working_set = footprint_bytes * len(calls) if footprint_bytes else None
    return Samples(samples, timer, unroll, settings.l2, working_set, host_s, watch.state, None, energy,
                   setup_s=rounds_start - started, timing_s=time.perf_counter() - rounds_start)


def energy_per_call(launch: Callable[[], None], calls: int, replay_s: float, *,
                    meter: Callable[[], float] | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> Energy | None:
    """Joules per call from NVML's energy counter around back-to-back replays lasting at least
    ENERGY_WINDOW_S by the wall clock.

    The replays are sized from the replay's measured device time (replay_s); where the window still
    falls short (the rounds' median overstated the replay, as after a clock boost), more replays
    extend it, sized from the pace of the first ones, so the counter's millisecond steps stay small
    against the window."""
    meter = meter or energy_meter()
    if meter is None:
        return None
    cuda = torch_cuda()
    replays = max(1, math.ceil(ENERGY_WINDOW_S / max(replay_s, 1e-9)))
    done = 0
    cuda.synchronize()
    start_j, start_s = meter(), clock()
    for _ in range(1 + ENERGY_EXTENSIONS):
        for _ in range(replays):
            launch()
        done += replays
        cuda.synchronize()
        window_s = clock() - start_s
        if window_s >= ENERGY_WINDOW_S or window_s <= 0:  # done, or a clock that cannot pace an extension
            break
        pace_s = window_s / done
        replays = min(10 * done, max(1, math.ceil(1.1 * (ENERGY_WINDOW_S - window_s) / pace_s)))
    return Energy((meter() - start_j) / (done * calls), window_s, ENERGY_SCOPE)
