"""How a case is timed: the correctness gate, the rounds and their stopping rule, unroll and input
rotation, the statistics of the samples, the CPU clock, the runner's record, energy."""

import math
import random
import statistics
import time

import pytest
import torch

from opbench.measure import runner, timing
from opbench.measure.gate import check
from opbench.measure.timing import (MAX_COPIES, MAX_ROUNDS, MAX_UNROLL, RunSettings, Samples, calls_for, copies_for,
                                    take_rounds, unroll_for)
from opbench.record import Gate, HostLoad, OpCase, Stability, from_info, median_ci_rel


# the correctness gate ---------------------------------------------------------------------------------

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
    assert verdict.worst_output == 1 and not verdict.passed
    nan = a.clone()
    nan[0] = float("nan")
    assert not check(nan, a, 1.0).passed
    assert check(a[:4], a, 1.0).rel_err == math.inf


def test_a_nan_output_is_not_hidden_by_a_later_correct_one():
    a, b, c = (torch.randn(7, dtype=torch.float64) for _ in range(3))
    nan = a.clone()
    nan[5] = float("nan")
    verdict = check((nan, b, c), (a, b, c), 1.0)
    assert not verdict.passed and verdict.worst_output == 0 and math.isnan(verdict.rel_err)


# the rounds and their stopping rule -------------------------------------------------------------------

class RoundClock:
    """A clock that moves only as the rounds run: each round advances it by the sample it returns."""

    def __init__(self, samples, tick=0.0):
        self.samples, self.now, self.tick, self.taken = iter(samples), 0.0, tick, 0

    def one_round(self) -> float:
        s = next(self.samples)
        self.now += s
        self.taken += 1
        return s

    def __call__(self) -> float:
        self.now += self.tick  # time that passes between rounds, if any
        return self.now


def forever(*values):
    while True:
        yield from values


def test_constant_samples_stop_at_the_first_check():
    clock = RoundClock(forever(2.5e-5))
    samples = take_rounds(clock.one_round, budget_s=10.0, min_rounds=3, ci_target=0.005, clock=clock)
    assert samples == [2.5e-5] * 10  # the median is known exactly at the first check


def test_min_rounds_come_before_any_stop():
    clock = RoundClock(forever(2.5e-5))
    assert len(take_rounds(clock.one_round, 10.0, min_rounds=23, ci_target=0.005, clock=clock)) == 23
    spent = RoundClock(forever(1.0, 9.0), tick=100.0)  # the budget is gone after the first reading
    assert len(take_rounds(spent.one_round, budget_s=1.0, min_rounds=7, ci_target=0.005, clock=spent)) == 7


def test_a_noisy_case_runs_to_its_budget():
    # rounds alternate 1 and 3 units: the median's interval spans both, never within 0.5%; the clock
    # reaches the budget of 100 units after 50 rounds (binary-exact numbers: no rounding in the sums)
    unit = 2.0 ** -12
    clock = RoundClock(forever(unit, 3 * unit))
    samples = take_rounds(clock.one_round, budget_s=100 * unit, min_rounds=3, ci_target=0.005, clock=clock)
    assert len(samples) == 50 and sum(samples) == 100 * unit
    assert median_ci_rel(sorted(samples)) > 0.3


def test_rounds_are_capped():
    clock = RoundClock(forever(1e-6, 3e-6))  # never stable, and the clock never reaches the budget
    samples = take_rounds(clock.one_round, budget_s=1.0, min_rounds=5, ci_target=0.005, clock=lambda: 0.0)
    assert len(samples) == MAX_ROUNDS == clock.taken


def test_rounds_stop_soon_after_the_median_is_known_within_the_target():
    rng = random.Random(11)
    sequence = [1e-4 * (1 + rng.uniform(-0.03, 0.03)) for _ in range(4000)]
    for target in (0.02, 0.005, 0.002):
        clock = RoundClock(sequence)
        samples = take_rounds(clock.one_round, budget_s=1e9, min_rounds=5, ci_target=target, clock=clock)
        first = next(n for n in range(10, len(sequence)) if median_ci_rel(sorted(sequence[:n])) <= target)
        assert samples == sequence[:len(samples)]
        assert median_ci_rel(sorted(samples)) <= target  # it stops only once the median is known...
        assert first <= len(samples) <= first + first // 4 + 1  # ...and checks again before a quarter more
    assert 10 < first < 4000


def test_short_calls_are_unrolled_long_ones_are_not():
    assert calls_for(1e-4) == 10  # 1 ms replay target / 0.1 ms per call
    assert calls_for(1e-6) == MAX_UNROLL
    assert calls_for(5e-3) == 1
    assert calls_for(4e-4) == 3
    assert calls_for(0.0) == calls_for(float("nan")) == MAX_UNROLL  # a probe below the clock's resolution


