"""The CUDA timing path, on a CPU: a fake torch.cuda records what the host issues and in what order,
and times each interval as the device work queued between its two events."""

from __future__ import annotations

import statistics
import threading
from types import SimpleNamespace

import pytest
import torch

from opbench.measure import hardware, runner, timing
from opbench.measure.timing import RunSettings
from opbench.record import OpCase, from_info
from tests.fake_cuda import CLOCK_KHZ, FakeCuda


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(timing, "torch_cuda", lambda: fake)
    monkeypatch.setattr(hardware, "_nvml_device", lambda: None)  # no NVML unless a test brings one
    return fake


def warm(rounds: int = 4, **kw) -> RunSettings:
    """Exactly `rounds` rounds: a budget spent at once, min_rounds of them."""
    return RunSettings("cuda", budget_s=0.0, min_rounds=rounds, l2=kw.pop("l2", "warm"), **kw)


def timed_rounds(cuda: FakeCuda, rounds: int, per_round: int) -> list[list[str]]:
    """The last `rounds` rounds of the log, each as its list of entry kinds (leaving measure_stream's
    final wait for its side stream aside)."""
    tail = [k for k in cuda.kinds() if k != "wait"][-rounds * per_round:]
    return [tail[i:i + per_round] for i in range(0, len(tail), per_round)]


# Order of a round: spin, start event, replay, end event (no host gap, no spin inside) --------------

def test_each_timed_replay_is_spin_then_start_event_then_replay_then_end_event(cuda):
    with timing.measure_stream("cuda"):
        samples = timing.measure([cuda.call("k", 0.02)], warm(rounds=4))
    assert samples.timer == "cuda-graph"
    assert timed_rounds(cuda, 4, 4) == [["spin", "record", "replay", "record"]] * 4
    assert len(samples.per_call_s) == 4


def test_the_interval_holds_the_replay_alone_not_the_spin_before_it(cuda):
    with timing.measure_stream("cuda"):
        samples = timing.measure([cuda.call("k", 0.02)], warm())
    spins = [e for e in cuda.log if e[0] == "spin"]
    assert spins and all(cycles / CLOCK_KHZ >= timing.SPIN_S * 1e3 for _, cycles, _ in spins)  # ms
    assert samples.per_call_s == pytest.approx([0.02e-3] * 4)  # the calls' device time, nothing else


def test_the_spin_outlasts_the_hosts_launch_of_the_replay(cuda):
    cuda.replay_host_s = 2e-3  # a replay that takes 2 ms to launch
    with timing.measure_stream("cuda"):
        timing.measure([cuda.call("k")], warm())
    cycles = [e[1] for e in cuda.log if e[0] == "spin"][-1]
    assert 2 * 2e-3 <= cycles / (CLOCK_KHZ * 1e3) <= timing.MAX_SPIN_S


def test_spin_length_is_twice_the_launch_within_bounds():
    assert timing.spin_s(0.0) == timing.SPIN_S
    assert timing.spin_s(1e-4) == pytest.approx(2e-4)
    assert timing.spin_s(1.0) == timing.MAX_SPIN_S


# Streams: backward captured with its forward; failed captures leave no stream behind ---------------

def test_backward_is_captured_on_the_stream_its_forward_ran_on(cuda):
    with timing.measure_stream("cuda"):
        forward_stream = cuda.current
        cuda.kernel("forward", 0.01)

        def backward():
            # autograd runs each backward kernel on its forward's stream: only there is it captured
            assert cuda.current is forward_stream
            cuda.kernel("backward", 0.01)
        samples = timing.measure([backward], warm())
    assert samples.timer == "cuda-graph"
    assert forward_stream is not cuda.default
    assert [e for e in cuda.log if e[0] == "capture_begin"] == [("capture_begin", forward_stream.name, "global")]
    assert {e[-1] for e in cuda.log if e[0] in ("captured", "replay", "spin", "record")} == {forward_stream.name}
    assert cuda.current is cuda.default


