"""Attention: every distinct attention call of the selected plans (prefill, decode, train forward and
backward), per backend."""

OP = "attention"


def test_attention(measure_case, case):
    measure_case(case)
