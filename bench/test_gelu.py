"""GELU (tanh approximation): every distinct shape, dtype and pass of the plans, per backend."""

OP = "gelu"


def test_gelu(measure_case, case):
    measure_case(case)
