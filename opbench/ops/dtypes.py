"""The dtypes cases run in: storage type, element size, correctness tolerance, and math mode."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    name: str  # short label used in case ids: bf16, fp16, fp32, tf32, fp8
    torch_name: str  # attribute of torch holding the storage dtype
    bytes: int  # element size in bytes
    tol: float  # relative error (Frobenius norm) the correctness gate accepts
    tf32: bool = False  # fp32 storage with TF32 tensor-core math

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.torch_name)

    @contextlib.contextmanager
    def math_mode(self):
        """Enable TF32 matmul math only for the tf32 label, so fp32 cases measure true fp32."""
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("bf16", "bfloat16", 2, 1e-2),
    DType("fp16", "float16", 2, 1e-2),
    DType("fp32", "float32", 4, 1e-5),
    DType("tf32", "float32", 4, 2e-3, tf32=True),
    # e4m3 inputs; the reference uses the same quantized inputs, so the error is the output rounding
    # (bf16) plus accumulation order.
    DType("fp8", "float8_e4m3fn", 1, 2e-2),
)}


def get_dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})") from None