def test_a_replay_is_a_whole_number_of_passes_over_the_copies():
    assert unroll_for(1e-4, 1) == 10 and unroll_for(1e-6, 1) == MAX_UNROLL
    # 64 calls would be wanted: 63 over 3 copies, 60 over 5, 34 over 34 (one pass)
    assert (unroll_for(1e-6, 3), unroll_for(1e-6, 5), unroll_for(1e-6, 34)) == (63, 60, 34)
    assert unroll_for(5e-3, 7) == 7  # a long call still runs each copy once per replay
    assert unroll_for(1e-6, MAX_COPIES) == MAX_COPIES
    for copies in range(1, 80):
        for call_s in (1e-7, 3e-5, 2.5e-4, 1e-2):
            n = unroll_for(call_s, copies)
            assert n % copies == 0 and copies <= n <= max(MAX_UNROLL, copies)


def test_rotation_copies_make_the_working_set_exceed_twice_the_cache():
    mib = 2**20
    assert copies_for(3 * mib, 50 * mib, "rotate") == 34  # 34 x 3 MiB = 102 MiB >= 100 MiB > 33 x 3 MiB
    for footprint, cache in ((3 * mib, 50 * mib), (7_777_777, 40 * mib), (1_234_567, 16 * mib)):
        n = copies_for(footprint, cache, "rotate")
        assert n * footprint >= 2 * cache > (n - 1) * footprint
    assert copies_for(101 * mib, 50 * mib, "rotate") == 1  # one call's footprint already overflows it
    assert copies_for(1000, 50 * mib, "rotate") == MAX_COPIES  # tiny inputs: capped, not a million copies
    assert copies_for(3 * mib, 50 * mib, "warm") == copies_for(3 * mib, 50 * mib, "flush") == 1
    assert copies_for(0, 50 * mib, "rotate") == copies_for(3 * mib, 0, "rotate") == 1  # unknown: no rotation


# the statistics of a case's rounds --------------------------------------------------------------------

def test_stability_of_a_hand_computed_list():
    s = Stability.of([5.0, 1.0, 3.0, 2.0, 4.0, 100.0, 3.0, 2.0], stable_ci_rel=0.01)
    # sorted: 1 2 2 3 3 4 5 100; median 3; quartiles at positions 1.75 and 5.25: 2 and 4.25
    assert (s.rounds, s.median_s, s.min_s, s.max_s) == (8, 3.0, 1.0, 100.0)
    assert (s.q1_s, s.q3_s) == (2.0, 4.25)
    assert s.iqr_rel == pytest.approx(2.25 / 3)
    assert s.cv == pytest.approx(math.sqrt(8268 / 7) / 15)  # mean 15, squared deviations sum to 8268
    assert s.outliers == 1  # 100 is beyond q3 + 1.5 IQR = 7.625; 1 is within q1 - 1.5 IQR = -1.375
    # n = 8: j = round(4 - 0.98 sqrt 8) = 1: x(1)..x(8), half of 99 over the median 3
    assert s.ci_rel == pytest.approx(99 / 2 / 3) and s.stable is False


def test_stability_of_tight_rounds_is_stable_and_of_few_rounds_is_not():
    tight = [1e-4 * (1 + 0.001 * ((i * 7) % 11 - 5)) for i in range(33)]
    s = Stability.of(tight, stable_ci_rel=0.01)
    assert s.stable and s.ci_rel < 0.01 and s.outliers == 0 and s.median_s == pytest.approx(1e-4)
    few = Stability.of([2e-5, 2e-5, 2e-5, 2e-5, 2e-5], stable_ci_rel=0.01)
    assert few.ci_rel is None and not few.stable and few.cv == 0.0 and few.iqr_rel == 0.0
    one = Stability.of([3e-3], stable_ci_rel=0.01)
    assert (one.q1_s, one.q3_s, one.cv, one.outliers, one.stable) == (3e-3, 3e-3, 0.0, 0, False)


def test_median_ci_by_hand():
    # n = 6: j = round(3 - 2.40) = 1: the whole range, (16 - 10) / 2 over the median 12.5
    assert median_ci_rel([10, 11, 12, 13, 14, 16]) == pytest.approx(6 / 2 / 12.5)
    # n = 20, values 100..119: x(6)..x(15) = 105..114, over the median 109.5
    assert median_ci_rel(list(range(100, 120))) == pytest.approx((114 - 105) / 2 / 109.5)
    assert median_ci_rel([1.0] * 5) == math.inf and median_ci_rel([0.0] * 9) == math.inf


def _picked_j(n: int) -> int:
    """The 1-based order statistic j the interval starts at, read back from samples 1..n."""
    half_width = median_ci_rel([float(i) for i in range(1, n + 1)]) * statistics.median(range(1, n + 1))
    return round((n + 1 - 2 * half_width) / 2)


@pytest.mark.parametrize("n, j", [(6, 1), (10, 2), (20, 6), (30, 10), (100, 40)])
def test_median_ci_follows_the_binomial_tables(n, j):
    assert _picked_j(n) == j


def test_median_ci_covers_the_median_95_percent_of_the_time():
    for n in (*range(6, 120), 137, 500, 999):
        j = _picked_j(n)
        coverage = 1 - 2 * sum(math.comb(n, k) for k in range(j)) / 2**n  # P(x(j) <= median <= x(n+1-j))
        assert coverage >= 0.95, n


