"""The one place where opbench relies on pytest-benchmark beyond its documented API.

pytest-benchmark times a function with the clock chosen for the whole session (--benchmark-timer).
opbench times on its own clock (CUDA events, or time.perf_counter) and hands pytest-benchmark the
per-call seconds it measured, so that every statistic in the JSON is the suite's measurement. No
public call sets a fixture's clock, so `record_samples` sets the fixture's `_timer` to a clock that
replays the measured samples; tests/test_bench_adapter.py fails if pytest-benchmark changes under it.

Ranks above 0 of a torchrun run must not write the JSON, save runs or print tables: that is done
with pytest-benchmark's own options (public), before its session reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest


class ReplayClock:
    """A clock whose readings, two per round (start, end), make each round last the next sample.
    Each round starts at 0 and ends at its sample, so end - start is the sample to the last bit (a
    running sum would round every duration after the first)."""

    def __init__(self, samples_s: Sequence[float]):
        self.readings = [reading for s in samples_s for reading in (0.0, float(s))]
        self.position = 0

    def __call__(self) -> float:
        value = self.readings[self.position]
        self.position = min(self.position + 1, len(self.readings) - 1)
        return value


def record_samples(benchmark, samples_s: Sequence[float]) -> None:
    """Hand pytest-benchmark one round per sample (seconds per call): its statistics, table and JSON
    then describe exactly these samples. When benchmarking is disabled the fixture is only marked
    used, with one call of nothing (pedantic times nothing then), so that it does not warn it was not."""
    if not benchmark.enabled:
        benchmark.pedantic(lambda: None, rounds=1, iterations=1, warmup_rounds=0)
        return
    if not samples_s:
        return
    benchmark._timer = ReplayClock(samples_s)  # the workaround: no public way to set a fixture's clock
    benchmark.pedantic(lambda: None, rounds=len(samples_s), iterations=1, warmup_rounds=0)


def silence_rank(config: pytest.Config) -> None:
    """On a rank above 0: no JSON, no saved run, no table (rank 0 reports for all). Call it from a
    pytest_configure that runs before pytest-benchmark's (which is trylast)."""
    json = getattr(config.option, "benchmark_json", None)
    if hasattr(json, "close"):  # pytest-benchmark < 5.3 opens the file while parsing the options
        json.close()
    for name, value in (("benchmark_json", None), ("benchmark_save", None), ("benchmark_autosave", None),
                        ("benchmark_quiet", True), ("benchmark_compare", [])):
        if hasattr(config.option, name):
            setattr(config.option, name, value)
