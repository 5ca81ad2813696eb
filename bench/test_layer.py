"""A decoder layer, and a whole small model, timed as one unit at each selected workload: the
measurement composition is checked against (the error is in the summary and the JSON)."""

from opbench.measure.plugin import state
from opbench.measure.units import unit_cases


def pytest_generate_tests(metafunc):
    cases = unit_cases(state(metafunc.config).selection.plans)
    metafunc.parametrize("unit", cases, ids=[c.id for c in cases])


def test_layer(measure_unit, unit):
    measure_unit(unit)
