"""Triton NF4 dequantization (QLoRA's frozen base weights): codes packed two a byte, an fp32 absmax per
block of 64, out to the activation dtype for the GEMM that follows.

One program per BLOCK bytes of the packed weight: it reads them once, looks both nibbles up in the
16-entry NF4 table (held in a small tensor, gathered), scales them by their block's absmax and writes
the pair interleaved. The bytes moved are the packed codes, the absmax and the output: a bandwidth
kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_nf4_kernel(p_ptr, absmax_ptr, table_ptr, y_ptr, n_bytes, BLOCK_SIZE_HALF: tl.constexpr,
                        BLOCK: tl.constexpr):
    """p: the (n, k / 2) codes flattened, even element in the low nibble; absmax: one per BLOCK_SIZE_HALF
    bytes (a block of 2 x that many values); y: (n, k) flattened."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(p_ptr + offs, mask=mask, other=0)
    scale = tl.load(absmax_ptr + offs // BLOCK_SIZE_HALF, mask=mask, other=0.0)
    low = tl.load(table_ptr + (byte & 0xF).to(tl.int32), mask=mask, other=0.0) * scale
    high = tl.load(table_ptr + (byte >> 4).to(tl.int32), mask=mask, other=0.0) * scale
    tl.store(y_ptr + 2 * offs, low.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + 2 * offs + 1, high.to(y_ptr.dtype.element_ty), mask=mask)


def dequant_nf4(packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, block: int = 64,
                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The (n, k) weight of packed (n, k / 2) NF4 codes, absmax (n, k / block) fp32, table the 16 NF4
    values (fp32, on the device)."""
    n, half = packed.shape
    if (2 * half) % block or absmax.numel() != n * 2 * half // block or not packed.is_contiguous():
        raise ValueError(f"dequant_nf4: packed {tuple(packed.shape)}, absmax {tuple(absmax.shape)}, block {block}")
    y = torch.empty((n, 2 * half), device=packed.device, dtype=out_dtype)
    n_bytes = packed.numel()
    BLOCK = 1024
    _dequant_nf4_kernel[(triton.cdiv(n_bytes, BLOCK),)](packed, absmax, table, y, n_bytes,
                                                          BLOCK_SIZE_HALF=block // 2, BLOCK=BLOCK)
    return y
