"""MoE routing (scores, top-k, renormalisation): every distinct routing call of the plans, per backend."""

OP = "moe_route"


def test_moe_route(measure_case, case):
    measure_case(case)
