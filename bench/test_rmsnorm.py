"""RMSNorm: every distinct (tokens, width, dtype, pass) of the selected plans, per backend."""

OP = "rmsnorm"


def test_rmsnorm(measure_case, case):
    measure_case(case)
