"""Residual add fused with the RMSNorm after it, as inference stacks run them: at every residual add
of the plans of RMSNorm models, in the add's passes."""

from dataclasses import replace

from opbench.measure.cases import build_cases


def CASES(selection):
    plans = [replace(p, calls=tuple(replace(c, op="add_rmsnorm") for c in p.calls if c.op == "add"))
             for p in selection.plans if p.model.norm == "rmsnorm"]
    return build_cases(plans, "add_rmsnorm", selection.backends)


def test_add_rmsnorm(measure_case, case):
    measure_case(case)