def test_a_call_that_cannot_be_captured_is_launched_call_by_call_as_cuda_event(cuda):
    def host_sync():
        if cuda.capturing is not None:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        cuda.kernel("k", 1.0)  # a replay target long: one call per round

    with timing.measure_stream("cuda"):
        stream = cuda.current
        samples = timing.measure([host_sync], warm(rounds=3))
        assert cuda.current is stream  # the failed capture did not leave its stream current
    assert samples.timer == "cuda-event" and samples.unroll == 1
    assert timed_rounds(cuda, 3, 4) == [["spin", "record", "call", "record"]] * 3
    assert samples.per_call_s == pytest.approx([1e-3] * 3)


def test_a_capture_failing_at_its_end_restores_the_stream_current_before(cuda):
    cuda.fail_capture_end = True
    with pytest.raises(RuntimeError):
        timing.graph_replay([cuda.call("k")], 2)  # on the default stream: captured on a side stream
    assert cuda.current is cuda.default


def test_measure_stream_restores_the_previous_stream_after_an_exception(cuda):
    with pytest.raises(RuntimeError, match="capture"), timing.measure_stream("cuda"):
        side = cuda.current
        with cuda.graph(cuda.CUDAGraph(), stream=cuda.Stream()):
            raise RuntimeError("illegal address")  # torch.cuda.graph's exit raises, its stream still current
    assert side is not cuda.default
    assert cuda.current is cuda.default


def test_measure_stream_is_a_no_op_on_cpu(cuda):
    with timing.measure_stream("cpu"):
        assert cuda.current is cuda.default
    assert cuda.log == []


# L2: rotation through copies, and the flush ----------------------------------------------------------

def test_rotation_captures_whole_passes_over_every_copy(cuda):
    copies = [cuda.call(f"copy{i}", 0.08) for i in range(5)]  # 1 ms / 0.08 ms: 13 calls, 2 whole passes
    with timing.measure_stream("cuda"):
        samples = timing.measure(copies, warm(l2="rotate"))
    captured = [e[1] for e in cuda.log if e[0] == "captured"]
    assert samples.unroll == 10
    assert captured == [f"copy{i}" for i in range(5)] * 2


def test_rotation_over_more_copies_than_calls_per_replay_takes_each_once(cuda):
    copies = [cuda.call(f"copy{i}", 0.001) for i in range(100)]
    with timing.measure_stream("cuda"):
        samples = timing.measure(copies, warm(l2="rotate"))
    assert samples.unroll == 100
    assert [e[1] for e in cuda.log if e[0] == "captured"] == [f"copy{i}" for i in range(100)]


@pytest.mark.parametrize("footprint", [2**18 + 1, 2**20, 3 * 2**20 + 7, 49 * 2**20, 50 * 2**20, 200 * 2**20])
def test_rotate_working_set_is_at_least_twice_the_l2_unless_copies_are_capped(footprint):
    l2 = 50 * 2**20
    copies = timing.copies_for(footprint, l2, "rotate")
    if copies < timing.MAX_COPIES:
        assert copies * footprint >= 2 * l2
        assert (copies - 1) * footprint < 2 * l2 or copies == 1  # no more copies than needed
    assert timing.copies_for(footprint, l2, "warm") == timing.copies_for(footprint, l2, "flush") == 1


def test_the_record_states_a_working_set_of_twice_the_gpus_l2(cuda):
    l2 = runner.cache_bytes("cuda")
    assert l2 == cuda.props.L2_cache_size  # the rotation overflows the GPU's L2, read from the device
    footprint = 4 * 2**20
    copies = [cuda.call(f"copy{i}", 0.01) for i in range(timing.copies_for(footprint, l2, "rotate"))]
    with timing.measure_stream("cuda"):
        samples = timing.measure(copies, warm(l2="rotate"), footprint_bytes=footprint)
    assert samples.working_set_bytes >= 2 * l2
    assert samples.unroll % len(copies) == 0


