"""Grouped GEMMs of the MoE experts: every distinct (ragged rows, n, k, dtype, pass) of the plans, per backend."""

OP = "grouped_gemm"


def test_grouped_gemm(measure_case, case):
    measure_case(case)
