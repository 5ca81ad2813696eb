"""Triton weight-only GEMMs (W8A16, W4A16): y = x @ dequant(W)^T with the dequantization inside the K loop.

Each program loads a (BLOCK_K, BLOCK_N) tile of the packed weight, turns it into the activation dtype
in registers ((code - 8) x scale + zero per group of K for int4, q x scale per output channel for
int8, the scale applied once after the loop) and feeds it to tl.dot with the activation tile: the
weight crosses HBM at its storage bits, which is the whole point at decode sizes.

At M <= 64 (decode) the K loop is split across SPLIT_K programs, as in kernels/matmul.py's split-K
kernel: a short GEMM is the weight's bytes over HBM bandwidth only if enough programs stream it. The
splits add fp32 partial sums atomically into a zeroed buffer; the last split of a tile to arrive (a
counter per tile) writes the output. Each split takes whole BLOCK_K blocks; only the tail of K is
masked. Where BLOCK_K divides the group a tile takes one row of scales and zeros; otherwise each row of
the tile gathers its own (GROUP is a compile-time constant, so the choice costs nothing at run time).

Offsets are int64. Under TRITON_INTERPRET=1 one small configuration with an uneven split runs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _wgemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, sum_ptr, count_ptr, M, N, K, GROUP: tl.constexpr,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ym, stride_yn,
    INT4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """INT4: w_ptr holds (N, K / 2) bytes, code of even k in the low nibble; s, z (N, K / GROUP).
    Else w_ptr holds int8 (N, K) and s one scale per row of W (z unused)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (rows % M).to(tl.int64)  # wrapped: out-of-range rows and columns read valid memory, never stored
    offs_n = (cols % N).to(tl.int64)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = (k0 + offs_k).to(tl.int64)
        in_k = ks < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk, mask=in_k[None, :], other=0.0)
        if INT4:
            byte = tl.load(w_ptr + offs_n[None, :] * stride_wn + (ks[:, None] // 2) * stride_wk,
                           mask=in_k[:, None], other=0)
            code = ((byte >> ((ks[:, None] % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
            if GROUP % BLOCK_K == 0:  # the tile lies in one group: one scale and zero per column
                g = k0 // GROUP
                s = tl.load(s_ptr + offs_n[None, :] * stride_sn + g * stride_sg)
                z = tl.load(z_ptr + offs_n[None, :] * stride_sn + g * stride_sg)
            else:  # the tile spans groups: each row of it gathers its own
                g = ks[:, None] // GROUP
                s = tl.load(s_ptr + offs_n[None, :] * stride_sn + g * stride_sg, mask=in_k[:, None], other=0.0)
                z = tl.load(z_ptr + offs_n[None, :] * stride_sn + g * stride_sg, mask=in_k[:, None], other=0.0)
            w = ((code - 8.0) * s.to(tl.float32) + z.to(tl.float32)).to(x.dtype)
        else:  # int8 values are exact in the activation dtype; the row scale comes after the loop
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + ks[:, None] * stride_wk,
                        mask=in_k[:, None], other=0).to(x.dtype)
        acc = tl.dot(x, w, acc)
    if not INT4:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn).to(tl.float32)[None, :]

    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    y_ptrs = y_ptr + rows64[:, None] * stride_ym + cols64[None, :] * stride_yn
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        sum_ptrs = sum_ptr + rows64[:, None] * N + cols64[None, :]
        tl.atomic_add(sum_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds before the one counter bump (release / acquire)
        arrived = tl.atomic_add(count_ptr + tile.to(tl.int64), 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.load(sum_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)


def _config(bm, bn, bk, split, stages=4, warps=4):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_stages=stages,
                         num_warps=warps)


_DECODE_MAX_M = 64
# Decode: the smallest BLOCK_M (set per launch) and deep splits; prefill: square-ish tiles, no split.
_DECODE_CONFIGS = [_config(0, bn, bk, split) for bn, bk in ((64, 128), (128, 128), (64, 256), (32, 256))
                   for split in (1, 2, 4, 8, 16)]
_PREFILL_CONFIGS = [_config(128, 128, 64, 1), _config(128, 256, 64, 1, 3, 8), _config(64, 128, 64, 1),
                    _config(128, 64, 128, 1), _config(64, 64, 128, 1)]
_KEY = ["M", "N", "K", "GROUP", "INT4"]
_INTERPRETER_DECODE = {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 2}
_INTERPRETER_PREFILL = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1}


def _with_block_m(configs, block_m):
    return [triton.Config({**c.kwargs, "BLOCK_M": block_m}, num_stages=c.num_stages, num_warps=c.num_warps)
            for c in configs]


_tuned: dict = {}


def _kernel_for(block_m: int | None):
    """The autotuned kernel of a decode BLOCK_M (None: prefill); the sums and counters are zeroed before
    every benchmarked launch, as each leaves its own behind."""
    if block_m not in _tuned:
        configs = _PREFILL_CONFIGS if block_m is None else _with_block_m(_DECODE_CONFIGS, block_m)
        _tuned[block_m] = triton.autotune(configs=configs, key=_KEY, reset_to_zero=["sum_ptr", "count_ptr"])(
            _wgemm_kernel)
    return _tuned[block_m]


def _launch(x, w, s, z, group, int4: bool, w_strides, s_strides, n: int) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"wgemm takes 2-D activations, got {tuple(x.shape)}")
    M, K = x.shape
    y = torch.empty((M, n), device=x.device, dtype=x.dtype)
    decode = M <= _DECODE_MAX_M
    block_m = max(16, triton.next_power_of_2(M)) if decode else None
    tiles = triton.cdiv(M, block_m or 32) * triton.cdiv(n, 32)  # the narrowest BLOCK_M / BLOCK_N of any config
    scratch = torch.zeros(M * n + tiles if decode else 1, device=x.device, dtype=torch.float32)
    sums, counts = scratch[:M * n], scratch[M * n:].view(torch.int32)
    args = (x, w, s, z, y, sums, counts, M, n, K, group, *x.stride(), *w_strides, *s_strides, *y.stride())

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    if os.environ.get("TRITON_INTERPRET") == "1":
        meta = {**_INTERPRETER_DECODE, "BLOCK_M": block_m} if decode else _INTERPRETER_PREFILL
        _wgemm_kernel[grid](*args, INT4=int4, **meta)
    else:
        _kernel_for(block_m)[grid](*args, INT4=int4)
    return y


def wgemm_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (q (N, K) int8 x scales (N,))^T, in x's dtype."""
    if q.shape[1] != x.shape[1] or scales.shape != (q.shape[0],):
        raise ValueError(f"wgemm_int8: x {tuple(x.shape)}, q {tuple(q.shape)}, scales {tuple(scales.shape)}")
    return _launch(x, q, scales, scales, 1, False, q.stride(), (scales.stride(0), 0), q.shape[0])


def wgemm_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group: int) -> torch.Tensor:
    """x (M, K) @ W^T, W (N, K) = (code - 8) x scale + zero per group of K; packed (N, K / 2) two codes a
    byte, even k in the low nibble; scales and zeros (N, K / group)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if x.shape[1] != k or k % group or scales.shape != (n, k // group) or zeros.shape != scales.shape:
        raise ValueError(f"wgemm_int4: x {tuple(x.shape)}, packed {tuple(packed.shape)}, group {group}, "
                         f"scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}")
    return _launch(x, packed, scales, zeros, group, True, packed.stride(), scales.stride(), n)
