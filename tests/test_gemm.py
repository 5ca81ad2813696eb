"""The GEMM family: work formulas, layouts per pass, and the Triton baselines against the reference.

The kernels run under TRITON_INTERPRET=1 on a CPU (tests/conftest.py), in fp32 and fp16: the interpreter
computes bf16 dots wrongly. bf16 is covered by compiling for sm90.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opbench.ops.dtypes import DTYPES
from opbench.ops.gemm import GEMM, GemmShape, bytes_moved, flops, inputs
from opbench.measure.gate import check
from tests.helpers import twin_autotuner


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


@pytest.mark.parametrize("m", [3, 70])
def test_triton_matmul_of_empty_k_is_zero(m):
    from opbench.kernels.matmul import matmul

    assert (matmul(torch.ones(m, 0), torch.ones(0, 5)) == 0).all()


def test_backend_requirements_on_cpu():
    shape, fp32 = GemmShape(16, 16, 16), DTYPES["fp32"]
    assert GEMM.backends["torch"].requires(shape, fp32, "cpu") is None
    assert "GPUs only" in GEMM.backends["triton"].requires(shape, fp32, "cpu")
    assert "tf32" in GEMM.backends["torch"].requires(shape, DTYPES["tf32"], "cpu")
    assert "fp8" in GEMM.backends["torch"].requires(shape, DTYPES["fp8"], "cpu")


def test_case_dtype_falls_back_for_ops_without_the_workload_dtype():
    assert GEMM.case_dtype("fp8") == "fp8"
    assert GEMM.id_of(GemmShape(4096, 6144, 4096)) == "4096x6144x4096"


# Decode-sized M (<= 64) takes the split-K kernel: odd N and K, uneven splits, float64 reference -----

@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("m, n, k, pass_", [
    (1, 4095, 4095, "fwd"), (1, 1000, 520, "dgrad"),
    (7, 1000, 4095, "fwd"), (7, 4095, 520, "wgrad"),
    (17, 1000, 520, "wgrad"), (17, 1000, 4095, "dgrad"),
    (64, 1000, 520, "fwd"), (64, 4095, 520, "fwd"),
])
def test_decode_matmul_splits_k(m, n, k, pass_, dtype):
    """Under the interpreter K is cut into 3 splits of whole 128-blocks (at K = 520: 256, 256, 8);
    the passes vary the operand layouts. The reference is float64."""
    from opbench.kernels.matmul import matmul

    dt = DTYPES[dtype]
    torch.manual_seed(m * n + k)
    inp = inputs(GemmShape(m, n, k), dt, pass_, "cpu")
    out = matmul(inp["a"], inp["b"])
    assert out.dtype == dt.torch and out.shape == (m, n)
    want = inp["a"].double() @ inp["b"].double()
    verdict = check(out, want, dt.tol)
    assert verdict.passed, verdict


# Autotuning under the interpreter, on twins of the module's autotuners (tests/helpers.py) -------------

@pytest.fixture
def tunings(monkeypatch):
    """The keys each autotuner of the matmul wrapper tuned for, in order, on the tuned path under the
    interpreter."""
    import opbench.kernels.matmul as mm

    twins = {"_matmul_kernel": twin_autotuner(mm._matmul_tuned),
             "_matmul_splitk_kernel": twin_autotuner(mm._splitk_tuned)}
    monkeypatch.setattr(mm, "_matmul_tuned", twins["_matmul_kernel"])
    monkeypatch.setattr(mm, "_splitk_tuned", twins["_matmul_splitk_kernel"])
    monkeypatch.setattr(mm, "_interpreted", lambda: False)
    return lambda: [(name, key) for name, twin in twins.items() for key in twin.cache]


def test_matmul_tunes_each_layout_precision_and_dtype_apart(tunings):
    from opbench.kernels.matmul import matmul

    shape = GemmShape(96, 80, 72)
    for pass_ in ("fwd", "dgrad", "wgrad"):  # NT, NN, TN at one (M, N, K)
        inp = inputs(shape, DTYPES["fp32"], pass_, "cpu")
        assert check(matmul(inp["a"], inp["b"]), GEMM.reference(inp, DTYPES["fp32"], pass_), 1e-5).passed
    inp = inputs(shape, DTYPES["fp32"], "fwd", "cpu")
    matmul(inp["a"], inp["b"], input_precision="tf32")
    half = inputs(shape, DTYPES["fp16"], "fwd", "cpu")
    matmul(half["a"], half["b"])
    matmul(half["a"], half["b"])  # the same case again: no new tuning
    assert [name for name, _ in tunings()] == ["_matmul_kernel"] * 5, tunings()  # five distinct keys


def test_decode_matmul_tunes_per_m_bucket(tunings):
    """The result is checked after each tuning, which ran every config on the same sums and counters."""
    import opbench.kernels.matmul as mm
    from opbench.kernels.matmul import matmul

    for m in (1, 7, 16, 17, 33, 64):  # buckets 16, 16, 16, 32, 64, 64
        inp = inputs(GemmShape(m, 100, 130), DTYPES["fp32"], "fwd", "cpu")
        assert check(matmul(inp["a"], inp["b"]), GEMM.reference(inp, DTYPES["fp32"], "fwd"), 1e-5).passed
    assert [name for name, _ in tunings()] == ["_matmul_splitk_kernel"] * 3, tunings()
    assert [key[0] for _, key in tunings()] == [16, 32, 64]  # BLOCK_M leads the key
    assert all(config.kwargs["SPLIT_K"] > 1 for config in mm._splitk_tuned.cache.values())


def test_prune_keeps_configs_that_fit_hopper_shared_memory():
    import opbench.kernels.matmul as mm

    for dtype, precision in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee")):
        named = {"a_ptr": torch.empty(0, dtype=dtype), "b_ptr": torch.empty(0, dtype=dtype), "K": 4096}
        elt = named["a_ptr"].element_size()
        kept = mm._prune_matmul(mm._MATMUL_CONFIGS, named, INPUT_PRECISION=precision)
        assert kept and all(mm._pipeline_bytes(c.kwargs["BLOCK_M"], c, elt) <= 232448 for c in kept)
        for block_m in (16, 32, 64):
            kept = mm._prune_splitk(mm._SPLITK_CONFIGS, named, INPUT_PRECISION=precision, BLOCK_M=block_m)
            assert kept and all(mm._pipeline_bytes(block_m, c, elt) <= 232448 for c in kept)
    fp32 = {"a_ptr": torch.empty(0), "b_ptr": torch.empty(0), "K": 4096}
    assert len(mm._prune_matmul(mm._MATMUL_CONFIGS, fp32, INPUT_PRECISION="tf32")) < len(mm._MATMUL_CONFIGS)
    # K = 520 in blocks of 256 fills 3 splits at most: configs with 4 or more are dropped
    short = mm._prune_splitk(mm._SPLITK_CONFIGS, dict(fp32, K=520), INPUT_PRECISION="tf32", BLOCK_M=16)
    assert all(c.kwargs["SPLIT_K"] < 4 or c.kwargs["BLOCK_K"] < 256 for c in short)


# Compiled for sm90 without a GPU: shared memory, registers and spills of every config kept, and the
# int64 offset arithmetic ------------------------------------------------------------------------------

_COMPILE = """
import json, os, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import opbench.kernels.matmul as mm

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    return {k: int(v) for k, v in (kv.split(":") for kv in line.split()) if k in ("REG", "STACK", "LOCAL")}


