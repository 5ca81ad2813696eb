"""LayerNorm: every distinct (tokens, width, dtype, pass) of the selected plans, per backend."""

OP = "layernorm"


def test_layernorm(measure_case, case):
    measure_case(case)
