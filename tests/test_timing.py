import math

import pytest
import torch

from opbench.measure import timing
from opbench.measure.timing import calls_for, check, rounds_for


def test_check_passes_close_results_and_fails_wrong_ones():
    ref = torch.randn(64, 32, dtype=torch.float64)
    assert check(ref.float(), ref, 1e-5).passed
    noisy = ref * (1 + 0.05 * torch.randn_like(ref))
    verdict = check(noisy, ref, 1e-2)
    assert not verdict.passed and 0.03 < verdict.rel_err < 0.07


def test_check_reports_the_worst_of_several_outputs_and_fails_nan_and_shape():
    a, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    bad_b = b.clone()
    bad_b[3] += 10
    verdict = check((a, bad_b), (a, b), 1e-3)
    assert verdict.output == 1 and not verdict.passed
    nan = a.clone()
    nan[0] = float("nan")
    assert not check(nan, a, 1.0).passed
    assert check(a[:4], a, 1.0).rel_err == math.inf


def test_rounds_fill_the_budget_within_bounds():
    assert rounds_for(1e-3, budget_s=0.5, min_rounds=5) == 500
    assert rounds_for(1.0, budget_s=0.5, min_rounds=5) == 5
    assert rounds_for(1e-9, budget_s=1.0, min_rounds=5) == timing.MAX_ROUNDS
    assert rounds_for(float("nan"), budget_s=1.0, min_rounds=3) == 3


def test_short_calls_are_unrolled_long_ones_are_not():
    assert calls_for(1e-4) == 10  # 1 ms replay target / 0.1 ms per call
    assert calls_for(1e-6) == timing.MAX_UNROLL
    assert calls_for(5e-3) == 1
    assert calls_for(4e-4) == 3


class FakeBenchmark:
    """Stands in for pytest-benchmark's fixture: records what measure() asks of it."""

    def __init__(self):
        self._timer = None
        self.calls = 0

    def pedantic(self, target, rounds, iterations=1, warmup_rounds=0, setup=None):
        self.rounds, self.iterations = rounds, iterations
        for _ in range((rounds + warmup_rounds) * iterations):
            target()
            self.calls += 1


def test_cpu_measure_uses_perf_counter_and_a_round_of_several_calls():
    bench = FakeBenchmark()
    x = torch.randn(16, 16)
    result = timing.measure(bench, lambda: x @ x, timing.RunSettings("cpu", budget_s=0.01, min_rounds=4))
    assert bench._timer is __import__("time").perf_counter
    assert result.timer == "cpu" and result.unroll == bench.iterations >= 1 and result.rounds == bench.rounds >= 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_event_clock_divides_by_calls_per_tick():
    clock = timing.CudaEventClock(calls_per_tick=4)
    a = clock()
    torch.cuda._sleep(10_000_000)
    b = clock()
    single = timing.CudaEventClock()
    c = single()
    torch.cuda._sleep(10_000_000)
    d = single()
    assert (b - a) == pytest.approx((d - c) / 4, rel=0.3)


def test_energy_per_call_reads_the_counter_around_a_window(monkeypatch):
    joules = {"total": 100.0}

    def target():  # each replay of 4 calls draws 2 J
        joules["total"] += 2.0
    monkeypatch.setattr(timing, "energy_meter", lambda: lambda: joules["total"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    # a replay of 4 calls of 0.1 s lasts 0.4 s: 3 replays fill the 1 s window
    assert timing.energy_per_call(target, calls=4, call_s=0.1) == pytest.approx(6.0 / 12)
    monkeypatch.setattr(timing, "energy_meter", lambda: None)
    assert timing.energy_per_call(target, calls=4, call_s=0.1) is None