def compile_(kernel, meta, pointer, ones, num_warps, num_stages):
    # as a launch with 16-byte aligned tensors, sizes and strides specialises it: unit strides are constants
    names = [p.name for p in kernel.params if not p.is_constexpr]
    signature = {n: "constexpr" if n in ones else
                 ("*fp32" if n == "sum_ptr" else "*i32" if n == "count_ptr" else pointer) if n.endswith("_ptr")
                 else "i32" for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in ones}
    source = ASTSource(kernel, signature, dict(meta, **{n: 1 for n in ones}), attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


report = {"configs": [], "addptr": {}}
fwd = {"stride_ak", "stride_bk", "stride_cn"}  # x @ W^T: both operands contiguous along K
for name, dtype, precision in (("fp32", torch.float32, "ieee"), ("tf32", torch.float32, "tf32"),
                               ("bf16", torch.bfloat16, "ieee")):
    named = {"a_ptr": torch.empty(0, dtype=dtype), "b_ptr": torch.empty(0, dtype=dtype), "K": 4096}
    pointer = "*fp32" if dtype == torch.float32 else "*bf16"
    base = {"A_LAYOUT": "N", "B_LAYOUT": "T", "INPUT_PRECISION": precision}
    for kernel, configs, block_m in ((mm._matmul_kernel, mm._prune_matmul(mm._MATMUL_CONFIGS, named, **base), None),
                                     (mm._matmul_splitk_kernel, mm._prune_splitk(mm._SPLITK_CONFIGS, named,
                                                                                 BLOCK_M=64, **base), 64)):
        for c in configs:
            meta = dict(base, **c.kwargs, **({"BLOCK_M": block_m} if block_m else {}))
            compiled = compile_(kernel, meta, pointer, fwd, c.num_warps, c.num_stages)
            report["configs"].append({"dtype": name, "kernel": kernel.__name__, "config": str(c),
                                      "shared": compiled.metadata.shared, **resources(compiled.asm["cubin"])})

# General strides, nothing specialised: every pointer offset must be computed in int64
for kernel, meta in ((mm._matmul_kernel, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)),
                     (mm._matmul_splitk_kernel, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4))):
    ttir = compile_(kernel, dict(meta, A_LAYOUT="S", B_LAYOUT="S", INPUT_PRECISION="ieee"), "*bf16", set(), 4, 3)
    ttir = ttir.asm["ttir"]
    # "%p = tt.addptr %base, %offset : <pointer type>, <offset type> loc(...)": the offset types
    report["addptr"][kernel.__name__] = [l.split(" loc(")[0].rsplit(",", 1)[-1].strip() for l in ttir.splitlines()
                                         if "tt.addptr" in l]
json.dump(report, sys.stdout)
"""


def test_matmul_compiles_for_hopper_within_shared_memory_with_int64_offsets():
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    configs = report["configs"]
    for dtype in ("fp32", "tf32", "bf16"):
        for kernel in ("_matmul_kernel", "_matmul_splitk_kernel"):
            assert any(r["dtype"] == dtype and r["kernel"] == kernel for r in configs), (dtype, kernel)
    too_big = [r for r in configs if r["shared"] > 232448]
    assert not too_big, too_big
    # tensor-core dots (tf32, bf16) spill nothing; fp32 "ieee" runs on FMA units, a few bytes at most
    spills = [r for r in configs if r["LOCAL"] or (r["STACK"] and r["dtype"] != "fp32") or r["STACK"] > 16]
    assert not spills, spills
    for kernel, offsets in report["addptr"].items():
        assert offsets and all(o == "i64" or o.endswith("xi64>") for o in offsets), (kernel, offsets)
