"""The card's measured ceilings: dense matmul per dtype (the best of large shapes), device copy,
host-to-device and device-to-host copies, kernel launch overhead. Not plan cases: this module
parametrizes itself (`peak`, not `case`); the peaks land in the JSON's opbench section."""

from opbench.measure.peak_cases import peak_cases, run_peak
from opbench.measure.plugin import run_settings


def pytest_generate_tests(metafunc):
    if "peak" in metafunc.fixturenames:
        cases = peak_cases(run_settings(metafunc.config).device)
        metafunc.parametrize("peak", cases, ids=[c.id for c in cases])


def test_peak(benchmark, peak, request):
    run_peak(benchmark, peak, run_settings(request.config))
