"""Residual adds (forward, and the gradient sum of the backward) of the selected plans, per backend."""

OP = "add"


def test_add(measure_case, case):
    measure_case(case)
