"""GEMMs: every distinct (M, N, K, dtype, pass) of the selected plans, per backend."""

OP = "gemm"


def test_gemm(measure_case, case):
    measure_case(case)
