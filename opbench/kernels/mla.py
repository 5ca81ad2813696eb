"""Triton decode of multi-head latent attention (DeepSeek-V2/V3) in the absorbed form.

With W_UK folded into the queries and W_UV applied after, every head attends over the same cached rows:
each token's latent c (kv_lora_rank, 512 in DeepSeek-V3) and its rotary key k_pe (64). A query is
[q_nope W_UK, q_pe], as wide as a cached row; the score is q . row and the value is the row's latent
part. So MLA decode is multi-query attention with keys 576 wide and values 512 wide, and the kernel
reads the cache once for a whole tile of heads (FlashMLA's shape of the problem).

The cache is paged as FlashMLA takes it: (num_pages, page, 1, latent + rope), a block table (batch,
pages per sequence) int32 and each sequence's context length; a contiguous cache is one page per
sequence. An fp8 (e4m3) cache carries one float32 scale, applied to the scores and the output.
The slices' partial outputs merge in kernels/attention.py's log-sum-exp reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from opbench.kernels.attention import _M_INIT, _launch, _num_splits, reduce_splits


@triton.jit
def _mla_decode_split(Q, CACHE, BLOCK_TABLE, KV_LENS, KV_SCALE, PART_O, PART_LSE, qk_scale, batch, heads, page,
                      num_splits, stride_qb, stride_qh, stride_bt, stride_cp, stride_cs,
                      LATENT: tl.constexpr, ROPE: tl.constexpr, FP8: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
    """One slice of one sequence's cached rows, for a tile of BLOCK_H query heads."""
    split = tl.program_id(0)
    head_tiles = tl.cdiv(heads, BLOCK_H)
    off_b = tl.program_id(1) // head_tiles
    heads_idx = (tl.program_id(1) % head_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = heads_idx < heads
    ctx = tl.load(KV_LENS + off_b)
    per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    l_mask = offs_l < LATENT
    r_mask = offs_r < ROPE
    off_b64 = off_b.to(tl.int64)
    q_rows = Q + off_b64 * stride_qb + heads_idx[:, None].to(tl.int64) * stride_qh
    q_nope = tl.load(q_rows + offs_l[None, :], mask=h_mask[:, None] & l_mask[None, :], other=0.0)
    q_pe = tl.load(q_rows + LATENT + offs_r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    table = BLOCK_TABLE + off_b64 * stride_bt
    score_scale = qk_scale
    if FP8:
        score_scale = qk_scale * tl.load(KV_SCALE)

    acc = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    m_i = tl.full((BLOCK_H,), _M_INIT, dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        live = cols < end
        phys = tl.load(table + cols // page, mask=live, other=0).to(tl.int64)
        rows = CACHE + phys * stride_cp + (cols % page).to(tl.int64) * stride_cs
        c = tl.load(rows[:, None] + offs_l[None, :], mask=live[:, None] & l_mask[None, :], other=0.0)
        pe = tl.load(rows[:, None] + LATENT + offs_r[None, :], mask=live[:, None] & r_mask[None, :], other=0.0)
        if FP8:
            c = c.to(q_nope.dtype)
            pe = pe.to(q_nope.dtype)
        qk = tl.dot(q_nope, tl.trans(c), input_precision=INPUT_PRECISION)
        qk += tl.dot(q_pe, tl.trans(pe), input_precision=INPUT_PRECISION)
        qk = tl.where(live[None, :], qk * score_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=INPUT_PRECISION)
        m_i = m_new
    if FP8:
        acc = acc * tl.load(KV_SCALE)

    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
    part = (off_b64 * heads + heads_idx.to(tl.int64)) * num_splits + split
    tl.store(PART_O + part[:, None] * LATENT + offs_l[None, :], acc / l_safe[:, None],
             mask=h_mask[:, None] & l_mask[None, :])
    tl.store(PART_LSE + part, lse, mask=h_mask)


# 576-wide rows and a 512-wide accumulator per head: short key tiles and 16-64 heads per program.
_MLA_CONFIGS = [triton.Config({"BLOCK_H": bh, "BLOCK_N": bn}, num_stages=st, num_warps=w)
                for bh, bn, st, w in ((64, 32, 2, 8), (32, 32, 2, 4), (16, 64, 2, 4), (16, 32, 3, 4))]
_MLA_KEY = ["batch", "heads", "page", "num_splits", "LATENT", "ROPE", "FP8", "INPUT_PRECISION"]
_mla_tuned = triton.autotune(_MLA_CONFIGS, key=_MLA_KEY)(_mla_decode_split)
_INTERPRETER_MLA_BLOCKS = {"BLOCK_H": 16, "BLOCK_N": 32}


def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
               latent: int, *, scale: float, kv_scale: torch.Tensor | None = None, num_splits: int | None = None,
               input_precision: str = "ieee") -> torch.Tensor:
    """Absorbed MLA decode. q (batch, heads, latent + rope): [q_nope W_UK, q_pe]; cache (num_pages, page, 1,
    latent + rope), fp8 with kv_scale (1,) float32; block_table (batch, pages) and kv_lens (batch,) int32.
    scale: the softmax scale of the un-absorbed heads (1/sqrt(qk_nope + rope)). Returns (batch, heads,
    latent) in q's dtype: the attention-weighted latents, which W_UV then maps to each head's value."""
    (batch, heads, width), (_, page, one, cwidth) = q.shape, cache.shape
    rope = width - latent
    if one != 1 or cwidth != width or not 0 < rope:
        raise ValueError(f"mla decode: q {tuple(q.shape)} and cache {tuple(cache.shape)} must share the row width "
                         f"latent ({latent}) + rope, with one cached head")
    if block_table.dtype != torch.int32 or kv_lens.dtype != torch.int32 or block_table.shape[0] != batch:
        raise ValueError("mla decode: block_table (batch, pages) and kv_lens (batch,) must be int32")
    if q.stride(-1) != 1 or cache.stride(-1) != 1 or block_table.stride(-1) != 1:
        raise ValueError("mla decode needs the rows contiguous")
    fp8 = cache.dtype == torch.float8_e4m3fn
    if fp8 and kv_scale is None:
        raise ValueError("an fp8 cache needs kv_scale (1,) float32")
    kv_len = block_table.shape[1] * page
    splits = num_splits or _num_splits(batch, triton.cdiv(heads, 16), kv_len, q.device)
    part_o = torch.empty((batch, heads, splits, latent), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((batch, heads, splits), device=q.device, dtype=torch.float32)
    o = torch.empty((batch, heads, latent), device=q.device, dtype=q.dtype)

    def grid(meta):
        return (splits, batch * triton.cdiv(heads, meta["BLOCK_H"]))

    _launch(_mla_decode_split, _mla_tuned, grid, q, cache, block_table, kv_lens, kv_scale if fp8 else kv_lens,
            part_o, part_lse, scale * 1.4426950408889634, batch, heads, page, splits, *q.stride()[:2],
            block_table.stride(0), *cache.stride()[:2],
            LATENT=latent, ROPE=rope, FP8=fp8, INPUT_PRECISION=input_precision,
            BLOCK_L=triton.next_power_of_2(latent), BLOCK_R=max(16, triton.next_power_of_2(rope)),
            interpreter_blocks=_INTERPRETER_MLA_BLOCKS)
    reduce_splits(part_o, part_lse, o)
    return o
