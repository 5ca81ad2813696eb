"""Triton MLP activation baselines: SwiGLU and GeGLU over a fused [gate | up] row, and plain GELU.

The gated forms take the output of the fused gate/up projection, (rows, 2 * width) with the gate in
the first half, and write (rows, width); the backward writes the gradient of the whole fused row.
GELU is the tanh approximation (GPT-2/3, Gemma). Math is fp32 whatever the storage type.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("silu", "gelu_tanh")


@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """act(x) and act'(x).

    gelu_tanh(x) = 0.5 x (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3), written as
    x sigmoid(2z) since 0.5 (1 + tanh(z)) = sigmoid(2z): the core language has no tanh.
    """
    if ACT == "gelu_tanh":
        s = tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 sqrt(2/pi)
        da = s + x * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * x * x)  # 0.134145 = 3 x 0.044715
    else:
        s = tl.sigmoid(x)
        da = s * (1.0 + x * (1.0 - s))
    return x * s, da


@triton.jit
def _act_fwd_kernel(X, Y, stride_x, stride_y, N, ACT: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y, _ = _act_and_grad(g, ACT)
    if GATED:
        y *= tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(X, DY, DX, stride_x, stride_dy, stride_dx, N,
                    ACT: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    if GATED:
        u = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, (dy * u * da).to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + row * stride_dx + N + cols, (dy * a).to(DX.dtype.element_ty), mask=mask)
    else:
        tl.store(DX + row * stride_dx + cols, (dy * da).to(DX.dtype.element_ty), mask=mask)


def _launch_shape(x: torch.Tensor, gated: bool, act: str) -> tuple[int, int, tuple[int, int], int]:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")
    if x.ndim != 2 or x.stride(1) != 1 or (gated and x.shape[1] % 2):
        raise ValueError(f"x must be a (rows, {'2 x ' if gated else ''}width) tensor with contiguous rows, "
                         f"got {tuple(x.shape)} with strides {x.stride()}")
    rows, width = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    block = min(triton.next_power_of_2(width), 4096)
    return rows, width, (rows, triton.cdiv(width, block)), block


def activation(x: torch.Tensor, *, act: str, gated: bool) -> torch.Tensor:
    """gated: act(x[:, :w]) * x[:, w:] of a (rows, 2w) x; otherwise act(x)."""
    rows, width, grid, block = _launch_shape(x, gated, act)
    y = torch.empty((rows, width), device=x.device, dtype=x.dtype)
    _act_fwd_kernel[grid](x, y, x.stride(0), y.stride(0), width, ACT=act, GATED=gated, BLOCK_N=block, num_warps=4)
    return y


def activation_backward(dy: torch.Tensor, x: torch.Tensor, *, act: str, gated: bool) -> torch.Tensor:
    """Gradient of activation() with respect to x, given the gradient dy of its output."""
    rows, width, grid, block = _launch_shape(x, gated, act)
    if dy.shape != (rows, width) or dy.stride(1) != 1:
        raise ValueError(f"dy must be ({rows}, {width}) with contiguous rows, got {tuple(dy.shape)}")
    dx = torch.empty_like(x)
    _act_bwd_kernel[grid](x, dy, dx, x.stride(0), dy.stride(0), dx.stride(0), width,
                          ACT=act, GATED=gated, BLOCK_N=block, num_warps=4)
    return dx
