"""Fused MoE (the permutation fused into the grouped GEMMs) beside the unfused torch path, at the experts of
every MoE layer of the inference plans without expert parallelism."""

from dataclasses import replace

from opbench.measure.cases import build_cases
from opbench.spec.plan import fused_moe_calls


def CASES(selection):
    plans = [replace(p, calls=tuple(fused_moe_calls(p))) for p in selection.plans]
    return build_cases(plans, "fused_moe", selection.backends)


def test_fused_moe(measure_case, case):
    measure_case(case)
