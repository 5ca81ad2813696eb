"""Scaled fp8 GEMM: y[M, N] = (a x sa)[M, K] @ ((b x sb)[N, K])^T, the linear layers of a model served in
fp8 with real scales: per tensor (fp8), per token x per output channel (fp8-row), or 1 x 128 activation
groups x 128 x 128 weight blocks (fp8-block, DeepSeek-V3's recipe).

The case dtype is the weight format; its DType says where the scales sit (act_block for a, scale_block
for b). Activations arrive quantized (act_quant, planned before the GEMM); the output is the
activation dtype. The gate compares with the product of the dequantized operands in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opbench.ops import packing
from opbench.ops.base import OpFamily, all_of, high_precision_dtype, needs_capability, needs_triton_gpu, probe
from opbench.ops.dtypes import DType


@dataclass(frozen=True)
class ScaledGemmShape:
    m: int  # tokens
    n: int  # out features
    k: int  # in features


def flops(shape: ScaledGemmShape, pass_: str = "fwd") -> int:
    """2MNK, those of the dense GEMM (the scales' multiplies are not counted)."""
    return 2 * shape.m * shape.n * shape.k


def act_scales(dtype: DType, m: int, k: int) -> int:
    """Scales of an (m tokens, k) activation under the format's act_block."""
    rows, cols = packing.block_dims(dtype.act_block, m, k)
    return -(-m // rows) * -(-k // cols)


def bytes_moved(shape: ScaledGemmShape, dtype: DType, pass_: str = "fwd") -> int:
    """a and b at their storage bits with their scales at theirs; y written in the activation dtype."""
    m, n, k = shape.m, shape.n, shape.k
    a = dtype.bytes_of(m * k) + -(-act_scales(dtype, m, k) * dtype.scale_bits // 8)
    return a + dtype.weight_bytes(n, k) + dtype.activation.bytes_of(m * n)


def inputs(shape: ScaledGemmShape, dtype: DType, pass_: str, device: str) -> dict:
    a = torch.randn(shape.m, shape.k, device=device)
    b = torch.randn(shape.n, shape.k, device=device) * 0.05
    qa, sa = packing.quantize_fp8(a, dtype.act_block, dtype.torch)
    qb, sb = packing.quantize_fp8(b, dtype.scale_block, dtype.torch)
    return {"a": qa, "sa": sa, "b": qb, "sb": sb}


def reference(inp: dict, dtype: DType, pass_: str) -> torch.Tensor:
    hp = high_precision_dtype(inp["a"].device)
    a = packing.dequantize_fp8(inp["a"], inp["sa"], dtype.act_block).to(hp)
    b = packing.dequantize_fp8(inp["b"], inp["sb"], dtype.scale_block).to(hp)
    return a @ b.t()


SCALED_GEMM = OpFamily(name="scaled_gemm", shape_type=ScaledGemmShape, flops=flops, bytes=bytes_moved,
                       inputs=inputs, reference=reference, dtypes=("fp8", "fp8-row", "fp8-block"), weight_format=True)


def _recipes(dtype: DType):
    """torch.nn.functional.scaled_mm's scaling types of a and b for the format."""
    kinds = {(0, 0): "TensorWise", (1, 0): "RowWise", (1, 128): "BlockWise1x128", (128, 128): "BlockWise128x128"}
    return getattr(F.ScalingType, kinds[dtype.act_block]), getattr(F.ScalingType, kinds[dtype.scale_block])


def _torch_scaled(shape: ScaledGemmShape, dtype: DType, device: str) -> str | None:
    if shape.m % 16 or shape.n % 16 or shape.k % 16:
        return f"torch's scaled_mm needs M, N, K multiples of 16 (got {shape.m}x{shape.n}x{shape.k})"
    if dtype.act_block != (0, 0) and not hasattr(F, "scaled_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm (row and block scales)"
    block_n, block_k = dtype.scale_block
    if (block_n and shape.n % block_n) or (block_k and shape.k % block_k):
        return (f"torch's block-scaled fp8 GEMM needs whole {block_n} x {block_k} blocks "
                f"(N={shape.n}, K={shape.k})")
    if dtype.scale_block == (128, 128) and device == "cuda" and torch.cuda.get_device_capability()[0] != 9:
        return "torch's 128 x 128 block-scaled fp8 GEMM runs on Hopper (sm_90) only"
    if device != "cuda":
        return None  # needs_capability has the reason
    tiny = ScaledGemmShape(128, 128, 128)
    failed = probe(("scaled_mm", dtype.name), lambda: torch_scaled(inputs(tiny, dtype, "fwd", device), dtype, "fwd")())
    return f"torch's scaled GEMM does not take {dtype.name} scales here ({failed})" if failed else None


@SCALED_GEMM.backend("torch", impl="torch._scaled_mm (per tensor); torch.nn.functional.scaled_mm with row-wise or "
                                   "1x128 / 128x128 block-wise scaling (cuBLASLt / CUTLASS)",
                     requires=all_of(needs_capability, _torch_scaled))
def torch_scaled(inp: dict, dtype: DType, pass_: str):
    a, b, sa, sb = inp["a"], inp["b"].t(), inp["sa"], inp["sb"]
    out = dtype.activation.torch
    if dtype.act_block == (0, 0):
        sa0, sb0 = sa.reshape(()), sb.reshape(())
        return lambda: torch._scaled_mm(a, b, scale_a=sa0, scale_b=sb0, out_dtype=out)
    recipe_a, recipe_b = _recipes(dtype)
    if dtype.act_block == (1, 0):  # (M, 1) and (1, N)
        sa, sb = sa.reshape(-1, 1), sb.reshape(1, -1)
    else:  # blockwise: a's scales outer-dim-major as cuBLASLt takes them, b's (K / 128, N / 128)
        sa, sb = sa.t().contiguous().t(), sb.t()
    return lambda: F.scaled_mm(a, b, sa, recipe_a, sb, recipe_b, output_dtype=out)


@SCALED_GEMM.backend("triton", impl="opbench/kernels/scaled_gemm.py: one kernel for tensor, row and block scales, "
                                    "each BLOCK_K partial product scaled before it is added",
                     requires=all_of(needs_triton_gpu, needs_capability))
def triton_scaled(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.scaled_gemm import scaled_gemm

    a, b, sa, sb = inp["a"], inp["b"], inp["sa"], inp["sb"]
    m, k = a.shape
    group_k = packing.block_dims(dtype.act_block, m, k)[1]
    group_n = packing.block_dims(dtype.scale_block, b.shape[0], k)[0]
    out = dtype.activation.torch
    return lambda: scaled_gemm(a, b, sa, sb, group_k=group_k, group_n=group_n, out_dtype=out)
