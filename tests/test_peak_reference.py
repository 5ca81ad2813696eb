"""The peaks' correctness gate: a tf32 matmul is checked against a reference computed with TF32 off."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opbench.measure import peak_cases
from opbench.measure.peak_cases import PeakCase
from opbench.ops.gemm import GEMM, GemmShape


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def modes(monkeypatch) -> dict:
    """The math mode the timed call and the reference each ran in."""
    seen = {}
    backend = GEMM.backends["torch"]
    reference = GEMM.reference

    def prepare(inputs, dtype, pass_):
        fn = backend.prepare(inputs, dtype, pass_)

        def call():
            seen["call"] = tf32_flags()
            return fn()
        return call

    def recording_reference(inputs, dtype, pass_):
        seen["reference"] = tf32_flags()
        return reference(inputs, dtype, pass_)
    monkeypatch.setitem(GEMM.backends, "torch", dataclasses.replace(backend, prepare=prepare))
    monkeypatch.setattr(GEMM, "reference", recording_reference)
    return seen


def test_a_tf32_peak_is_computed_in_tf32_and_checked_against_a_reference_without_it(modes):
    before = tf32_flags()
    _, verdict = peak_cases.gate(PeakCase("matmul", "tf32", GemmShape(64, 48, 32)), "cpu")
    assert modes["call"] == (True, True)
    assert modes["reference"] == (False, False)
    assert verdict.passed and verdict.tol == pytest.approx(2e-3)
    assert tf32_flags() == before  # both modes undone


def test_an_fp32_peak_runs_without_tf32_everywhere(modes):
    peak_cases.gate(PeakCase("matmul", "fp32", GemmShape(32, 32, 32)), "cpu")
    assert modes["call"] == modes["reference"] == (False, False)


def test_a_wrong_tf32_result_fails_the_gate(monkeypatch):
    backend = GEMM.backends["torch"]

    def off_by_a_percent(inputs, dtype, pass_):
        fn = backend.prepare(inputs, dtype, pass_)
        return lambda: fn() * 1.01
    monkeypatch.setitem(GEMM.backends, "torch", dataclasses.replace(backend, prepare=off_by_a_percent))
    _, verdict = peak_cases.gate(PeakCase("matmul", "tf32", GemmShape(64, 64, 64)), "cpu")
    assert not verdict.passed
