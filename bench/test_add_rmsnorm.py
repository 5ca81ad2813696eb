"""Residual add fused with the RMSNorm after it, as inference stacks run them: the fused calls the
plans allow in place of an add and its norm (opbench.spec.plan's fusions), in the add's passes."""

OP = "add_rmsnorm"


def test_add_rmsnorm(measure_case, case):
    measure_case(case)
