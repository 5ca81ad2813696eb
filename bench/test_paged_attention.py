"""Attention over a paged and/or fp8 KV cache: every distinct call of the selected inference plans, per backend."""

OP = "paged_attention"


def test_paged_attention(measure_case, case):
    measure_case(case)
