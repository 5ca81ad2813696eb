"""LM-head cross-entropy over this GPU's vocabulary slice, forward and backward, per backend."""

OP = "cross_entropy"


def test_cross_entropy(measure_case, case):
    measure_case(case)
