"""Triton split-KV decode over a paged KV cache, with an fp8 cache dequantized in the kernel.

The cache is vLLM's and flash-attn's layout: k_pages and v_pages (num_pages, page, kv_heads, head_dim),
a block table (batch, pages per sequence) int32 naming the physical page of each sequence's logical
page, and each sequence's context length. Key j of sequence b lives in page block_table[b, j // page]
at slot j % page, so a tile of keys may span pages, each row found through the table.

fp8 (e4m3) pages carry one float32 scale per kv head (a per-tensor scale repeated): the values are
exact in the queries' dtype, so the kernel multiplies the scores by the key scale and the output by the
value scale rather than dequantizing each element. The rest follows kernels/attention.py's split-KV
decode: one program per (slice of a sequence's keys, kv head) for all the group's query heads, then the
shared log-sum-exp reduction (with the heads' sink logits when given).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from opbench.kernels.attention import (_DECODE_CONFIGS, _INTERPRETER_DECODE_BLOCKS, _M_INIT, _block_d, _launch,
                                       _num_splits, _scales, reduce_splits)


@triton.jit
def _paged_decode_split(Q, K, V, BLOCK_TABLE, KV_LENS, K_SCALE, V_SCALE, PART_O, PART_LSE, qk_scale, batch,
                        kv_heads, page, window, num_splits, stride_qb, stride_qh, stride_bt,
                        stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                        FP8: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """Stage 1: one slice of one sequence's visible keys, for the GROUP query heads of one kv head."""
    split = tl.program_id(0)
    bkv = tl.program_id(1)
    off_b = bkv // kv_heads
    off_kvh = bkv % kv_heads
    ctx = tl.load(KV_LENS + off_b)
    lo = tl.maximum(ctx - window, 0)
    per_split = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    heads = off_kvh * GROUP + offs_h
    q_mask = (offs_h[:, None] < GROUP) & d_mask[None, :]
    off_b64 = off_b.to(tl.int64)
    q = tl.load(Q + off_b64 * stride_qb + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)
    table = BLOCK_TABLE + off_b64 * stride_bt
    kvh64 = off_kvh.to(tl.int64)
    score_scale = qk_scale
    if FP8:
        score_scale = qk_scale * tl.load(K_SCALE + off_kvh)

    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    m_i = tl.full((BLOCK_H,), _M_INIT, dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        live = cols < end
        phys = tl.load(table + cols // page, mask=live, other=0).to(tl.int64)
        slot = (cols % page).to(tl.int64)
        kv_mask = live[:, None] & d_mask[None, :]
        k = tl.load(K + (phys * stride_kp + slot * stride_ks + kvh64 * stride_kh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + (phys * stride_vp + slot * stride_vs + kvh64 * stride_vh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if FP8:  # e4m3 values are exact in the queries' dtype; the scales apply outside the dots
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * score_scale
        qk = tl.where(live[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    if FP8:
        acc = acc * tl.load(V_SCALE + off_kvh)

    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
    part = (off_b64 * kv_heads * GROUP + heads.to(tl.int64)) * num_splits + split
    tl.store(PART_O + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=q_mask)
    tl.store(PART_LSE + part, lse, mask=offs_h < GROUP)


_PAGED_KEY = ["batch", "kv_heads", "page", "window", "num_splits", "GROUP", "HEAD_DIM", "FP8", "INPUT_PRECISION"]
_paged_tuned = triton.autotune(_DECODE_CONFIGS, key=_PAGED_KEY)(_paged_decode_split)


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                           kv_lens: torch.Tensor, *, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, window: int = 0, scale: float | None = None,
                           sinks: torch.Tensor | None = None, num_splits: int | None = None,
                           input_precision: str = "ieee") -> torch.Tensor:
    """One new token per sequence against a paged cache.

    q (batch, heads, 1, d); k_pages, v_pages (num_pages, page, kv_heads, d), fp8 with k_scale and v_scale
    (kv_heads,) float32; block_table (batch, pages per sequence) int32; kv_lens (batch,) int32, the new
    token included. Returns (batch, heads, 1, d) in q's dtype."""
    (batch, heads, q_len, head_dim), (_, page, kv_heads, dk) = q.shape, k_pages.shape
    if q_len != 1 or dk != head_dim or v_pages.shape != k_pages.shape or heads % kv_heads:
        raise ValueError(f"paged decode: q {tuple(q.shape)} (one query), pages {tuple(k_pages.shape)} and "
                         f"{tuple(v_pages.shape)}: head_dim must match and heads be a multiple of kv_heads")
    if block_table.dtype != torch.int32 or block_table.shape[0] != batch or kv_lens.dtype != torch.int32:
        raise ValueError("paged decode: block_table (batch, pages) and kv_lens (batch,) must be int32")
    if q.stride(-1) != 1 or k_pages.stride(-1) != 1 or v_pages.stride(-1) != 1 or block_table.stride(-1) != 1:
        raise ValueError("paged decode needs head_dim (and the block table's rows) contiguous")
    fp8 = k_pages.dtype == torch.float8_e4m3fn
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an fp8 cache needs k_scale and v_scale (kv_heads,) float32")
    group = heads // kv_heads
    kv_len = block_table.shape[1] * page
    splits = num_splits or _num_splits(batch, kv_heads, kv_len, q.device)
    _, qk_scale = _scales(head_dim, scale)
    part_o = torch.empty((batch, heads, splits, head_dim), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((batch, heads, splits), device=q.device, dtype=torch.float32)
    o = torch.empty_like(q)
    _launch(_paged_decode_split, _paged_tuned, (splits, batch * kv_heads), q, k_pages, v_pages, block_table, kv_lens,
            k_scale if fp8 else kv_lens, v_scale if fp8 else kv_lens, part_o, part_lse, qk_scale, batch, kv_heads,
            page, window if window else kv_len + 1, splits, *q.stride()[:2], block_table.stride(0),
            *k_pages.stride()[:3], *v_pages.stride()[:3],
            FP8=fp8, GROUP=group, HEAD_DIM=head_dim, INPUT_PRECISION=input_precision,
            BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=_block_d(head_dim),
            interpreter_blocks=_INTERPRETER_DECODE_BLOCKS)
    reduce_splits(part_o, part_lse, o, sinks)
    return o