def test_flush_mode_reads_the_l2_behind_the_spin_and_before_the_start_event(cuda, monkeypatch):
    monkeypatch.setattr(timing, "l2_flusher", lambda: cuda.call("flush", 0.03))
    with timing.measure_stream("cuda"):
        samples = timing.measure([cuda.call("k", 0.01)], warm(l2="flush", rounds=3))
    assert samples.unroll == 1 and samples.timer == "cuda-graph"
    assert timed_rounds(cuda, 3, 5) == [["spin", "call", "record", "replay", "record"]] * 3
    assert [e[1] for e in cuda.log if e[0] == "call"][-3:] == ["flush"] * 3
    assert samples.per_call_s == pytest.approx([0.01e-3] * 3)  # the flush is not in the interval


def test_the_l2_flush_reads_a_buffer_twice_the_cache_and_writes_only_a_scalar():
    flush = timing.L2Flush(2**20, device="cpu")
    assert flush.buf.numel() * flush.buf.element_size() == 2 * 2**20
    before = flush.buf.clone()
    flush()
    assert torch.equal(flush.buf, before)
    assert flush.out.numel() == 1 and flush.out.item() == flush.buf.numel()


# Energy: a window of at least a second, sized from the replay's device time --------------------------

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def board(clock: Clock, watts: float = 300.0):
    """NVML's total energy counter of a board drawing `watts`, in joules."""
    return lambda: watts * clock.now


def test_energy_window_is_sized_from_the_replays_device_time(cuda):
    clock, launches = Clock(), []

    def replay():
        launches.append(1)
        clock.now += 0.125  # each replay lasts 0.125 s, as timed
    energy = timing.energy_per_call(replay, calls=4, replay_s=0.125, meter=board(clock), clock=clock)
    assert len(launches) == 8
    assert energy.window_s == pytest.approx(1.0)
    assert energy.j_per_call == pytest.approx(300 * 0.125 / 4)
    assert energy.scope == timing.ENERGY_SCOPE


def test_an_energy_window_that_falls_short_is_extended_past_a_second(cuda):
    clock, launches = Clock(), []

    def replay():
        launches.append(1)
        clock.now += 0.05  # faster than the rounds' median said
    energy = timing.energy_per_call(replay, calls=2, replay_s=0.1, meter=board(clock), clock=clock)
    assert energy.window_s >= timing.ENERGY_WINDOW_S
    assert len(launches) > 10
    assert energy.j_per_call == pytest.approx(300 * 0.05 / 2)  # joules over every replay of the window


def test_an_energy_window_is_not_extended_without_a_pace_to_size_it(cuda):
    clock, launches = Clock(), []
    energy = timing.energy_per_call(lambda: launches.append(1), 1, 0.5, meter=board(clock), clock=clock)
    assert energy.window_s < timing.ENERGY_WINDOW_S  # stated in the record, not hidden
    assert len(launches) == 2  # the window sized from replay_s, and no extension it cannot pace


def test_energy_scope_travels_with_the_record():
    record = OpCase(op="gemm", backend="torch", dtype="bf16", shape={"m": 1, "n": 1, "k": 1},
                    energy=timing.Energy(0.5, 1.2, timing.ENERGY_SCOPE))
    assert from_info(record.to_info()).energy.scope == timing.ENERGY_SCOPE


def test_measure_sizes_the_energy_window_from_the_median_replay(cuda, monkeypatch):
    seen = {}

    def energy_per_call(launch, calls, replay_s):
        seen.update(calls=calls, replay_s=replay_s)
        return timing.Energy(1.0, 1.0, timing.ENERGY_SCOPE)
    monkeypatch.setattr(timing, "energy_per_call", energy_per_call)
    with timing.measure_stream("cuda"):
        samples = timing.measure([cuda.call("k", 0.1)], warm(energy=True))
    assert seen["calls"] == samples.unroll
    assert seen["replay_s"] == pytest.approx(statistics.median(samples.per_call_s) * samples.unroll)
    assert samples.energy.scope == timing.ENERGY_SCOPE


