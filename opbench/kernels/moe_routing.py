"""Triton baselines of MoE routing where one kernel replaces a chain of torch ops.

route              router logits -> softmax or sigmoid scores -> top-k -> renormalised weights, one
                   program per token (torch: a softmax, a topk and a division, each a pass over memory);
route_backward     the logits' gradient from the weights', scores and choices recomputed in the program
unpermute_combine  out[t] = sum_j weight[t, j] x y[row_of[t * top_k + j]]: the expert outputs gathered
                   back to token order and weighted in one pass (torch: a gather of top_k copies of every
                   row, then a multiply and a sum over them);
combine_backward   each copy's gradient (its weight times its token's) and each weight's (a dot product)
Math is fp32 whatever the storage type.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, E, stride_t, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                  SIGMOID: tl.constexpr, RENORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < E
    x = tl.load(logits_ptr + t * stride_t + cols, mask=mask, other=-float("inf")).to(tl.float32)
    if SIGMOID:
        p = tl.sigmoid(x)
    else:
        z = tl.exp(x - tl.max(x, axis=0))
        p = z / tl.sum(z, axis=0)
    p = tl.where(mask, p, -1.0)  # scores are >= 0: a masked column is never chosen
    # the top-k one at a time, the lowest index on a tie (as torch.topk on distinct scores)
    total = 0.0
    left = p
    for _ in tl.static_range(TOP_K):
        best = tl.max(left, axis=0)
        total += best
        pick = tl.min(tl.where(left == best, cols, BLOCK_E), axis=0)
        left = tl.where(cols == pick, -1.0, left)
    scale = 1.0 / total if RENORM else 1.0
    left = p
    for j in tl.static_range(TOP_K):
        best = tl.max(left, axis=0)
        pick = tl.min(tl.where(left == best, cols, BLOCK_E), axis=0)
        left = tl.where(cols == pick, -1.0, left)
        tl.store(weights_ptr + t * TOP_K + j, best * scale)
        tl.store(ids_ptr + t * TOP_K + j, pick.to(tl.int64))


def route(logits: torch.Tensor, top_k: int, *, sigmoid: bool = False, renorm: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (tokens, experts) -> (weights fp32, ids int64), each (tokens, top_k) in decreasing score."""
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be (tokens, experts) with contiguous rows, got {tuple(logits.shape)}")
    tokens, experts = logits.shape
    weights = torch.empty((tokens, top_k), device=logits.device, dtype=torch.float32)
    ids = torch.empty((tokens, top_k), device=logits.device, dtype=torch.int64)
    if tokens:
        _route_kernel[(tokens,)](logits, weights, ids, experts, logits.stride(0), TOP_K=top_k,
                                 BLOCK_E=triton.next_power_of_2(experts), SIGMOID=sigmoid, RENORM=renorm, num_warps=1)
    return weights, ids


