"""Triton grouped GEMM baseline over the contiguous layout: expert e's rows of A are offs[e-1]..offs[e]
(int32 cumulative ends), its operand B[e]; fp32 accumulation.

grouped_gemm        C[rows_e] = A[rows_e] @ B[e]        (the forward with B = W^T, the dgrad with B = W)
grouped_gemm_wgrad  dW[e] = dY[rows_e]^T @ X[rows_e]    (ragged along the reduction)

The M tiles of every expert are numbered one after another (an expert of m rows owns ceil(m / BLOCK_M)
of them), so a program finds its expert by counting the experts whose tiles end at or before its
own: experts without rows own no tile and their weights are never read. The grid's upper bound
(ceil(rows / BLOCK_M) + experts tiles) needs no copy of the counts to the host; programs past the
last tile return at once. BLOCK_M follows the mean rows per expert (decode: a few rows, prefill:
hundreds); on a GPU the other tile sizes are autotuned, under TRITON_INTERPRET=1 one small
configuration is used.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_kernel(
    a_ptr, b_ptr, c_ptr, offs_ptr, tile_ends_ptr, E, N, K,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    experts = tl.arange(0, E_POW2)
    tile_ends = tl.load(tile_ends_ptr + experts, mask=experts < E, other=2**30)
    e = tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0)
    if e >= E:  # past the last expert's tiles
        return
    first_tile = tl.load(tile_ends_ptr + e - 1, mask=e > 0, other=0)
    row_start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    row_end = tl.load(offs_ptr + e)

    rows = row_start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = rows < row_end
    col_mask = cols < N
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _wgrad_kernel(
    dy_ptr, x_ptr, dw_ptr, offs_ptr, N, K,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    e = tl.program_id(0)
    pid = tl.program_id(1)
    tiles_k = tl.cdiv(K, BLOCK_K)
    ns = (pid // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = (pid % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = ns < N
    k_mask = ks < K
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offs_ptr + e)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):  # an expert without rows leaves acc at zero
        ms = m0 + tl.arange(0, BLOCK_M)
        m_mask = ms < end
        ms64 = ms.to(tl.int64)
        dyt = tl.load(dy_ptr + ms64[None, :] * stride_dym + ns[:, None] * stride_dyn,
                      mask=m_mask[None, :] & n_mask[:, None], other=0.0)
        x = tl.load(x_ptr + ms64[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(dyt, x, acc, input_precision=INPUT_PRECISION)

    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def _config(bn, bk, stages, warps):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)


_GPU_CONFIGS = [
    _config(128, 64, 3, 8),
    _config(128, 64, 4, 4),
    _config(64, 64, 4, 4),
    _config(64, 128, 3, 4),
    _config(128, 128, 3, 8),
    _config(256, 64, 3, 8),
    _config(32, 128, 4, 4),
]
_grouped_autotuned = triton.autotune(configs=_GPU_CONFIGS, key=["N", "K", "BLOCK_M"])(_grouped_kernel)
_wgrad_autotuned = triton.autotune(configs=_GPU_CONFIGS, key=["N", "K", "BLOCK_M"])(_wgrad_kernel)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRETER_META = {"BLOCK_N": 32, "BLOCK_K": 32}


def block_m(rows: int, groups: int) -> int:
    """M tile from the mean rows per expert: 16 for decode-sized groups up to 128 for prefill."""
    if _INTERPRETED:
        return 16
    mean = rows / max(groups, 1)
    return 16 if mean <= 16 else 32 if mean <= 32 else 64 if mean <= 64 else 128


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, input_precision: str = "ieee"
                 ) -> torch.Tensor:
    """a (rows, K) sorted by group, b (groups, K, N) of any strides, offs (groups,) int32 cumulative
    row ends -> (rows, N). Rows past offs[-1] are left unwritten."""
    if a.ndim != 2 or b.ndim != 3 or a.shape[1] != b.shape[1] or offs.shape != (b.shape[0],):
        raise ValueError(f"grouped_gemm needs a (rows, K), b (groups, K, N), offs (groups,); got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}, {tuple(offs.shape)}")
    (M, K), (E, _, N) = a.shape, b.shape
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return c
    bm = block_m(M, E)
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    tile_ends = torch.cumsum(torch.div(counts + bm - 1, bm, rounding_mode="floor"), 0, dtype=torch.int32)
    tiles_m = triton.cdiv(M, bm) + E  # at least the tiles the experts own, known without a host sync

    def grid(meta):
        return (tiles_m, triton.cdiv(N, meta["BLOCK_N"]))

    args = (a, b, c, offs, tile_ends, E, N, K, *a.stride(), *b.stride(), *c.stride())
    meta = dict(E_POW2=triton.next_power_of_2(E), BLOCK_M=bm, INPUT_PRECISION=input_precision)
    if _INTERPRETED:
        _grouped_kernel[grid](*args, **meta, **_INTERPRETER_META)
    else:
        _grouped_autotuned[grid](*args, **meta)
    return c


def grouped_gemm_wgrad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, *,
                       input_precision: str = "ieee") -> torch.Tensor:
    """dy (rows, N), x (rows, K), offs (groups,) -> dW (groups, N, K) = dy[rows_e]^T x[rows_e] per group;
    a group without rows gets zeros."""
    if dy.ndim != 2 or x.ndim != 2 or dy.shape[0] != x.shape[0] or offs.ndim != 1:
        raise ValueError(f"grouped_gemm_wgrad needs dy (rows, N), x (rows, K), offs (groups,); got "
                         f"{tuple(dy.shape)}, {tuple(x.shape)}, {tuple(offs.shape)}")
    N, K, E = dy.shape[1], x.shape[1], offs.shape[0]
    dw = torch.empty((E, N, K), device=x.device, dtype=x.dtype)

    def grid(meta):
        return (E, triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]))

    args = (dy, x, dw, offs, N, K, *dy.stride(), *x.stride(), *dw.stride())
    meta = dict(BLOCK_M=32 if _INTERPRETED else 64, INPUT_PRECISION=input_precision)
    if _INTERPRETED:
        _wgrad_kernel[grid](*args, **meta, **_INTERPRETER_META)
    else:
        _wgrad_autotuned[grid](*args, **meta)
    return dw
