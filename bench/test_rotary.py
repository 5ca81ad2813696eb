"""Rotary embeddings of q and k: every distinct shape, layout and decode offset of the plans, per backend."""

OP = "rotary"


def test_rotary(measure_case, case):
    measure_case(case)
