"""MoE token permutation into expert order (and the regrouping after an expert-parallel dispatch): every
distinct call of the plans, per backend."""

OP = "moe_permute"


def test_moe_permute(measure_case, case):
    measure_case(case)
