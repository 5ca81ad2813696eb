"""Attention: softmax(Q K^T / sqrt(d)) V with GQA, causal masking and sliding windows.

Causal masks are aligned bottom-right, as in decode and chunked prefill: query i of q_len sits at
position kv_len - q_len + i and sees the keys at or before it (the last `window` of them when a
sliding window is set).
"""

from __future__ import annotations

from dataclasses import dataclass

from opbench.dtypes import DType


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    q_len: int
    kv_len: int
    causal: int  # 1: causal, 0: every query sees every key
    window: int  # 0: no sliding window


def shape_id(s: AttentionShape) -> str:
    tail = ("c" if s.causal else "") + (f"w{s.window}" if s.window else "")
    return f"b{s.batch}h{s.heads}kv{s.kv_heads}d{s.head_dim}q{s.q_len}k{s.kv_len}{tail}"


def _sum_min(lo: int, hi: int, cap: int) -> int:
    """sum of min(p + 1, cap) for p in [lo, hi] (0 <= lo)."""
    if hi < lo:
        return 0
    split = min(hi, cap - 1)  # p <= split: the term is p + 1; above it, cap
    total = 0
    if split >= lo:
        total += (lo + 1 + split + 1) * (split - lo + 1) // 2
    if hi > max(split, lo - 1):
        total += cap * (hi - max(split + 1, lo) + 1)
    return total


def attended_pairs(s: AttentionShape) -> int:
    """Query-key pairs one head of one sequence computes: q_len x avg_kv."""
    if not s.causal:
        return s.q_len * (min(s.kv_len, s.window) if s.window else s.kv_len)
    cap = s.window if s.window else s.kv_len
    first = s.kv_len - s.q_len  # position of the first query; queries at negative positions see nothing
    return _sum_min(max(first, 0), s.kv_len - 1, cap)


def avg_kv(s: AttentionShape) -> float:
    """Mean number of keys each query attends."""
    return attended_pairs(s) / s.q_len


def flops(s: AttentionShape, pass_: str = "fwd") -> int:
    """4 x batch x heads x head_dim x (q_len x avg_kv): QK^T and PV, 2 FLOPs a multiply-add each.
    The backward recomputes QK^T and adds dV, dP, dQ, dK: 2.5 x forward."""
    fwd = 4 * s.batch * s.heads * s.head_dim * attended_pairs(s)
    return fwd if pass_ == "fwd" else fwd * 5 // 2


def kv_rows_read(s: AttentionShape) -> int:
    """Keys (and values) a kernel must read per sequence and kv head: the window's reach, or all."""
    if s.window:
        return min(s.kv_len, s.window + s.q_len - 1)
    return s.kv_len


def bytes_moved(s: AttentionShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: Q and O (heads), K and V (kv_heads) once each; decode thus reads the whole KV cache.
    bwd: Q, O, dO read and dQ written; K, V read and dK, dV written."""
    q_side = s.batch * s.heads * s.q_len * s.head_dim
    kv_side = s.batch * s.kv_heads * kv_rows_read(s) * s.head_dim
    if pass_ == "fwd":
        return (2 * q_side + 2 * kv_side) * dtype.bytes
    return (4 * q_side + 4 * kv_side) * dtype.bytes
