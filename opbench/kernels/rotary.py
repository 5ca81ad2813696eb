"""Triton rotary position embedding baseline for (tokens, heads, head_dim) tensors.

Each token's (cos, sin) row is looked up by its position, so prompts, decode batches (every token
at its own sequence's position) and packed sequences take the same path. Both layouts:
  half rotation (GPT-NeoX, Llama): dimension i pairs with i + head_dim/2;
  interleaved (GPT-J): dimension 2i pairs with 2i + 1.
One program rotates a block of heads of one token; q and k (fewer heads under GQA) are two calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    X, OUT, COS, SIN, POS,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_cs, n_heads, half,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pair = tl.arange(0, BLOCK_D)  # which rotated pair of the head
    pair_ok = pair < half
    pos = tl.load(POS + token).to(tl.int64)
    cos = tl.load(COS + pos * stride_cs + pair, mask=pair_ok, other=1.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + pos * stride_cs + pair, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
    if CONJUGATE:  # rotation by -theta: the backward
        sin = -sin
    if INTERLEAVED:
        first, second = 2 * pair, 2 * pair + 1
    else:
        first, second = pair, pair + half
    mask = (heads[:, None] < n_heads) & pair_ok[None, :]
    x = X + token * stride_xt + heads[:, None] * stride_xh
    x1 = tl.load(x + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + second[None, :], mask=mask, other=0.0).to(tl.float32)
    out = OUT + token * stride_ot + heads[:, None] * stride_oh
    tl.store(out + first[None, :], (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out + second[None, :], (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, *,
           interleaved: bool = False, conjugate: bool = False) -> torch.Tensor:
    """Rotate x (tokens, heads, head_dim; any token and head strides) by the angles of each token's
    position: cos and sin are (max_position, head_dim / 2) tables, positions a (tokens,) integer
    tensor. conjugate rotates the other way (the backward). Returns a new contiguous tensor."""
    if x.ndim != 3 or x.stride(2) != 1:
        raise ValueError(f"x must be (tokens, heads, head_dim) with contiguous head_dim, got {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    tokens, heads, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    half = head_dim // 2
    if cos.shape != sin.shape or cos.ndim != 2 or cos.shape[1] != half or cos.stride() != sin.stride() \
            or cos.stride(1) != 1:
        raise ValueError(f"cos and sin must be (positions, {half}) tables of one layout, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if positions.shape != (tokens,):
        raise ValueError(f"positions must be ({tokens},), got {tuple(positions.shape)}")
    out = torch.empty((tokens, heads, head_dim), device=x.device, dtype=x.dtype)
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(heads), max(1, 2048 // block_d))
    grid = (tokens, triton.cdiv(heads, block_h))
    _rotary_kernel[grid](
        x, out, cos, sin, positions, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
        heads, half, INTERLEAVED=interleaved, CONJUGATE=conjugate, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4,
    )
    return out
