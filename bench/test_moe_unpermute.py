"""MoE un-permutation with the weighted combine: every distinct call of the plans, per backend."""

OP = "moe_unpermute"


def test_moe_unpermute(measure_case, case):
    measure_case(case)
