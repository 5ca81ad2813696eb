"""Embedding lookup and its table gradient: every distinct shape, dtype and pass of the plans."""

OP = "embedding"


def test_embedding(measure_case, case):
    measure_case(case)
