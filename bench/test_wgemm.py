"""Weight-only quantized GEMMs (W8A16, W4A16): every distinct (M, N, K, weight format) of the plans, per backend."""

OP = "wgemm"


def test_wgemm(measure_case, case):
    measure_case(case)