# NVML around and during the rounds ------------------------------------------------------------------

class FakeNvml:
    """pynvml's calls gpu_watch makes; violation counters move by 1 ms (power) and 2 ms (thermal) a read."""
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 0, 1, 0
    NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL = 0, 1

    def __init__(self, log: list):
        self.log, self.reads = log, {0: 0, 1: 0}
        self.sampler_threads = set()

    def nvmlDeviceGetViolationStatus(self, handle, policy):
        self.log.append(("nvml.violation", policy))
        self.reads[policy] += 1
        return SimpleNamespace(violationTime=self.reads[policy] * (policy + 1) * 1_000_000)

    def nvmlDeviceGetClockInfo(self, handle, kind):
        self.sampler_threads.add(threading.get_ident())
        return 1980 if kind == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 61

    def nvmlDeviceGetPowerUsage(self, handle):
        return 650_000

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return 0


def test_nvml_counters_bracket_the_rounds_and_clocks_are_sampled_while_they_run(cuda, monkeypatch):
    nvml = FakeNvml(cuda.log)
    monkeypatch.setattr(hardware, "_nvml_device", lambda: (nvml, "handle"))
    monkeypatch.setattr(hardware, "SAMPLE_PERIOD_S", 0.002)
    cuda.replay_host_s = 3e-3  # rounds that take host time, for the sampler to run beside
    with timing.measure_stream("cuda"):
        samples = timing.measure([cuda.call("k", 0.5)], RunSettings("cuda", budget_s=0.05, min_rounds=5, l2="warm"))
    kinds = cuda.kinds()
    reads = [i for i, k in enumerate(kinds) if k == "nvml.violation"]
    assert len(reads) == 4  # power and thermal, before and after
    between = kinds[reads[1]:reads[2]]
    assert between.count("replay") == len(samples.per_call_s)  # every timed round, and only they
    assert "capture_begin" not in between and kinds[reads[-1]:].count("replay") == 0
    gpu = samples.gpu
    assert gpu.samples >= 3 and len(nvml.sampler_threads) >= 2  # the main thread and the sampler
    assert gpu.sm_clock_mhz == 1980 and gpu.power_w == 650 and gpu.temperature_c == 61
    assert gpu.power_violation_s == pytest.approx(1e-3) and gpu.thermal_violation_s == pytest.approx(2e-3)


def test_without_nvml_the_gpu_state_is_left_empty(cuda):
    with timing.measure_stream("cuda"):
        samples = timing.measure([cuda.call("k")], warm())
    assert samples.gpu is None


# Setup and timing time --------------------------------------------------------------------------------

def test_setup_counts_from_the_cases_start_to_its_first_timed_round(cuda, monkeypatch):
    ticks = iter(range(100, 10_000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(ticks)))
    with timing.measure_stream("cuda"):
        samples = timing.measure([cuda.call("k")], warm(), started=0.0)
    assert samples.setup_s >= 100 and samples.timing_s > 0


def test_the_runner_writes_setup_and_timing_into_the_record():
    benchmark = SimpleNamespace(enabled=True, extra_info={}, pedantic=lambda *a, **k: None)
    samples = timing.Samples([1e-3] * 6, "cuda-graph", 4, "rotate", setup_s=2.5, timing_s=0.2)
    record = OpCase(op="gemm", backend="torch", dtype="bf16", shape={"m": 1, "n": 1, "k": 1})
    runner.finish(benchmark, record, samples, warm())
    back = from_info(benchmark.extra_info)
    assert (back.setup_s, back.timing_s) == (2.5, 0.2)
