"""The dtypes cases run in: storage, the activations beside it, scales, tolerance, math mode and what a
GPU needs to run it.

Every op and module asks a DType what it is (its storage bits, the dtype its activations travel in,
whether scales ride along, the capability its matmul needs, what an op without kernels for it runs
in); none tests a dtype by its name, so a new format is one entry of DTYPES.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    name: str  # short label used in case ids: bf16, fp16, fp32, tf32, fp8
    torch_name: str  # attribute of torch holding the storage dtype
    bits: int  # storage bits of one element: 4-bit weights are half a byte
    tol: float  # relative error (Frobenius norm) the correctness gate accepts
    tf32: bool = False  # fp32 storage with TF32 tensor-core math
    # The dtype activations travel in between ops, where it is not this one: fp8 GEMMs take and
    # write bf16 activations, so the tensors a layer hands on (residual stream, all-reduces, KV
    # cache) stay bf16.
    activations: str | None = None
    # Scales ride along with the values: the values are quantized from higher-precision ones, and a
    # GEMM takes the scales as arguments (torch._scaled_mm, whose only operand layout is "NT").
    scaled: bool = False
    min_capability: tuple[int, int] | None = None  # the CUDA compute capability its matmul needs
    fallback: str | None = None  # what an op without kernels for this dtype runs in instead

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.torch_name)

    @property
    def bytes(self) -> int:
        """Bytes of one element, for dtypes of whole bytes; packed formats count with bytes_of()."""
        if self.bits % 8:
            raise ValueError(f"{self.name} packs {self.bits} bits an element: count its bytes with bytes_of()")
        return self.bits // 8

    def bytes_of(self, elements: int) -> int:
        """Bytes of `elements` values in storage, a partial last byte counted whole."""
        return -(-elements * self.bits // 8)

    @property
    def activation(self) -> DType:
        """The dtype of the activations a workload of this dtype passes between ops."""
        return get_dtype(self.activations) if self.activations else self

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """The dtypes an op without kernels for this one runs in, in order of preference."""
        chain, name = [], self.fallback
        while name is not None and name not in chain:
            chain.append(name)
            name = get_dtype(name).fallback
        return tuple(chain)

    @property
    def plain(self) -> bool:
        """torch's eager ops compute in it as stored: no scales to carry, no math mode to set."""
        return not (self.scaled or self.tf32)

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
    DType("bf16", "bfloat16", 16, 1e-2),
    DType("fp16", "float16", 16, 1e-2),
    DType("fp32", "float32", 32, 1e-5),
    DType("tf32", "float32", 32, 2e-3, tf32=True, fallback="fp32"),
    # e4m3 inputs; the reference uses the same quantized inputs, so the error is the output rounding
    # (bf16) plus accumulation order. Its tensor-core matmul came with Ada and Hopper (sm_89, sm_90).
    DType("fp8", "float8_e4m3fn", 8, 2e-2, activations="bf16", scaled=True, min_capability=(8, 9),
          fallback="bf16"),
)}


def get_dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})") from None
