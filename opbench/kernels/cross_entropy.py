"""Triton cross-entropy baseline over the vocabulary: per-row loss = logsumexp(logits) - logits[target].

At large vocabularies the logits are the largest activation of a training step, so neither pass
makes an fp32 copy of them: the forward streams each row in chunks with an online max and sum of
exponentials and keeps only the row's logsumexp; the backward streams the row again and writes
(softmax - onehot) x dloss in the logits' own dtype, over the logits themselves when asked (they
are not needed after the loss), so it allocates nothing of the logits' size.

Targets equal to ignore_index (-100 by default, as in torch.nn.functional.cross_entropy) mark rows
that take no part (padding): loss 0 and gradient 0, and their logits are not read. Any other target
outside [0, vocab) is an error: raised before the launch when the targets are on the CPU; on a GPU
that check would cost a device synchronisation per call (and cannot run inside a CUDA-graph
capture), so there the kernels never read outside the row and give such a row a NaN loss and NaN
gradients instead, and fail a device assertion when Triton compiles in debug mode (TRITON_DEBUG=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default


@triton.jit
def _ce_fwd_kernel(LOGITS, TARGETS, LOSS, LSE, stride, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row x stride overflows int32 at training sizes
    logits = LOGITS + row * stride
    target = tl.load(TARGETS + row).to(tl.int64)
    counted = target != ignore_index
    in_row = (target >= 0) & (target < V)
    tl.device_assert(in_row | (target == ignore_index), "cross_entropy: target out of range")
    m = float("-inf")
    s = 0.0
    for start in range(0, tl.where(counted, V, 0), BLOCK_V):  # an ignored row is not read
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = tl.where(counted, m + tl.log(tl.where(counted, s, 1.0)), 0.0)
    x_target = tl.load(logits + target, mask=counted & in_row, other=float("nan")).to(tl.float32)
    tl.store(LOSS + row, tl.where(counted, lse - x_target, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd_kernel(LOGITS, DLOGITS, TARGETS, LSE, DLOSS, stride, stride_d, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride
    dlogits = DLOGITS + row * stride_d
    lse = tl.load(LSE + row)
    target = tl.load(TARGETS + row).to(tl.int64)
    counted = target != ignore_index
    in_row = (target >= 0) & (target < V)
    tl.device_assert(in_row | (target == ignore_index), "cross_entropy: target out of range")
    # Ignored rows get zeros without reading their logits; a target out of range spreads NaN over its row.
    dloss = tl.where(counted, tl.load(DLOSS + row).to(tl.float32), 0.0)
    dloss = tl.where(counted & ((target < 0) | (target >= V)), float("nan"), dloss)
    read = tl.where(counted, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        p = tl.exp(tl.load(logits + cols, mask=cols < read, other=0.0).to(tl.float32) - lse)
        grad = (p - tl.where(cols == target, 1.0, 0.0)) * dloss
        tl.store(dlogits + cols, grad.to(DLOGITS.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be (rows, vocab) with contiguous rows, got {tuple(logits.shape)} "
                         f"with strides {logits.stride()}")
    if targets.shape != logits.shape[:1] or targets.dtype not in (torch.int32, torch.int64) \
            or not targets.is_contiguous():
        raise ValueError(f"targets must be ({logits.shape[0]},) integers, got {tuple(targets.shape)} {targets.dtype}")
    if targets.device.type == "cpu":  # free here; on a GPU it would synchronise (see the module's docstring)
        _check_targets(targets, logits.shape[1], ignore_index)


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets must be in [0, {vocab}) or ignore_index ({ignore_index}): row {row} has "
                         f"{int(targets[row])}")


def _block(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), 4096)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and the rows' logsumexp (kept for the backward), both fp32 (rows,). Rows whose
    target is ignore_index have loss 0 (and logsumexp 0, not computed); torch's reduction="mean" is
    loss.sum() / (targets != ignore_index).sum()."""
    _check(logits, targets, ignore_index)
    rows, vocab = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    _ce_fwd_kernel[(rows,)](logits, targets, loss, lse, logits.stride(0), vocab, ignore_index,
                            BLOCK_V=_block(vocab), num_warps=8)
    return loss, lse


def cross_entropy_backward(dloss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, *,
                           inplace: bool = False, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """d(loss)/d(logits) given the per-row loss gradients dloss, in the logits' dtype (zero on rows whose
    target is ignore_index); inplace writes it over the logits."""
    _check(logits, targets, ignore_index)
    rows, vocab = logits.shape
    if dloss.shape != (rows,) or lse.shape != (rows,) or not (dloss.is_contiguous() and lse.is_contiguous()):
        raise ValueError(f"dloss and lse must be contiguous ({rows},), got {tuple(dloss.shape)} and {tuple(lse.shape)}")
    dlogits = logits if inplace else torch.empty_like(logits)
    _ce_bwd_kernel[(rows,)](logits, dlogits, targets, lse, dloss, logits.stride(0), dlogits.stride(0), vocab,
                            ignore_index, BLOCK_V=_block(vocab), num_warps=8)
    return dlogits
