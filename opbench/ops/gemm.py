"""GEMM: C[M, N] = A[M, K] @ B[K, N], the linear layers of a model.

A linear layer y = x W^T (x: tokens x in, W: out x in) is, in training, three GEMMs whose operand
layouts differ, so each pass gets the layout a framework really hands to the library:
  fwd   (tokens, out, in)   A = x row-major,    B = W^T (W row-major)   "NT"
  dgrad (tokens, in, out)   A = dy row-major,   B = W row-major         "NN"
  wgrad (in, out, tokens)   A = x^T,            B = dy row-major        "TN"
Scaled dtypes (fp8) always use "NT", the only layout torch._scaled_mm takes, and write their
activation dtype (bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opbench.ops.dtypes import DType
from opbench.ops.base import OpFamily, all_of, high_precision, needs_capability, needs_triton_gpu, tf32_needs_cuda


@dataclass(frozen=True)
class GemmShape:
    m: int
    n: int
    k: int


def flops(shape: GemmShape, pass_: str = "fwd") -> int:
    """2MNK: one multiply and one add per term of each output."""
    return 2 * shape.m * shape.n * shape.k


def bytes_moved(shape: GemmShape, dtype: DType, pass_: str = "fwd") -> int:
    """A and B read once at their storage bits, C written once in the activation dtype (fp8 GEMMs
    write bf16)."""
    return dtype.bytes_of(shape.m * shape.k + shape.k * shape.n) + dtype.activation.bytes_of(shape.m * shape.n)


def inputs(shape: GemmShape, dtype: DType, pass_: str, device: str) -> dict:
    m, n, k = shape.m, shape.n, shape.k
    storage = torch.float32 if dtype.scaled else dtype.torch  # scaled values are quantized from fp32

    def randn(*size):
        return torch.randn(*size, device=device, dtype=storage)

    layout = "NT" if dtype.scaled else {"fwd": "NT", "dgrad": "NN", "wgrad": "TN"}[pass_]
    a = randn(m, k) if layout[0] == "N" else randn(k, m).t()
    b = randn(k, n) if layout[1] == "N" else randn(n, k).t()
    if dtype.scaled:
        a, b = a.to(dtype.torch), b.to(dtype.torch)
    return {"a": a, "b": b}


def reference(inp: dict, dtype: DType, pass_: str) -> torch.Tensor:
    return high_precision(inp["a"]) @ high_precision(inp["b"])


GEMM = OpFamily(
    name="gemm", shape_type=GemmShape, flops=flops, bytes=bytes_moved, inputs=inputs, reference=reference,
    dtypes=("bf16", "fp16", "fp32", "tf32", "fp8"),
)


def _scaled_mm_shape(shape: GemmShape, dtype: DType, device: str) -> str | None:
    if dtype.scaled and (shape.m % 16 or shape.n % 16 or shape.k % 16):
        return f"torch._scaled_mm needs M, N, K multiples of 16 (got {shape.m}x{shape.n}x{shape.k})"
    return None


@GEMM.backend("torch", impl="torch.matmul (cuBLAS/cuBLASLt on CUDA, the CPU BLAS on CPU); fp8: torch._scaled_mm",
              requires=all_of(tf32_needs_cuda, needs_capability, _scaled_mm_shape))
def torch_matmul(inp: dict, dtype: DType, pass_: str):
    a, b = inp["a"], inp["b"]
    if dtype.scaled:
        one = torch.ones((), device=a.device, dtype=torch.float32)
        out = dtype.activation.torch
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=out)
    return lambda: torch.matmul(a, b)


@GEMM.backend("triton", impl="opbench/kernels/matmul.py, autotuned per (M, N, K, layouts, precision); split-K at M <= 64",
              requires=all_of(needs_triton_gpu, needs_capability))
def triton_matmul(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.matmul import matmul

    a, b = inp["a"], inp["b"]
    out_dtype = dtype.activation.torch
    precision = "tf32" if dtype.tf32 else "ieee"
    return lambda: matmul(a, b, out_dtype=out_dtype, input_precision=precision)
