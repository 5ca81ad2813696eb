"""Triton scaled fp8 GEMM, the baseline of the scaled_gemm family: y = (a x sa) @ (b x sb)^T with scales
per tensor, per row / channel, or per block (DeepSeek-V3: 1 x 128 groups of a, 128 x 128 blocks of b).

One kernel covers every granularity through the scales' strides: a's scale of (row m, K group g) sits at
sa + m x stride_sam + g x stride_sag, b's of (column n, K group g) at sb + (n // GROUP_N) x stride_sbn +
g x stride_sbg; a stride of 0 makes a dimension share one scale. Each BLOCK_K step lies within one K
group (BLOCK_K divides GROUP_K), so its fp32 partial product takes the two scales before it is added:
the fp8 values go to the tensor cores as they are, the scales never touch the dot's inputs.

Offsets are int64; under TRITON_INTERPRET=1 one small configuration runs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _scaled_gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, y_ptr, M, N, K, GROUP_K, GROUP_N,
    stride_am, stride_ak, stride_bn, stride_bk, stride_sam, stride_sag, stride_sbn, stride_sbg,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # groups of GROUP_M tile rows share b's tiles in L2
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % size_m
    tile_n = (pid % per_group) // size_m
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (rows % M).to(tl.int64)
    offs_n = (cols % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + offs_k).to(tl.int64)
        in_k = ks < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak, mask=in_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + ks[:, None] * stride_bk, mask=in_k[:, None], other=0.0)
        g = k0 // GROUP_K
        sa = tl.load(sa_ptr + offs_m * stride_sam + g * stride_sag)
        sb = tl.load(sb_ptr + (offs_n // GROUP_N) * stride_sbn + g * stride_sbg)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _config(bm, bn, bk, stages=4, warps=4, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_stages=stages,
                         num_warps=warps)


_CONFIGS = [_config(128, 128, 128, 3, 8), _config(128, 256, 128, 3, 8), _config(64, 128, 128, 4),
            _config(128, 64, 128, 4), _config(64, 64, 128, 4), _config(16, 64, 128, 4), _config(16, 128, 128, 4),
            _config(128, 128, 64, 4, 8)]


def _prune(configs, named_args, **kwargs):
    """A BLOCK_K step must lie within one K group of the scales (any does where one group spans K)."""
    group, k = named_args["GROUP_K"], named_args["K"]
    return [c for c in configs if group >= k or group % c.kwargs["BLOCK_K"] == 0] or configs[-1:]


_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "GROUP_K", "GROUP_N"],
                         prune_configs_by={"early_config_prune": _prune})(_scaled_gemm_kernel)
_INTERPRETER_META = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}


def scaled_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, *,
                group_k: int, group_n: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(a x scale_a) @ (b x scale_b)^T. a (M, K), b (N, K); scale_a (M or 1, K / group_k or 1),
    scale_b (N / group_n or 1, K / group_k or 1), fp32. group_k: the inputs one scale covers (K for
    per-tensor and per-row scales); group_n: the output columns one of b's scales covers."""
    (M, K), N = a.shape, b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"scaled_gemm: a {tuple(a.shape)}, b {tuple(b.shape)}")
    y = torch.empty((M, N), device=a.device, dtype=out_dtype)
    sa = scale_a.reshape(scale_a.shape[0], -1) if scale_a.ndim else scale_a.reshape(1, 1)
    sb = scale_b.reshape(scale_b.shape[0], -1) if scale_b.ndim else scale_b.reshape(1, 1)
    strides_a = (sa.stride(0) if sa.shape[0] > 1 else 0, sa.stride(1) if sa.shape[1] > 1 else 0)
    strides_b = (sb.stride(0) if sb.shape[0] > 1 else 0, sb.stride(1) if sb.shape[1] > 1 else 0)
    args = (a, b, sa, sb, y, M, N, K, group_k, group_n, *a.stride(), *b.stride(), *strides_a, *strides_b,
            *y.stride())

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if os.environ.get("TRITON_INTERPRET") == "1":
        _scaled_gemm_kernel[grid](*args, **_INTERPRETER_META)
    else:
        _tuned[grid](*args)
    return y
