"""Triton RMSNorm and LayerNorm baselines over rows of a 2-D tensor, with an optional fused residual add.

Forward: one program per row holds the whole row in registers (widths up to 65536), so the input is
read once; statistics are kept in fp32. With a residual, h = x + residual is written out (the new
residual stream) and normalised, as inference stacks fuse the two; the statistics come from h as
written, rounded to its dtype, as an unfused add then norm would compute them.

Backward: each program walks a contiguous block of rows, writing dx and accumulating its share of
dweight (and dbias) in fp32 registers; the per-program partial sums are added up afterwards, which
avoids atomics on the weight gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_WIDTH = 65536  # a row must fit in one program's registers


@triton.jit
def _norm_fwd_kernel(
    X, R, W, B, Y, H, MEAN, RSTD,
    stride_x, stride_r, stride_y, stride_h, N, eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row x stride overflows int32 on large inputs
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = (x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        # Normalise h as stored, rounded to its dtype: the backward recomputes the normalised input
        # from that h and these statistics. Taken from the unrounded sum instead, a row of near-zero
        # variance (rstd up to 1/sqrt(eps)) would turn h's rounding into a wrong gradient.
        x = h.to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        if SAVE_STATS:
            tl.store(MEAN + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
    if SAVE_STATS:
        tl.store(RSTD + row, rstd)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DRES, DX, DW_PART, DB_PART,
    stride_dy, stride_x, stride_dres, stride_dx, M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        wdy = w * dy
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
        if IS_RMS:
            dx = (wdy - xhat * (tl.sum(xhat * wdy, axis=0) / N)) * rstd
        else:
            dx = (wdy - (xhat * (tl.sum(xhat * wdy, axis=0) / N) + tl.sum(wdy, axis=0) / N)) * rstd
        if HAS_DRES:  # the gradient reaching the residual output joins the one through the norm
            dx += tl.load(DRES + row * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, db, mask=mask)


class NormOutput(NamedTuple):
    y: torch.Tensor
    residual: torch.Tensor | None  # x + residual, when a residual was given
    mean: torch.Tensor | None  # fp32 per-row statistics, when save_stats (mean: LayerNorm only)
    rstd: torch.Tensor | None


def _check_rows(name: str, t: torch.Tensor, rows: int, width: int) -> None:
    if t.ndim != 2 or t.shape != (rows, width) or (width > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be a ({rows}, {width}) tensor with contiguous rows, got {tuple(t.shape)} "
                         f"with strides {t.stride()}")


def _check_vector(name: str, t: torch.Tensor, length: int, dtype: torch.dtype | None = None) -> None:
    """A per-column (weight, bias) or per-row (mean, rstd) vector: the kernels read `length`
    contiguous elements of it, so a shorter one would be read past its end."""
    if t.ndim != 1 or t.shape[0] != length or (length > 1 and t.stride(0) != 1) or (dtype and t.dtype != dtype):
        want = f"a contiguous ({length},){f' {dtype}' if dtype else ''} tensor"
        raise ValueError(f"{name} must be {want}, got {tuple(t.shape)} {t.dtype} with strides {t.stride()}")


def _block(width: int) -> tuple[int, int]:
    if width > MAX_WIDTH:
        raise ValueError(f"rows wider than {MAX_WIDTH} elements are not supported (got {width})")
    block = triton.next_power_of_2(width)
    return block, min(max(block // 256, 1), 16)


def _norm(x, weight, bias, residual, eps, save_stats, is_rms) -> NormOutput:
    if x.ndim != 2:
        raise ValueError(f"x must be a (rows, width) tensor, got {tuple(x.shape)}")
    (M, N), device = x.shape, x.device
    _check_rows("x", x, M, N)
    if residual is not None:
        _check_rows("residual", residual, M, N)
    _check_vector("weight", weight, N)
    if bias is not None:
        _check_vector("bias", bias, N)
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    mean = torch.empty(M, device=device, dtype=torch.float32) if save_stats and not is_rms else None
    rstd = torch.empty(M, device=device, dtype=torch.float32) if save_stats else None
    block, warps = _block(N)
    # Absent tensors are passed as x: the constexpr flags compile their uses away.
    _norm_fwd_kernel[(M,)](
        x, residual if residual is not None else x, weight, bias if bias is not None else weight, y,
        h if h is not None else y, mean if mean is not None else x, rstd if rstd is not None else x,
        x.stride(0), residual.stride(0) if residual is not None else 0,
        y.stride(0), h.stride(0) if h is not None else 0, N, eps,
        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, SAVE_STATS=save_stats,
        BLOCK_N=block, num_warps=warps,
    )
    return NormOutput(y, h, mean, rstd)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float, residual: torch.Tensor | None = None,
             save_stats: bool = False) -> NormOutput:
    """y = h / sqrt(mean(h^2) + eps) * weight with h = x (+ residual)."""
    return _norm(x, weight, None, residual, eps, save_stats, is_rms=True)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float,
               residual: torch.Tensor | None = None, save_stats: bool = False) -> NormOutput:
    """y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias with h = x (+ residual)."""
    return _norm(x, weight, bias, residual, eps, save_stats, is_rms=False)


def _programs(rows: int, device: torch.device) -> int:
    """Programs of the backward: enough to fill the GPU; few under the interpreter."""
    if device.type == "cuda":
        return min(rows, 2 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 2)


def _norm_backward(dy, x, weight, mean, rstd, dresidual, has_bias, is_rms):
    if x.ndim != 2:
        raise ValueError(f"h must be a (rows, width) tensor, got {tuple(x.shape)}")
    (M, N), device = x.shape, x.device
    for name, t in (("h", x), ("dy", dy), ("dresidual", dresidual)):
        if t is not None:
            _check_rows(name, t, M, N)
    _check_vector("weight", weight, N)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t is not None:
            _check_vector(name, t, M, torch.float32)
    dx = torch.empty_like(x)
    programs = _programs(M, device)
    rows_per_program = triton.cdiv(M, programs)
    dw_part = torch.empty(programs, N, device=device, dtype=torch.float32)
    db_part = torch.empty(programs, N, device=device, dtype=torch.float32) if has_bias else None
    block, warps = _block(N)
    _norm_bwd_kernel[(programs,)](
        dy, x, weight, mean if mean is not None else rstd, rstd, dresidual if dresidual is not None else dy,
        dx, dw_part, db_part if db_part is not None else dw_part,
        dy.stride(0), x.stride(0), dresidual.stride(0) if dresidual is not None else 0, dx.stride(0),
        M, N, rows_per_program,
        IS_RMS=is_rms, HAS_DRES=dresidual is not None, HAS_BIAS=has_bias, BLOCK_N=block, num_warps=warps,
    )
    dw = dw_part.sum(0).to(weight.dtype)
    return (dx, dw, db_part.sum(0).to(weight.dtype)) if has_bias else (dx, dw)


def rms_norm_backward(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *,
                      dresidual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of rms_norm, from its normalised input h and saved rstd.

    With a fused residual, dx is the gradient of both x and residual, and `dresidual` is the gradient
    reaching the residual output h from the layers after it.
    """
    return _norm_backward(dy, h, weight, None, rstd, dresidual, has_bias=False, is_rms=True)


def layer_norm_backward(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor, *, dresidual: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of layer_norm; see rms_norm_backward for the residual."""
    return _norm_backward(dy, h, weight, mean, rstd, dresidual, has_bias=True, is_rms=False)
