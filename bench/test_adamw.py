"""One AdamW step over a layer's (and the embeddings') parameters, fp32 state, per implementation."""

OP = "adamw"


def test_adamw(measure_case, case):
    measure_case(case)
