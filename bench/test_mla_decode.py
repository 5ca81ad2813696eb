"""Absorbed multi-head latent attention decode: every distinct call of the selected decode plans, per backend."""

OP = "mla_decode"


def test_mla_decode(measure_case, case):
    measure_case(case)
