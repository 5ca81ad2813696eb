"""The quantized ops' Triton kernels against their float64 dequantized references, under TRITON_INTERPRET=1
on a CPU (tests/conftest.py), at odd shapes: N odd, K a multiple of the int4 group (128) but not of the
interpreter's BLOCK_K (256), M 1 and 17 (split-K decode) and 80 (the prefill kernel). fp32 and fp16
activations only: the interpreter computes bf16 dots wrongly. The torch backends run through their op
families as a benchmark case does (gate and all)."""

import pytest
import torch

from opbench.measure.gate import check
from opbench.ops import packing
from opbench.ops.act_quant import ACT_QUANT, ActQuantShape
from opbench.ops.dequant import DEQUANT, DequantShape
from opbench.ops.dtypes import NF4_CODES, get_dtype
from opbench.ops.wgemm import WGEMM, WGemmShape

pytest.importorskip("triton")

N, K = 45, 384
ACTS = {"fp32": torch.float32, "fp16": torch.float16}


def rel_err(out, ref) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("m", [1, 17, 80])
@pytest.mark.parametrize("act", ["fp32", "fp16"])
def test_triton_wgemm_int4_and_int8(m, act):
    """Groups of 128 under tiles of 256 inputs: each tile's rows gather their groups' scales."""
    from opbench.kernels.wgemm import wgemm_int4, wgemm_int8

    torch.manual_seed(m)
    dtype = ACTS[act]
    x, w = torch.randn(m, K, dtype=dtype), torch.randn(N, K) * 0.05
    q = packing.quantize_int4(w, 128, dtype)
    y = wgemm_int4(x, packing.pack_int4(q.codes), q.scales, q.zeros, 128)
    tol = 1e-5 if act == "fp32" else 2e-3
    assert y.dtype == dtype and rel_err(y, x.double() @ packing.dequantize_int4(q).t()) < tol
    q8, s8 = packing.quantize_int8(w)
    s8 = s8.to(dtype)
    y8 = wgemm_int8(x, q8, s8)
    assert rel_err(y8, x.double() @ packing.dequantize_int8(q8, s8).t()) < tol


@pytest.mark.parametrize("m", [1, 80])
def test_triton_wgemm_int4_one_group_a_tile(m):
    """Groups of 512 over tiles of 256: a tile takes one row of scales; K = 1536, three groups."""
    from opbench.kernels.wgemm import wgemm_int4

    torch.manual_seed(m)
    x, w = torch.randn(m, 1536), torch.randn(N, 1536) * 0.05
    q = packing.quantize_int4(w, 512, torch.float32)
    y = wgemm_int4(x, packing.pack_int4(q.codes), q.scales, q.zeros, 512)
    assert rel_err(y, x.double() @ packing.dequantize_int4(q).t()) < 1e-5


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("fmt", ["fp8", "fp8-row", "fp8-block"])
def test_triton_scaled_gemm(m, fmt):
    """fp8 operands (the interpreter loads them right); K = 320: the last 128-group is partial."""
    from opbench.kernels.scaled_gemm import scaled_gemm

    torch.manual_seed(m)
    d = get_dtype(fmt)
    k = 320
    qa, sa = packing.quantize_fp8(torch.randn(m, k), d.act_block)
    qb, sb = packing.quantize_fp8(torch.randn(N, k), d.scale_block)
    y = scaled_gemm(qa, qb, sa, sb, group_k=packing.block_dims(d.act_block, m, k)[1],
                    group_n=packing.block_dims(d.scale_block, N, k)[0], out_dtype=torch.float32)
    ref = packing.dequantize_fp8(qa, sa, d.act_block) @ packing.dequantize_fp8(qb, sb, d.scale_block).t()
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("group", [128, 320])
def test_triton_act_quant(group):
    """The interpreter's fp32 -> fp8 cast drops the carry into the exponent (124.3 becomes 64), so the
    kernel writes fp16 here and torch casts: the scales and the division are the kernel's."""
    from opbench.kernels.act_quant import act_quant

    torch.manual_seed(group)
    x = torch.randn(17, 320, dtype=torch.float16)
    q, s = act_quant(x, group, torch.float16)
    ref_q, ref_s = ACT_QUANT.reference({"x": x}, get_dtype("fp8-row" if group == 320 else "fp8-block"), "fwd")
    assert torch.allclose(s.double(), ref_s, rtol=1e-6)
    assert check(q.to(torch.float8_e4m3fn), ref_q, 2e-2).passed


def test_triton_dequant_nf4():
    from opbench.kernels.dequant import dequant_nf4

    torch.manual_seed(5)
    codes, absmax = packing.quantize_nf4(torch.randn(N, 192), 64)
    y = dequant_nf4(packing.pack_int4(codes), absmax, torch.tensor(NF4_CODES), 64, torch.float32)
    assert rel_err(y, packing.dequantize_nf4(codes, absmax, 64)) < 1e-7


@pytest.mark.parametrize("fmt, m", [("int8", 1), ("int8", 17), ("int4", 1), ("int4", 17)])
def test_torch_wgemm_backend_passes_the_gate_on_cpu(fmt, m):
    """torch's CPU packed kernels (the smoke run's W8A16 / W4A16), N a multiple of 16 as their layout needs."""
    dtype, shape = get_dtype(fmt), WGemmShape(m, 48, 256)
    backend = WGEMM.backends["torch"]
    assert backend.requires(shape, dtype, "cpu") is None
    inp = WGEMM.inputs(shape, dtype, "fwd", "cpu")
    out = backend.prepare(inp, dtype, "fwd")()
    assert out.dtype == torch.bfloat16 and check(out, WGEMM.reference(inp, dtype, "fwd"), dtype.tol).passed


@pytest.mark.parametrize("fmt", ["fp8", "fp8-row", "fp8-block"])
def test_torch_act_quant_and_dequant_backends(fmt):
    dtype = get_dtype(fmt)
    inp = ACT_QUANT.inputs(ActQuantShape(17, 320), dtype, "fwd", "cpu")
    assert check(ACT_QUANT.backends["torch"].prepare(inp, dtype, "fwd")(),
                 ACT_QUANT.reference(inp, dtype, "fwd"), dtype.tol).passed
    nf4 = get_dtype("nf4")
    inp = DEQUANT.inputs(DequantShape(45, 192), nf4, "fwd", "cpu")
    assert check(DEQUANT.backends["torch"].prepare(inp, nf4, "fwd")(), DEQUANT.reference(inp, nf4, "fwd"),
                 nf4.tol).passed
