"""Triton cross-entropy baseline over the vocabulary: per-row loss = logsumexp(logits) - logits[target].

At large vocabularies the logits are the largest activation of a training step, so neither pass
makes an fp32 copy of them: the forward streams each row in chunks with an online max and sum of
exponentials and keeps only the row's logsumexp; the backward streams the row again and writes
(softmax - onehot) x dloss in the logits' own dtype, over the logits themselves when asked (they
are not needed after the loss), so it allocates nothing of the logits' size.
Every target must be a valid column (no ignore index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_fwd_kernel(LOGITS, TARGETS, LOSS, LSE, stride, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row x stride overflows int32 at training sizes
    logits = LOGITS + row * stride
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(TARGETS + row)
    tl.store(LOSS + row, lse - tl.load(logits + target).to(tl.float32))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd_kernel(LOGITS, DLOGITS, TARGETS, LSE, DLOSS, stride, stride_d, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride
    dlogits = DLOGITS + row * stride_d
    lse = tl.load(LSE + row)
    dloss = tl.load(DLOSS + row).to(tl.float32)
    target = tl.load(TARGETS + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        p = tl.exp(tl.load(logits + cols, mask=mask, other=0.0).to(tl.float32) - lse)
        grad = (p - tl.where(cols == target, 1.0, 0.0)) * dloss
        tl.store(dlogits + cols, grad.to(DLOGITS.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be (rows, vocab) with contiguous rows, got {tuple(logits.shape)} "
                         f"with strides {logits.stride()}")
    if targets.shape != logits.shape[:1] or targets.dtype not in (torch.int32, torch.int64) \
            or not targets.is_contiguous():
        raise ValueError(f"targets must be ({logits.shape[0]},) integers, got {tuple(targets.shape)} {targets.dtype}")


def _block(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), 4096)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and the rows' logsumexp (kept for the backward), both fp32 (rows,)."""
    _check(logits, targets)
    rows, vocab = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    _ce_fwd_kernel[(rows,)](logits, targets, loss, lse, logits.stride(0), vocab, BLOCK_V=_block(vocab), num_warps=8)
    return loss, lse


def cross_entropy_backward(dloss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, *,
                           inplace: bool = False) -> torch.Tensor:
    """d(loss)/d(logits) given the per-row loss gradients dloss, in the logits' dtype; inplace writes
    it over the logits."""
    _check(logits, targets)
    rows, vocab = logits.shape
    if dloss.shape != (rows,) or lse.shape != (rows,) or not (dloss.is_contiguous() and lse.is_contiguous()):
        raise ValueError(f"dloss and lse must be contiguous ({rows},), got {tuple(dloss.shape)} and {tuple(lse.shape)}")
    dlogits = logits if inplace else torch.empty_like(logits)
    _ce_bwd_kernel[(rows,)](logits, dlogits, targets, lse, dloss, logits.stride(0), dlogits.stride(0), vocab,
                            BLOCK_V=_block(vocab), num_warps=8)
    return dlogits
