"""Triton activation quantization to fp8: per token, or per group of 128 features (DeepSeek-V3), the scale
computed from each group's absmax in the same pass that casts it.

One program per (token, group): it reads the group once, takes amax / 448 as the scale, writes the fp8
values and the fp32 scale. A per-token group is the whole row, BLOCK the row rounded up to a power of
two (masked). Per-tensor scaling needs the amax of the whole tensor before any value is cast, a second
pass this kernel does not make.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, F, GROUP, stride_xm, stride_qm, stride_sm, FP8_MAX_V: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < GROUP) & (cols < F)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX_V, 1e-12)
    q = tl.clamp(x / scale, -FP8_MAX_V, FP8_MAX_V)
    tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + group, scale)


def act_quant(x: torch.Tensor, group: int, fp8: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (T, F) fp8, scales (T, ceil(F / group)) fp32) of x (T, F), rows contiguous; group: the features
    one scale covers (F for per-token scales)."""
    if x.ndim != 2 or x.stride(1) != 1:
        raise ValueError(f"act_quant takes a 2-D tensor with contiguous rows, got {tuple(x.shape)}")
    T, F = x.shape
    groups = triton.cdiv(F, group)
    q = torch.empty((T, F), device=x.device, dtype=fp8)
    s = torch.empty((T, groups), device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(group)
    _act_quant_kernel[(T, groups)](x, q, s, F, group, x.stride(0), q.stride(0), s.stride(0), FP8_MAX_V=FP8_MAX,
                                   BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return q, s
