"""The GEMM family: work formulas, layouts per pass, and the Triton baseline against the reference."""

import pytest
import torch

from opbench.ops.dtypes import DTYPES
from opbench.ops.gemm import GEMM, GemmShape, bytes_moved, flops, inputs
from opbench.measure.gate import check


def test_flops_and_bytes_by_hand():
    s = GemmShape(m=4096, n=6144, k=4096)
    assert flops(s) == 2 * 4096 * 6144 * 4096 == 206_158_430_208
    # (MK + KN + MN) x 2 bytes = (16,777,216 + 25,165,824 + 25,165,824) x 2
    assert bytes_moved(s, DTYPES["bf16"]) == 134_217_728
    assert bytes_moved(GemmShape(3, 5, 7), DTYPES["fp32"]) == (21 + 35 + 15) * 4
    # fp8 reads one byte per input element and writes bf16
    assert bytes_moved(GemmShape(16, 32, 64), DTYPES["fp8"]) == 16 * 64 + 64 * 32 + 16 * 32 * 2


def test_each_pass_gets_its_training_layout():
    shape = GemmShape(6, 10, 8)
    fwd, dgrad, wgrad = (inputs(shape, DTYPES["fp32"], p, "cpu") for p in ("fwd", "dgrad", "wgrad"))
    assert fwd["a"].is_contiguous() and fwd["b"].t().is_contiguous()  # x @ W^T
    assert dgrad["a"].is_contiguous() and dgrad["b"].is_contiguous()  # dy @ W
    assert wgrad["a"].t().is_contiguous() and wgrad["b"].is_contiguous()  # x^T @ dy
    for inp in (fwd, dgrad, wgrad):
        assert inp["a"].shape == (6, 8) and inp["b"].shape == (8, 10)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("pass_", ["fwd", "dgrad", "wgrad"])
@pytest.mark.parametrize("m, n, k", [(37, 53, 71), (100, 1, 65), (1, 70, 33), (65, 97, 129)])
def test_triton_matmul_matches_reference_at_odd_sizes(m, n, k, pass_, dtype):
    # Runs under TRITON_INTERPRET=1 on a CPU (tests/conftest.py). Sizes are not multiples of the
    # 32-wide blocks, so every edge mask is exercised; fp32 also checks the "ieee" input precision.
    from opbench.kernels.matmul import matmul

    dt = DTYPES[dtype]
    shape = GemmShape(m, n, k)
    inp = inputs(shape, dt, pass_, "cpu")
    out = matmul(inp["a"], inp["b"], input_precision="ieee")
    assert out.dtype == dt.torch and out.shape == (m, n)
    verdict = check(out, GEMM.reference(inp, dt, pass_), dt.tol)
    assert verdict.passed, verdict


def test_triton_matmul_rejects_mismatched_operands():
    from opbench.kernels.matmul import matmul

    with pytest.raises(ValueError, match=r"\(M, K\) @ \(K, N\)"):
        matmul(torch.ones(3, 4), torch.ones(5, 6))


def test_backend_requirements_on_cpu():
    shape, fp32 = GemmShape(16, 16, 16), DTYPES["fp32"]
    assert GEMM.backends["torch"].requires(shape, fp32, "cpu") is None
    assert "GPUs only" in GEMM.backends["triton"].requires(shape, fp32, "cpu")
    assert "tf32" in GEMM.backends["torch"].requires(shape, DTYPES["tf32"], "cpu")
    assert "fp8" in GEMM.backends["torch"].requires(shape, DTYPES["fp8"], "cpu")


def test_case_dtype_falls_back_for_ops_without_the_workload_dtype():
    assert GEMM.case_dtype("fp8") == "fp8"
    assert GEMM.id_of(GemmShape(4096, 6144, 4096)) == "4096x6144x4096"
