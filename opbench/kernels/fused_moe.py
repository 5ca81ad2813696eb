"""Triton fused MoE baseline: the token permutation fused into the grouped GEMMs, the design vLLM's Triton
fused_moe popularised.

The token copies (token t's j-th expert is copy id t * top_k + j) are sorted by expert and each
expert's run padded to a multiple of BLOCK_M with an id past the last (the alignment, done here with
torch ops: vLLM has a kernel for it); every block of BLOCK_M ids then belongs to one expert, and a
program multiplies the rows it gathers straight from the unpermuted input:
  gate/up  H[id] = X[id // top_k] @ W1[e]^T              (rows gathered: no permuted copy of X)
  act      A = silu(gate) * up                          (kernels/activation.py)
  down     Y[id] = weight[id] * (A[id] @ W2[e]^T)      (the routing weight applied in the epilogue)
  combine  out[t] = sum_j Y[t * top_k + j]
The outputs stay in copy order, so no un-permutation is needed. Blocks past the padded total and
experts without tokens cost nothing: their weights are never read.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from opbench.kernels.activation import activation


@triton.jit
def _fused_moe_kernel(
    a_ptr, b_ptr, c_ptr, weight_ptr, sorted_ids_ptr, block_expert_ptr, padded_total_ptr, copies, N, K,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    TOP_K: tl.constexpr, GATHER: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(padded_total_ptr):
        return
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = ids < copies  # the padding ids are `copies`
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    a_rows = (ids // TOP_K if GATHER else ids).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + e * stride_be + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        acc *= tl.load(weight_ptr + ids, mask=row_mask, other=0.0).to(tl.float32)[:, None]

    c_ptrs = c_ptr + ids.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _config(bn, bk, stages, warps):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)


_GPU_CONFIGS = [
    _config(64, 64, 4, 4),
    _config(128, 64, 3, 4),
    _config(128, 64, 4, 8),
    _config(64, 128, 3, 4),
    _config(128, 128, 3, 8),
    _config(32, 128, 4, 4),
]
_fused_autotuned = triton.autotune(configs=_GPU_CONFIGS, key=["N", "K", "BLOCK_M", "GATHER"])(_fused_moe_kernel)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRETER_META = {"BLOCK_N": 32, "BLOCK_K": 32}


def block_m(copies: int, experts: int) -> int:
    """M tile from the mean copies per expert, as in the grouped GEMM."""
    if _INTERPRETED:
        return 16
    mean = copies / experts
    return 16 if mean <= 16 else 32 if mean <= 32 else 64 if mean <= 64 else 128


def align(topk_ids: torch.Tensor, experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_ids, block_expert, padded_total): copy ids sorted by expert, each expert's run padded to a
    multiple of bm with the id `copies`; the expert of each block; the padded length, on the device.
    Sized by an upper bound (copies + experts (bm - 1)), so nothing waits for the host."""
    flat = topk_ids.flatten()
    copies = flat.numel()
    counts = torch.bincount(flat, minlength=experts)
    padded = torch.div(counts + bm - 1, bm, rounding_mode="floor") * bm
    padded_ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank_in_expert = torch.arange(copies, device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    capacity = triton.cdiv(copies + experts * (bm - 1), bm) * bm
    sorted_ids = torch.full((capacity,), copies, dtype=torch.int32, device=flat.device)
    sorted_ids[(padded_ends - padded)[expert_of] + rank_in_expert] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, bm, device=flat.device)
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True).clamp_(max=experts - 1).to(torch.int32)
    return sorted_ids, block_expert, padded_ends[-1:].to(torch.int32)


def _gemm(a, w, out, weight, sorted_ids, block_expert, padded_total, top_k, gather, mul_weight, bm, precision):
    """out[id] = (weight[id] x) a[row(id)] @ w[e]^T for every copy id of the aligned blocks."""
    n, k = w.shape[1], w.shape[2]

    def grid(meta):
        return (sorted_ids.numel() // bm, triton.cdiv(n, meta["BLOCK_N"]))

    args = (a, w, out, weight, sorted_ids, block_expert, padded_total, out.shape[0], n, k, *a.stride(),
            w.stride(0), w.stride(2), w.stride(1), *out.stride())
    meta = dict(TOP_K=top_k, GATHER=gather, MUL_WEIGHT=mul_weight, BLOCK_M=bm, INPUT_PRECISION=precision)
    if _INTERPRETED:
        _fused_moe_kernel[grid](*args, **meta, **_INTERPRETER_META)
    else:
        _fused_autotuned[grid](*args, **meta)


def fused_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, input_precision: str = "ieee") -> torch.Tensor:
    """The routed experts of a SwiGLU MoE layer: x (tokens, hidden), w1 (experts, 2 ffn, hidden) with the
    gate rows first, w2 (experts, hidden, ffn), topk_weights and topk_ids (tokens, top_k) -> (tokens, hidden)."""
    tokens, hidden = x.shape
    experts, up, _ = w1.shape
    top_k = topk_ids.shape[1]
    copies = tokens * top_k
    bm = block_m(copies, experts)
    sorted_ids, block_expert, padded_total = align(topk_ids, experts, bm)
    weights = topk_weights.flatten()
    h = torch.empty((copies, up), device=x.device, dtype=x.dtype)
    _gemm(x, w1, h, weights, sorted_ids, block_expert, padded_total, top_k, True, False, bm, input_precision)
    a = activation(h, act="silu", gated=True)
    y = torch.empty((copies, hidden), device=x.device, dtype=x.dtype)
    _gemm(a, w2, y, weights, sorted_ids, block_expert, padded_total, top_k, False, True, bm, input_precision)
    return y.view(tokens, top_k, hidden).sum(dim=1)
