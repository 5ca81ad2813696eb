"""Triton attention baselines: a flash-attention forward and backward, and a split-KV decode kernel.

Tensors are laid out (batch, heads, seq, head_dim), any strides but a contiguous head_dim; k and v
carry kv_heads heads (GQA / MQA: query head h reads kv head h // (heads // kv_heads)). Causal masks
are aligned bottom-right: query i of q_len sits at position kv_len - q_len + i and sees the keys at
or before it, the last `window` of them when a sliding window is set. head_dim need not be a power
of two: the head_dim block is padded to the next one and masked.

Scores are kept in base 2: q.k is scaled by sm_scale * log2(e) so that exp2 replaces exp, and the
saved log-sum-exp is in the same units. On a GPU the tile sizes are autotuned per shape; under
TRITON_INTERPRET=1 one small configuration is used, since autotuning the interpreter only costs time.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# Running max before any key: finite, so that a row whose keys are all masked so far gets
# exp2(-inf - _M_INIT) = 0 rather than exp2(-inf + inf) = NaN.
_M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _visible(pos, cols, kv_len, window, CAUSAL: tl.constexpr):
    """Which keys a query at position `pos` sees: inside the cache, within the window, and (causal) not after it.
    `window` is always set: the wrappers pass one longer than any sequence when there is none."""
    keep = (cols < kv_len) & (cols > pos - window)
    if CAUSAL:
        keep = keep & (cols <= pos)
    return keep


@triton.jit
def _key_range(m0, q_off, kv_len, window, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys a query tile [m0, m0 + BLOCK_M) needs, in BLOCK_N steps: [lo, hi) to visit, and within it
    [full_lo, full_hi), the blocks every query of the tile sees entirely, which need no mask."""
    pos_lo = m0 + q_off
    pos_hi = m0 + BLOCK_M - 1 + q_off
    lo = tl.maximum(pos_lo - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(pos_hi + 1, kv_len) if CAUSAL else kv_len
    full_lo = tl.maximum(tl.cdiv(tl.maximum(pos_hi - window + 1, 0), BLOCK_N) * BLOCK_N, lo)
    full_hi = tl.maximum((tl.minimum(pos_lo + 1, kv_len) if CAUSAL else kv_len) // BLOCK_N * BLOCK_N, full_lo)
    return lo, hi, full_lo, full_hi


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, pos, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, d_mask, offs_dv, dv_mask,
                start, end, kv_len, window, qk_scale,
                CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks [start, end): rescale the running sums by the new max."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = d_mask[None, :] & (cols[:, None] < kv_len) if MASKED else d_mask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        if MASKED:
            qk = tl.where(_visible(pos[:, None], cols[None, :], kv_len, window, CAUSAL), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_mask = dv_mask[None, :] & (cols[:, None] < kv_len) if MASKED else dv_mask[None, :]
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :], mask=v_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, SINKS, qk_scale, batch, heads, q_len, kv_len, window,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, CAUSAL: tl.constexpr,
              STORE_LSE: tl.constexpr, HAS_SINKS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head). V_DIM: v's width (MLA's prefill: narrower than
    q and k). A head's sink logit joins the softmax's sum after the keys, and so the saved log-sum-exp,
    with which the backward's weights are the forward's."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    off_b = (bh // heads).to(tl.int64)
    off_h = bh % heads
    off_kvh = (off_h // GROUP).to(tl.int64)
    q_off = kv_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = (offs_m[:, None] < q_len) & d_mask[None, :]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=q_mask, other=0.0)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    pos = offs_m + q_off
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < V_DIM

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), _M_INIT, dtype=tl.float32)
    lo, hi, full_lo, full_hi = _key_range(m0, q_off, kv_len, window, CAUSAL, BLOCK_M, BLOCK_N)
    args = (pos, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, d_mask, offs_dv, dv_mask)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, *args, lo, tl.minimum(full_lo, hi), kv_len, window, qk_scale,
                                CAUSAL, True, BLOCK_N, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, *args, full_lo, full_hi, kv_len, window, qk_scale,
                                CAUSAL, False, BLOCK_N, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, *args, full_hi, hi, kv_len, window, qk_scale,
                                CAUSAL, True, BLOCK_N, INPUT_PRECISION)

    if HAS_SINKS:
        sink = tl.load(SINKS + off_h) * 1.4426950408889634  # log2(e): the scores are in base 2
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(sink - m_new)
        acc = acc * alpha[:, None]
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < q_len) & dv_mask[None, :])
    if STORE_LSE:
        tl.store(LSE + bh.to(tl.int64) * q_len + offs_m, m_i + tl.log2(l_i), mask=offs_m < q_len)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, heads, q_len, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O), the softmax backward's correction term, one value per query."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    off_b = (bh // heads).to(tl.int64)
    off_h = bh % heads
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * q_len + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qm, stride_dm, offs_m, offs_d,
                 d_mask, offs_dv, dv_mask, start, end, q_len, q_off, kv_len, window, qk_scale,
                 CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dK and dV of one key block from the query blocks [start, end), working on transposed scores."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < q_len
        q_mask = row_ok[:, None] & d_mask[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dm + offs_dv[None, :], mask=row_ok[:, None] & dv_mask[None, :],
                     other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
        p_t = tl.exp2(qk_t - lse[None, :])
        if MASKED:
            p_t = tl.where(_visible((rows + q_off)[None, :], cols[:, None], kv_len, window, CAUSAL), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, qk_scale, batch, heads, kv_heads, q_len, kv_len,
                   window, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, kv head), summing over the GROUP query heads that share
    them, so dK and dV need no atomics."""
    n0 = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    off_b = (bkv // kv_heads).to(tl.int64)
    off_kvh = (bkv % kv_heads).to(tl.int64)
    q_off = kv_len - q_len

    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (cols[:, None] < kv_len) & d_mask[None, :]
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < V_DIM
    v_mask = (cols[:, None] < kv_len) & dv_mask[None, :]
    k = tl.load(K + off_b * stride_kb + off_kvh * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_kvh * stride_vh + cols[:, None] * stride_vn + offs_dv[None, :],
                mask=v_mask, other=0.0)

    # Queries that see some key of the block: [m_lo, m_hi); every key of it: [full_lo, full_hi).
    # Keys past kv_len are zeros here; they only touch their own dK, dV rows, which are not stored.
    m_lo = tl.maximum(n0 - q_off, 0) // BLOCK_M * BLOCK_M if CAUSAL else 0
    m_hi = tl.minimum(n0 + BLOCK_N - 1 + window - q_off, q_len)
    full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - q_off, 0), BLOCK_M) * BLOCK_M if CAUSAL else 0
    full_lo = tl.maximum(full_lo, m_lo)
    full_hi = tl.maximum(tl.maximum(tl.minimum(n0 + window - q_off, q_len), 0) // BLOCK_M * BLOCK_M, full_lo)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for g in range(GROUP):
        bh = off_b * heads + off_kvh * GROUP + g
        q_base = Q + off_b * stride_qb + (off_kvh * GROUP + g) * stride_qh
        do_base = DO + off_b * stride_db + (off_kvh * GROUP + g) * stride_dh
        args = (q_base, do_base, LSE + bh * q_len, DELTA + bh * q_len, stride_qm, stride_dm, offs_m, offs_d, d_mask,
                offs_dv, dv_mask)
        dk, dv = _dkdv_blocks(dk, dv, k, v, cols, *args, m_lo, tl.minimum(full_lo, m_hi),
                              q_len, q_off, kv_len, window, qk_scale, CAUSAL, True, BLOCK_M, INPUT_PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, cols, *args, full_lo, full_hi,
                              q_len, q_off, kv_len, window, qk_scale, CAUSAL, False, BLOCK_M, INPUT_PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, cols, *args, full_hi, m_hi,
                              q_len, q_off, kv_len, window, qk_scale, CAUSAL, True, BLOCK_M, INPUT_PRECISION)

    dk *= sm_scale
    tl.store(DK + off_b * stride_dkb + off_kvh * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_kvh * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, pos, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, d_mask, offs_dv,
               dv_mask, start, end, kv_len, window, qk_scale,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dQ of one query tile from the key blocks [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = d_mask[None, :] & (cols[:, None] < kv_len) if MASKED else d_mask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v_mask = dv_mask[None, :] & (cols[:, None] < kv_len) if MASKED else dv_mask[None, :]
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :], mask=v_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        if MASKED:
            p = tl.where(_visible(pos[:, None], cols[None, :], kv_len, window, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, qk_scale, batch, heads, q_len, kv_len, window,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
                 stride_dqb, stride_dqh, stride_dqm,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program: dQ of BLOCK_M queries of one (batch, head); the same key blocks as the forward."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    off_b = (bh // heads).to(tl.int64)
    off_h = bh % heads
    off_kvh = (off_h // GROUP).to(tl.int64)
    q_off = kv_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_ok = offs_m < q_len
    q_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=q_mask, other=0.0)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < V_DIM
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + offs_m[:, None] * stride_dm + offs_dv[None, :],
                 mask=row_ok[:, None] & dv_mask[None, :], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * q_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * q_len + offs_m, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    pos = offs_m + q_off

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi, full_lo, full_hi = _key_range(m0, q_off, kv_len, window, CAUSAL, BLOCK_M, BLOCK_N)
    args = (pos, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, d_mask, offs_dv, dv_mask)
    dq = _dq_blocks(dq, q, do, lse, delta, *args, lo, tl.minimum(full_lo, hi), kv_len, window, qk_scale,
                    CAUSAL, True, BLOCK_N, INPUT_PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, *args, full_lo, full_hi, kv_len, window, qk_scale,
                    CAUSAL, False, BLOCK_N, INPUT_PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, *args, full_hi, hi, kv_len, window, qk_scale,
                    CAUSAL, True, BLOCK_N, INPUT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _decode_split(Q, K, V, KV_LENS, PART_O, PART_LSE, qk_scale, batch, kv_heads, kv_len, window, num_splits,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  HAS_LENS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stage 1 of split-KV decode. One program: one slice of one sequence's visible keys, for all GROUP
    query heads of one kv head at once (the rows of the tile), so the slice is read once per group.
    Writes the slice's normalized output and log-sum-exp."""
    split = tl.program_id(0)
    bkv = tl.program_id(1)
    off_b = bkv // kv_heads
    off_kvh = bkv % kv_heads
    ctx = tl.load(KV_LENS + off_b) if HAS_LENS else kv_len
    lo = tl.maximum(ctx - window, 0)  # the new token sits at ctx - 1 and sees the last `window` keys
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
    k_base = K + off_b64 * stride_kb + off_kvh.to(tl.int64) * stride_kh
    v_base = V + off_b64 * stride_vb + off_kvh.to(tl.int64) * stride_vh

    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    m_i = tl.full((BLOCK_H,), _M_INIT, dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < end) & d_mask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        qk = tl.where(cols[None, :] < end, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    # A slice past the end of a short sequence holds no key: weight zero in the reduction.
    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
    part = (off_b64 * kv_heads * GROUP + heads.to(tl.int64)) * num_splits + split  # (batch, heads, splits)
    tl.store(PART_O + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=q_mask)
    tl.store(PART_LSE + part, lse, mask=offs_h < GROUP)


@triton.jit
def _decode_reduce(PART_O, PART_LSE, SINKS, O, heads, num_splits, stride_ob, stride_oh,
                   HEAD_DIM: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stage 2 of split-KV decode: merge the slices of one (batch, head) by their log-sum-exp. A head's
    sink logit (natural units, float32) joins the denominator only: a softmax column without a value."""
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    lse = tl.load(PART_LSE + bh * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + bh % heads) * 1.4426950408889634  # log2(e): the scores are in base 2
        top = tl.maximum(top, sink)
    weight = tl.exp2(lse - top)
    parts = tl.load(PART_O + (bh * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(weight, 0)
    if HAS_SINKS:
        total += tl.exp2(sink - top)
    out = tl.sum(weight[:, None] * parts, 0) / total
    tl.store(O + (bh // heads) * stride_ob + (bh % heads) * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# Launch configurations ---------------------------------------------------------------------------------

def _config(stages, warps, **blocks):
    return triton.Config(blocks, num_stages=stages, num_warps=warps)


# H100-sized tiles: 128 x 64 with 8 warps is FlashAttention-2's choice for head_dim 64-128 in 16-bit
# types; narrower tiles serve short query tiles and fp32 inputs (twice the shared memory per element).
_FWD_CONFIGS = [
    _config(3, 8, BLOCK_M=128, BLOCK_N=64),
    _config(2, 8, BLOCK_M=128, BLOCK_N=64),
    _config(3, 8, BLOCK_M=128, BLOCK_N=128),
    _config(3, 4, BLOCK_M=64, BLOCK_N=64),
    _config(2, 4, BLOCK_M=64, BLOCK_N=32),
    _config(3, 4, BLOCK_M=32, BLOCK_N=64),
    _config(2, 4, BLOCK_M=16, BLOCK_N=64),
]
_DKDV_CONFIGS = [
    _config(3, 8, BLOCK_M=32, BLOCK_N=128),
    _config(2, 8, BLOCK_M=64, BLOCK_N=128),
    _config(3, 4, BLOCK_M=32, BLOCK_N=64),
    _config(2, 4, BLOCK_M=16, BLOCK_N=64),
]
_DQ_CONFIGS = [
    _config(3, 8, BLOCK_M=128, BLOCK_N=32),
    _config(2, 8, BLOCK_M=128, BLOCK_N=64),
    _config(3, 4, BLOCK_M=64, BLOCK_N=32),
    _config(2, 4, BLOCK_M=16, BLOCK_N=64),
]
_DECODE_CONFIGS = [
    _config(2, 4, BLOCK_N=64),
    _config(3, 4, BLOCK_N=64),
    _config(2, 4, BLOCK_N=128),
    _config(3, 4, BLOCK_N=32),
]
# Batch and heads set how many programs share the GPU, and the window how many keys each query tile
# visits, so each changes the best tile; Triton's autotuner adds the tensors' dtypes to every key.
# (The kernels take `batch` for these keys only.)
_SHAPE_KEY = ["batch", "heads", "q_len", "kv_len", "window", "GROUP", "HEAD_DIM", "V_DIM", "CAUSAL", "INPUT_PRECISION"]
_DECODE_KEY = ["batch", "kv_heads", "kv_len", "window", "num_splits", "GROUP", "HEAD_DIM", "HAS_LENS",
               "INPUT_PRECISION"]
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_SHAPE_KEY)(_attn_fwd)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_SHAPE_KEY)(_attn_bwd_dkdv)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_SHAPE_KEY)(_attn_bwd_dq)
_decode_tuned = triton.autotune(_DECODE_CONFIGS, key=_DECODE_KEY)(_decode_split)

# Under the interpreter: tiles of different heights so that block edges fall at different places.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32}
_INTERPRETER_DECODE_BLOCKS = {"BLOCK_N": 32}
_DELTA_BLOCK_M = 64
_MIN_SPLIT_KEYS = 128  # a decode slice shorter than this spends more on its reduction than it saves


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch(kernel, tuned, grid, *args, interpreter_blocks=_INTERPRETER_BLOCKS, **meta):
    """The autotuned kernel on a GPU; the plain kernel with small fixed tiles under the interpreter."""
    if _interpreted():
        kernel[grid](*args, **meta, **interpreter_blocks)
    else:
        tuned[grid](*args, **meta)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int) -> tuple[int, int]:
    """(GROUP, the effective window) after validating (batch, heads, seq, head_dim) inputs."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"attention needs 4-D q, k, v with k and v alike but for v's head width, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    (b, h, q_len, d), (bk, kv_heads, kv_len, dk) = q.shape, k.shape
    if b != bk or d != dk or h % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: batch and head_dim must match and "
                         "heads must be a multiple of kv_heads")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("attention needs head_dim contiguous (stride 1) in q, k and v")
    if causal and q_len > kv_len:
        raise ValueError(f"causal attention with q_len {q_len} > kv_len {kv_len}: the first queries see no key")
    if window and not causal:
        raise ValueError("a sliding window needs causal attention")
    # No window: one longer than any sequence, so that the window test never masks.
    return h // kv_heads, window if window else q_len + kv_len + 1


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _scales(head_dim: int, scale: float | None) -> tuple[float, float]:
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    return sm_scale, sm_scale * _LOG2E


# Launch wrappers ---------------------------------------------------------------------------------------

def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, window: int = 0,
                    scale: float | None = None, return_lse: bool = False, input_precision: str = "ieee",
                    sinks: torch.Tensor | None = None):
    """softmax(q k^T * scale) v for q (batch, heads, q_len, d), k (batch, kv_heads, kv_len, d) and v
    (batch, kv_heads, kv_len, dv), dv d or another width (MLA's prefill: d 192, dv 128). sinks (heads,)
    float32: each head's attention-sink logit, a softmax column without a value.

    Returns the output (batch, heads, q_len, dv) in q's dtype, and with return_lse also the log-sum-exp
    of each query's scores (base 2, float32, (batch, heads, q_len)) that flash_attention_backward needs.
    input_precision applies to fp32 inputs: "ieee" (true fp32) or "tf32".
    """
    group, window = _check_shapes(q, k, v, causal, window)
    (batch, heads, q_len, head_dim), kv_len = q.shape, k.shape[2]
    sm_scale, qk_scale = _scales(head_dim, scale)
    v_dim = v.shape[-1]
    if sinks is not None and (sinks.shape != (heads,) or sinks.dtype != torch.float32):
        raise ValueError(f"sinks must be float32 of shape ({heads},), got {sinks.dtype} {tuple(sinks.shape)}")
    o = q.new_empty((batch, heads, q_len, v_dim))
    lse = torch.empty((batch, heads, q_len), device=q.device, dtype=torch.float32) if return_lse else o

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    _launch(_attn_fwd, _fwd_tuned, grid, q, k, v, o, lse, sinks if sinks is not None else lse, qk_scale, batch, heads,
            q_len, kv_len, window, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            GROUP=group, HEAD_DIM=head_dim, V_DIM=v_dim, CAUSAL=causal, STORE_LSE=return_lse,
            HAS_SINKS=sinks is not None, INPUT_PRECISION=input_precision, BLOCK_D=_block_d(head_dim),
            BLOCK_DV=_block_d(v_dim))
    return (o, lse) if return_lse else o


def flash_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                             lse: torch.Tensor, *, causal: bool = False, window: int = 0, scale: float | None = None,
                             input_precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of flash_attention given the output's gradient do and its (o, lse); with sinks, the
    lse the forward saved holds them, and the gradients of q, k and v need nothing else."""
    group, window = _check_shapes(q, k, v, causal, window)
    (batch, heads, q_len, head_dim), (kv_heads, kv_len), v_dim = q.shape, k.shape[1:3], v.shape[-1]
    sm_scale, qk_scale = _scales(head_dim, scale)
    block_d = _block_d(head_dim)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty((batch, heads, q_len), device=q.device, dtype=torch.float32)

    _attn_bwd_delta[(triton.cdiv(q_len, _DELTA_BLOCK_M), batch * heads)](
        o, do, delta, heads, q_len, *o.stride()[:3], *do.stride()[:3],
        HEAD_DIM=v_dim, BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=_block_d(v_dim))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    meta = {"GROUP": group, "HEAD_DIM": head_dim, "V_DIM": v_dim, "CAUSAL": causal, "INPUT_PRECISION": input_precision,
            "BLOCK_D": block_d, "BLOCK_DV": _block_d(v_dim)}

    def dkdv_grid(m):
        return (triton.cdiv(kv_len, m["BLOCK_N"]), batch * kv_heads)

    def dq_grid(m):
        return (triton.cdiv(q_len, m["BLOCK_M"]), batch * heads)

    _launch(_attn_bwd_dkdv, _dkdv_tuned, dkdv_grid, q, k, v, do, lse, delta, dk, dv, sm_scale, qk_scale,
            batch, heads, kv_heads, q_len, kv_len, window, *strides, *dk.stride()[:3], *dv.stride()[:3], **meta)
    _launch(_attn_bwd_dq, _dq_tuned, dq_grid, q, k, v, do, lse, delta, dq, sm_scale, qk_scale,
            batch, heads, q_len, kv_len, window, *strides, *dq.stride()[:3], **meta)
    return dq, dk, dv


def _num_splits(batch: int, kv_heads: int, kv_len: int, device: torch.device) -> int:
    """Slices per sequence so that about two programs run per SM, none shorter than _MIN_SPLIT_KEYS."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(triton.cdiv(2 * sms, batch * kv_heads), triton.cdiv(kv_len, _MIN_SPLIT_KEYS)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                     kv_lens: torch.Tensor | None = None, window: int = 0, scale: float | None = None,
                     num_splits: int | None = None, input_precision: str = "ieee",
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence against a KV cache, split across programs (flash-decoding).

    q (batch, heads, 1, d); k_cache, v_cache (batch, kv_heads, kv_len, d). kv_lens (batch,) int32 holds
    each sequence's context length (the new token included, already in the cache); None: all kv_len.
    sinks (heads,) float32: each head's attention-sink logit, a softmax column without a value.
    Each sequence's visible keys are cut into num_splits slices (None: enough to fill the GPU), each
    reduced by one program, then merged by their log-sum-exp in a second kernel.
    """
    _, window = _check_shapes(q, k_cache, v_cache, True, window)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention takes v as wide as k, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    (batch, heads, q_len, head_dim), (kv_heads, kv_len) = q.shape, k_cache.shape[1:3]
    if q_len != 1:
        raise ValueError(f"decode_attention takes one query per sequence, got q_len {q_len}")
    if kv_lens is not None and (kv_lens.shape != (batch,) or kv_lens.dtype != torch.int32):
        raise ValueError(f"kv_lens must be int32 of shape ({batch},), got {kv_lens.dtype} {tuple(kv_lens.shape)}")
    group = heads // kv_heads
    splits = num_splits or _num_splits(batch, kv_heads, kv_len, q.device)
    _, qk_scale = _scales(head_dim, scale)
    part_o = torch.empty((batch, heads, splits, head_dim), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((batch, heads, splits), device=q.device, dtype=torch.float32)
    o = torch.empty_like(q)
    block_d = _block_d(head_dim)

    _launch(_decode_split, _decode_tuned, (splits, batch * kv_heads), q, k_cache, v_cache,
            kv_lens if kv_lens is not None else q, part_o, part_lse, qk_scale, batch, kv_heads, kv_len, window,
            splits, *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3],
            HAS_LENS=kv_lens is not None, GROUP=group, HEAD_DIM=head_dim, INPUT_PRECISION=input_precision,
            BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
            interpreter_blocks=_INTERPRETER_DECODE_BLOCKS)
    reduce_splits(part_o, part_lse, o, sinks)
    return o


def reduce_splits(part_o: torch.Tensor, part_lse: torch.Tensor, o: torch.Tensor,
                  sinks: torch.Tensor | None = None) -> None:
    """Stage 2 of every split-KV decode: part_o (batch, heads, splits, width) float32 and part_lse
    (batch, heads, splits) base 2, merged into o, whose last dimension is contiguous, shaped
    (batch, heads, ..., width) with one row per head."""
    batch, heads, splits, width = part_o.shape
    if sinks is not None and (sinks.shape != (heads,) or sinks.dtype != torch.float32):
        raise ValueError(f"sinks must be float32 of shape ({heads},), got {sinks.dtype} {tuple(sinks.shape)}")
    _decode_reduce[(batch * heads,)](part_o, part_lse, sinks if sinks is not None else part_lse, o, heads, splits,
                                     *o.stride()[:2], HEAD_DIM=width, HAS_SINKS=sinks is not None,
                                     BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=_block_d(width))