@triton.jit
def _route_bwd_kernel(logits_ptr, dweights_ptr, dlogits_ptr, E, stride_t, stride_dt, TOP_K: tl.constexpr,
                      BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr, RENORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < E
    x = tl.load(logits_ptr + t * stride_t + cols, mask=mask, other=-float("inf")).to(tl.float32)
    if SIGMOID:
        p = tl.sigmoid(x)
    else:
        z = tl.exp(x - tl.max(x, axis=0))
        p = z / tl.sum(z, axis=0)
    p = tl.where(mask, p, 0.0)
    # the chosen columns and each one's incoming gradient, in the forward's order
    left = tl.where(mask, p, -1.0)
    chosen = tl.zeros((BLOCK_E,), dtype=tl.float32)
    dw = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(left, axis=0)
        pick = tl.min(tl.where(left == best, cols, BLOCK_E), axis=0)
        left = tl.where(cols == pick, -1.0, left)
        chosen = tl.where(cols == pick, 1.0, chosen)
        dw = tl.where(cols == pick, tl.load(dweights_ptr + t * TOP_K + j).to(tl.float32), dw)
    if RENORM:  # w = p / S over the chosen: dp = (dw - sum(dw w)) / S
        total = tl.sum(p * chosen, axis=0)
        dp = chosen * (dw - tl.sum(dw * p * chosen, axis=0) / total) / total
    else:
        dp = chosen * dw
    if SIGMOID:
        dx = dp * p * (1.0 - p)
    else:
        dx = p * (dp - tl.sum(dp * p, axis=0))
    tl.store(dlogits_ptr + t * stride_dt + cols, dx.to(dlogits_ptr.dtype.element_ty), mask=mask)


def route_backward(logits: torch.Tensor, dweights: torch.Tensor, top_k: int, *, sigmoid: bool = False,
                   renorm: bool = True) -> torch.Tensor:
    """The gradient of route()'s weights with respect to the logits, given the weights' gradient."""
    tokens, experts = logits.shape
    dlogits = torch.empty_like(logits)
    if tokens:
        _route_bwd_kernel[(tokens,)](logits, dweights.contiguous(), dlogits, experts, logits.stride(0),
                                     dlogits.stride(0), TOP_K=top_k, BLOCK_E=triton.next_power_of_2(experts),
                                     SIGMOID=sigmoid, RENORM=renorm, num_warps=1)
    return dlogits


@triton.jit
def _combine_kernel(y_ptr, row_of_ptr, weights_ptr, out_ptr, H, stride_y, stride_out,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(row_of_ptr + t * TOP_K + j).to(tl.int64)
        w = tl.load(weights_ptr + t * TOP_K + j).to(tl.float32)
        acc += w * tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def unpermute_combine(y: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y (copies, hidden) in expert order, row_of (tokens x top_k,) the row of each copy, weights
    (tokens, top_k) -> (tokens, hidden)."""
    tokens, top_k = weights.shape
    hidden = y.shape[1]
    if y.stride(1) != 1 or row_of.numel() != tokens * top_k:
        raise ValueError(f"y must have contiguous rows and row_of {tokens} x {top_k} entries, got "
                         f"{tuple(y.shape)} and {tuple(row_of.shape)}")
    out = torch.empty((tokens, hidden), device=y.device, dtype=y.dtype)
    block = min(triton.next_power_of_2(hidden), 4096)
    if tokens:
        _combine_kernel[(tokens, triton.cdiv(hidden, block))](y, row_of, weights.contiguous(), out, hidden,
                                                               y.stride(0), out.stride(0), TOP_K=top_k,
                                                               BLOCK_H=block, num_warps=4)
    return out


@triton.jit
def _combine_bwd_kernel(dout_ptr, y_ptr, row_of_ptr, weights_ptr, dy_ptr, dweights_ptr, H,
                        stride_dout, stride_y, stride_dy, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(TOP_K):
        row = tl.load(row_of_ptr + t * TOP_K + j).to(tl.int64)
        w = tl.load(weights_ptr + t * TOP_K + j).to(tl.float32)
        dot = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = cols < H
            g = tl.load(dout_ptr + t * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + row * stride_dy + cols, (w * g).to(dy_ptr.dtype.element_ty), mask=mask)
            dot += g * y
        tl.store(dweights_ptr + t * TOP_K + j, tl.sum(dot, axis=0).to(dweights_ptr.dtype.element_ty))


def combine_backward(dout: torch.Tensor, y: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of unpermute_combine's output dout (tokens, hidden) -> (dy (copies, hidden), dweights)."""
    tokens, top_k = weights.shape
    hidden = y.shape[1]
    dy = torch.empty_like(y)
    dweights = torch.empty_like(weights)
    block = min(triton.next_power_of_2(hidden), 1024)
    if tokens:
        _combine_bwd_kernel[(tokens,)](dout, y, row_of, weights.contiguous(), dy, dweights, hidden, dout.stride(0),
                                       y.stride(0), dy.stride(0), TOP_K=top_k, BLOCK_H=block, num_warps=4)
    return dy, dweights