# the CPU clock -----------------------------------------------------------------------------------------

def test_cpu_rounds_are_wall_time_per_call():
    calls = []

    def sleeper():
        calls.append(1)
        time.sleep(2e-3)
    samples = timing.measure([sleeper], RunSettings("cpu", budget_s=0.03, min_rounds=4, l2="warm"),
                             footprint_bytes=4096)
    assert samples.timer == "cpu" and samples.unroll == 1  # a 2 ms call is a round of its own
    assert len(samples.per_call_s) >= 4 and min(samples.per_call_s) >= 2e-3
    assert samples.host_s is None and samples.gpu is None and isinstance(samples.host, HostLoad)
    assert samples.working_set_bytes == 4096 and samples.l2 == "warm"


def test_cpu_rounds_cycle_through_every_input_copy():
    counts = [0, 0, 0]

    def call(i):
        def run():
            counts[i] += 1
        return run
    samples = timing.measure([call(0), call(1), call(2)], RunSettings("cpu", 0.01, 5, l2="rotate"),
                             footprint_bytes=1000)
    assert samples.unroll % 3 == 0  # whole passes over the copies
    assert counts[0] > 0 and counts[0] == counts[1] == counts[2]  # each copy as often as the others
    assert samples.working_set_bytes == 3000


# the runner's record ----------------------------------------------------------------------------------

class FakeBenchmark:
    """pytest-benchmark's fixture as the runner sees it."""

    def __init__(self, enabled=True):
        self.enabled, self.extra_info, self._timer, self.rounds = enabled, {}, None, None

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        self.rounds = rounds
        self.durations = []
        if not self.enabled:  # as pytest-benchmark: a disabled fixture runs the target once, timing nothing
            target()
            return
        for _ in range(rounds):
            start = self._timer()
            target()
            self.durations.append(self._timer() - start)


CASE = OpCase(op="rmsnorm", backend="torch", dtype="fp32", shape={"tokens": 13, "width": 191}, flops=12_415,
              bytes=20_628, correct=Gate(1e-7, 1e-5))
TIGHT = [3e-6 * (1 + 0.0005 * ((i * 5) % 9 - 4)) for i in range(41)]


@pytest.mark.parametrize("busy", [False, True])
def test_finish_hands_the_samples_over_and_writes_the_record(busy):
    bench = FakeBenchmark()
    host = HostLoad(2.5 if busy else 0.2, 0.0, busy)
    samples = Samples(TIGHT, "cpu", 17, "warm", 20_628, host=host)
    record = runner.finish(bench, CASE, samples, RunSettings("cpu", 0.1, 3))
    assert bench.durations == TIGHT  # pytest-benchmark's rounds are the samples
    assert record.median_s == statistics.median(TIGHT) and record.stability.rounds == 41
    assert (record.timer, record.unroll, record.l2, record.host_s, record.host) == ("cpu", 17, "warm", None, host)
    assert record.stability.ci_rel < 0.01
    assert record.stability.stable is not busy  # a busy host makes any case unstable
    info = bench.extra_info
    assert info["kind"] == "op" and info["stability"]["stable"] is not busy and info["host"]["busy"] is busy
    assert info["correct"] == {"rel_err": 1e-7, "tol": 1e-5, "worst_output": 0, "worst_rank": None, "passed": True}
    assert from_info(info) == record


def test_finish_without_timing_writes_an_untimed_record():
    bench = FakeBenchmark(enabled=False)
    record = runner.finish(bench, CASE, None, RunSettings("cpu", 0.1, 3))
    assert record == CASE and not record.timed and bench.durations == []  # marked used, nothing timed
    assert bench.extra_info["median_s"] is None and bench.extra_info["correct"]["rel_err"] == 1e-7


# energy -----------------------------------------------------------------------------------------------

def test_energy_per_call_reads_the_counter_around_a_window(monkeypatch):
    joules = {"total": 100.0}

    def launch():  # each replay of 4 calls draws 2 J
        joules["total"] += 2.0
    monkeypatch.setattr(timing, "energy_meter", lambda: lambda: joules["total"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    # a replay of 4 calls lasts 0.4 s: 3 replays fill the 1 s window
    energy = timing.energy_per_call(launch, calls=4, replay_s=0.4)
    assert energy.j_per_call == pytest.approx(6.0 / 12) and energy.window_s >= 0
    monkeypatch.setattr(timing, "energy_meter", lambda: None)
    assert timing.energy_per_call(launch, calls=4, replay_s=0.4) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rounds_are_device_time_of_graph_replays():
    spin = 2_000_000  # cycles: about a millisecond
    samples = timing.measure([lambda: torch.cuda._sleep(spin)], RunSettings("cuda", 0.2, 10, l2="warm"))
    assert samples.timer == "cuda-graph" and samples.unroll >= 1 and samples.host_s is not None
    clock_khz = torch.cuda.get_device_properties(0).clock_rate
    assert statistics.median(samples.per_call_s) == pytest.approx(spin / (clock_khz * 1e3), rel=0.5)
