"""NF4 dequantization of QLoRA's frozen weights: every distinct (n, k) of the plans, per backend."""

OP = "dequant"


def test_dequant(measure_case, case):
    measure_case(case)
