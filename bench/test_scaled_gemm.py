"""Scaled fp8 GEMMs (per tensor, per row, 128 x 128 blocks): every distinct (M, N, K, format) of the plans, per backend."""

OP = "scaled_gemm"


def test_scaled_gemm(measure_case, case):
    measure_case(case)
