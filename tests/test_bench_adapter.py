"""The one workaround on pytest-benchmark's privates (opbench/measure/bench_adapter.py), checked
against the installed pytest-benchmark in a pytest run of its own: these tests fail when upstream
changes under it."""

import argparse
import io
import json
from types import SimpleNamespace

import pytest

from opbench.measure.bench_adapter import ReplayClock, record_samples, silence_rank

from tests.helpers import run_pytest

# Samples a running sum of readings would round: durations of very different sizes, not exact in binary.
AWKWARD = [1e-3, 2e-3, 3e-3, 0.1, 7.3e-9, 1.234567e-5, 0.3, 3.1415926e-4, 1e-7, 2.5e-2, 1.1e-6]

ADAPTER_TESTS = f'''
from opbench.measure.bench_adapter import record_samples


def test_three(benchmark):
    record_samples(benchmark, [1e-3, 2e-3, 3e-3])


def test_awkward(benchmark):
    record_samples(benchmark, {AWKWARD!r})


def test_pedantic_times_rounds_on_the_fixtures_timer(benchmark):
    # record_samples relies on this: the fixture has a `_timer` attribute of its own, pedantic's
    # runner reads the clock there, twice per round, and keeps end - start as the round's time
    assert "_timer" in vars(benchmark) and callable(benchmark._timer)
    readings = iter([10.0, 10.5, 20.0, 20.25, 5.0, 5.125])
    calls = []

    def clock():
        calls.append(1)
        return next(readings)
    benchmark._timer = clock
    benchmark.pedantic(lambda: None, rounds=3, iterations=1, warmup_rounds=0)
    assert len(calls) == 6
    assert list(benchmark.stats.stats.data) == [0.5, 0.25, 0.125]
'''


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    """The tests above in a pytest run of their own, with its JSON."""
    where = tmp_path_factory.mktemp("adapter")
    (where / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: not this repository's plugin or settings
    (where / "test_adapter.py").write_text(ADAPTER_TESTS)
    out = where / "out.json"
    proc = run_pytest(str(where / "test_adapter.py"), f"--rootdir={where}", "-c", str(where / "pytest.ini"),
                      "-p", "no:cacheprovider", f"--benchmark-json={out}", "-q", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {b["name"]: b for b in json.loads(out.read_text())["benchmarks"]}


@pytest.mark.parametrize("name, samples", [("test_three", [1e-3, 2e-3, 3e-3]), ("test_awkward", AWKWARD)])
def test_the_json_statistics_are_exactly_the_samples(adapter_run, name, samples):
    stats = adapter_run[name]["stats"]
    assert stats["data"] == samples  # every round, in order, to the last bit
    assert stats["rounds"] == len(samples) and stats["iterations"] == 1
    assert (stats["min"], stats["max"]) == (min(samples), max(samples))
    ordered = sorted(samples)
    assert stats["median"] == ordered[len(ordered) // 2]  # odd counts: the middle sample itself


def test_the_fixture_still_times_pedantic_rounds_on_its_timer(adapter_run):
    assert "test_pedantic_times_rounds_on_the_fixtures_timer" in adapter_run


def test_the_replay_clock_gives_each_round_its_sample():
    clock = ReplayClock(AWKWARD)
    durations = []
    for _ in AWKWARD:
        start = clock()
        durations.append(clock() - start)
    assert durations == AWKWARD


class FakeBenchmark:
    def __init__(self, enabled=True):
        self.enabled, self._timer, self.pedantic_calls = enabled, None, []

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        self.pedantic_calls.append((rounds, iterations, warmup_rounds))


def test_record_samples_times_nothing_when_benchmarking_is_off_or_there_is_nothing():
    off = FakeBenchmark(enabled=False)  # marked used (one call of nothing), so it does not warn; no clock set
    record_samples(off, [1e-3])
    assert off._timer is None and off.pedantic_calls == [(1, 1, 0)]
    empty = FakeBenchmark()
    record_samples(empty, [])
    assert empty._timer is None and empty.pedantic_calls == []
    bench = FakeBenchmark()
    record_samples(bench, [4e-3, 5e-3, 6e-3, 7e-3, 8e-3])
    assert bench.pedantic_calls == [(5, 1, 0)] and isinstance(bench._timer, ReplayClock)


def _config(**options):
    return SimpleNamespace(option=argparse.Namespace(**options))


def test_silence_rank_turns_off_json_saving_and_tables():
    json_file = io.StringIO()  # older pytest-benchmark opened the JSON file while parsing its options
    config = _config(benchmark_json=json_file, benchmark_save="driver560", benchmark_autosave=True,
                     benchmark_quiet=False, benchmark_compare=["0001"], benchmark_max_time=0.5)
    silence_rank(config)
    o = config.option
    assert json_file.closed
    assert (o.benchmark_json, o.benchmark_save, o.benchmark_autosave, o.benchmark_quiet, o.benchmark_compare) == (
        None, None, None, True, [])
    assert o.benchmark_max_time == 0.5  # the rest is left alone


def test_silence_rank_sets_only_the_options_pytest_benchmark_has():
    config = _config(benchmark_json="out.json", benchmark_quiet=False)
    silence_rank(config)
    assert vars(config.option) == {"benchmark_json": None, "benchmark_quiet": True}


SILENCED_CONFTEST = '''
from opbench.measure.bench_adapter import silence_rank


def pytest_configure(config):  # before pytest-benchmark's own, which is trylast
    silence_rank(config)
'''


def test_a_silenced_run_writes_no_json_saves_nothing_and_prints_no_table(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(SILENCED_CONFTEST)
    (tmp_path / "test_one.py").write_text("def test_one(benchmark):\n    benchmark(sum, range(7))\n")
    out, storage = tmp_path / "out.json", tmp_path / "storage"
    proc = run_pytest(str(tmp_path / "test_one.py"), f"--rootdir={tmp_path}", "-c", str(tmp_path / "pytest.ini"),
                      "-p", "no:cacheprovider", f"--benchmark-json={out}", "--benchmark-autosave",
                      f"--benchmark-storage={storage}", "-q", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout
    # pytest-benchmark < 5.3 opens (and so empties) the JSON file while it parses the options, before any
    # plugin runs: on such a rank the file may exist, but nothing is written into it
    assert (not out.exists() or out.stat().st_size == 0) and not list(storage.rglob("*.json"))
    assert "benchmark: 1 tests" not in proc.stdout and "Min" not in proc.stdout
