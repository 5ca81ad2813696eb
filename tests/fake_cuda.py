"""A stand-in for torch.cuda, for testing the CUDA timing paths on a machine without a GPU.

It keeps one log of what the host issued, in order (streams, captures, spins, events, calls,
replays), and a device timeline: each piece of work adds its device time, and an event's elapsed
time is the work queued between its two records, as on a GPU whose host never falls behind.
"""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

CLOCK_KHZ = 1_000_000  # a 1 GHz SM clock: a spin of n cycles lasts n ns


class FakeStream:
    def __init__(self, cuda: FakeCuda, name: str):
        self.cuda, self.name = cuda, name

    def wait_stream(self, other: FakeStream) -> None:
        self.cuda.log.append(("wait", self.name, other.name))

    def synchronize(self) -> None:
        self.cuda.log.append(("sync", self.name))

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeEvent:
    def __init__(self, cuda: FakeCuda):
        self.cuda, self.position = cuda, None

    def record(self, stream: FakeStream | None = None) -> None:
        self.position = len(self.cuda.timeline)
        self.cuda.log.append(("record", id(self), self.cuda.current.name))

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeEvent) -> float:
        return sum(ms for _, ms in self.cuda.timeline[self.position:end.position])


class FakeGraph:
    def __init__(self, cuda: FakeCuda):
        self.cuda, self.captured, self.stream = cuda, [], None

    def replay(self) -> None:
        self.cuda.log.append(("replay", self.cuda.current.name))
        if self.cuda.replay_host_s:
            time.sleep(self.cuda.replay_host_s)
        self.cuda.timeline.append(("replay", sum(ms for _, ms in self.captured)))


class FakeCapture:
    """torch.cuda.graph: the capture stream is current inside; a capture that fails raises from the
    exit before the previous stream is restored, as torch's does (capture_end, then the stream)."""

    def __init__(self, cuda: FakeCuda, graph: FakeGraph, stream: FakeStream | None, capture_error_mode: str):
        self.cuda, self.graph, self.mode = cuda, graph, capture_error_mode
        self.stream = stream or cuda.Stream()

    def __enter__(self) -> None:
        self.previous = self.cuda.current
        self.cuda.current = self.graph.stream = self.stream
        self.cuda.capturing = self.graph
        self.cuda.log.append(("capture_begin", self.stream.name, self.mode))

    def __exit__(self, exc_type, *exc) -> None:
        self.cuda.capturing = None
        if exc_type is not None or self.cuda.fail_capture_end:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.cuda.log.append(("capture_end", self.stream.name))
        self.cuda.current = self.previous


class FakeCuda:
    def __init__(self, l2_bytes: int = 50 * 2**20):
        self.log: list[tuple] = []
        self.timeline: list[tuple[str, float]] = []
        self.default = FakeStream(self, "default")
        self.current = self.default
        self.capturing: FakeGraph | None = None
        self.fail_capture_end = False
        self.replay_host_s = 0.0
        self.props = SimpleNamespace(clock_rate=CLOCK_KHZ, L2_cache_size=l2_bytes)
        self._streams = 0

    # streams
    def Stream(self) -> FakeStream:
        self._streams += 1
        return FakeStream(self, f"side{self._streams}")

    def current_stream(self) -> FakeStream:
        return self.current

    def default_stream(self) -> FakeStream:
        return self.default

    def set_stream(self, stream: FakeStream) -> None:
        self.current = stream

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    # graphs, events, kernels
    def CUDAGraph(self) -> FakeGraph:
        return FakeGraph(self)

    def graph(self, graph: FakeGraph, stream: FakeStream | None = None, capture_error_mode: str = "global"):
        return FakeCapture(self, graph, stream, capture_error_mode)

    def Event(self, enable_timing: bool = False) -> FakeEvent:
        return FakeEvent(self)

    def synchronize(self) -> None:
        self.log.append(("sync",))

    def _sleep(self, cycles: int) -> None:
        self.log.append(("spin", cycles, self.current.name))
        self.timeline.append(("spin", cycles / CLOCK_KHZ))  # cycles at 1 GHz, in ms

    def get_device_properties(self, index: int):
        return self.props

    def current_device(self) -> int:
        return 0

    # what the tests read
    def kernel(self, name: str, ms: float) -> None:
        """A kernel of `ms` device milliseconds issued by the host: captured, or run."""
        if self.capturing is not None:
            self.capturing.captured.append((name, ms))
            self.log.append(("captured", name, self.current.name))
        else:
            self.timeline.append((name, ms))
            self.log.append(("call", name, self.current.name))

    def call(self, name: str, ms: float = 0.01):
        return lambda: self.kernel(name, ms)

    def kinds(self) -> list[str]:
        return [entry[0] for entry in self.log]
