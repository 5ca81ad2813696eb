"""Multi-head latent attention decode (DeepSeek-V2/V3), in the absorbed form.

MLA caches, per token and layer, one latent c_kv (kv_lora_rank wide, 512 in DeepSeek-V3) and one
rotary key k_pe (qk_rope_head_dim, 64) shared by all heads: 576 elements, where ordinary attention
caches 2 x kv_heads x head_dim. At decode the key up-projection W_UK is folded into each query
(q_nope W_UK: kv_lora_rank wide) and the value up-projection W_UV applied to the output, so every
head attends over the cached rows themselves: scores q . [c_kv, k_pe] over 576 dims, values c_kv over
512, multi-query attention with one 576-wide key head. The two folds are GEMMs of the plan
("attn.q_absorb", "attn.v_absorb"); this family is the attention between them.

The cache is paged as FlashMLA takes it, (num_pages, page, 1, 576), through a shuffled block table;
page 0 is a contiguous cache. fp8 (e4m3) caches carry one float32 scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opbench.ops import attention as attn
from opbench.ops.base import OpFamily, all_of, high_precision, installed, needs_cuda, needs_triton_gpu
from opbench.ops.dtypes import DType
from opbench.ops.paged_attention import (INDEX_BYTES, SCALE_BYTES, Paged, quantize_fp8, select_pages,
                                         shuffled_block_table)


@dataclass(frozen=True)
class MLADecodeShape(Paged):
    batch: int
    heads: int  # query heads (per GPU)
    kv_lora_rank: int  # the latent's width: the values' width
    rope_dim: int  # the shared rotary key's width; a cached row is kv_lora_rank + rope_dim
    qk_head_dim: int  # the un-absorbed query/key head width (nope + rope), which sets the softmax scale
    kv_len: int
    kv_len_min: int = 0  # contexts spread from kv_len_min to kv_len; 0: all kv_len
    page: int = 0  # tokens per page; 0: contiguous
    kv_fp8_scales: int = 0  # 0: the cache in the queries' dtype; 1: fp8 with one scale

    def __post_init__(self) -> None:
        if self.kv_len_min and not 1 <= self.kv_len_min <= self.kv_len:
            raise ValueError(f"mla decode: kv_len_min {self.kv_len_min} must lie in [1, kv_len {self.kv_len}]")
        if self.kv_fp8_scales not in (0, 1):
            raise ValueError("mla decode: one cached head, so at most one fp8 scale (kv_fp8_scales 0 or 1)")

    @property
    def row(self) -> int:
        return self.kv_lora_rank + self.rope_dim


    def context_lens(self) -> list[int]:
        return attn.context_lens(attn.AttentionShape(self.batch, 1, 1, 1, 1, self.kv_len, 0, 0, self.kv_len_min))


def shape_id(s: MLADecodeShape) -> str:
    keys = f"{s.kv_len_min}..{s.kv_len}" if s.kv_len_min else f"{s.kv_len}"
    cache = (f"p{s.page}" if s.page else "contig") + ("-fp8" if s.kv_fp8_scales else "")
    return f"b{s.batch}h{s.heads}l{s.kv_lora_rank}r{s.rope_dim}d{s.qk_head_dim}k{keys}-{cache}"


def flops(s: MLADecodeShape, pass_: str = "fwd") -> int:
    """Per head and cached token: the score over the whole row (2 x (latent + rope)) and the latent
    value (2 x latent): 2 x heads x (2 x latent + rope) x the batch's context tokens."""
    return 2 * s.heads * (2 * s.kv_lora_rank + s.rope_dim) * sum(s.context_lens())


def bytes_moved(s: MLADecodeShape, dtype: DType, pass_: str = "fwd") -> int:
    """The cache's rows once for all heads (fp8: one byte an element), the queries (latent + rope) and
    outputs (latent) of every head, the block table and context lengths, the scale."""
    cache = sum(s.context_lens()) * s.row * (1 if s.kv_fp8_scales else dtype.bytes)
    q_o = s.batch * s.heads * (s.row + s.kv_lora_rank) * dtype.bytes
    return cache + q_o + s.batch * (s.pages_per_sequence + 1) * INDEX_BYTES + (SCALE_BYTES if s.kv_fp8_scales else 0)


def inputs(s: MLADecodeShape, dtype: DType, pass_: str, device: str) -> dict:
    """q (batch, heads, latent + rope), the cache (num_pages, page, 1, latent + rope) through a shuffled
    block table (fp8 with kv_scale), kv_lens int32."""
    pages = s.batch * s.pages_per_sequence
    cache = torch.randn(pages, s.page_tokens, 1, s.row, device=device, dtype=dtype.torch)
    inp = {"shape": s, "q": torch.randn(s.batch, s.heads, s.row, device=device, dtype=dtype.torch),
           "kv_lens": torch.tensor(s.context_lens(), device=device, dtype=torch.int32),
           "block_table": (shuffled_block_table(s.batch, s.pages_per_sequence, device) if s.page else
                           torch.arange(s.batch, device=device, dtype=torch.int32).view(-1, 1))}
    if s.kv_fp8_scales:
        cache, inp["kv_scale"] = quantize_fp8(cache, per_head=False)
    inp["cache"] = cache
    return inp


def gather_rows(inp: dict, dtype: torch.dtype) -> torch.Tensor:
    """The cached rows as (batch, kv_len, latent + rope) in `dtype`, dequantized."""
    s: MLADecodeShape = inp["shape"]
    rows = select_pages(inp["cache"], inp["block_table"]).view(s.batch, -1, s.row)[:, :s.kv_len].to(dtype)
    return rows * inp["kv_scale"].to(dtype) if s.kv_fp8_scales else rows


def mla_math(q: torch.Tensor, rows: torch.Tensor, s: MLADecodeShape) -> torch.Tensor:
    """softmax(q . rows^T / sqrt(qk_head_dim)) rows[..., :latent], each sequence's keys to its context."""
    scores = torch.einsum("bhr,bnr->bhn", q, rows) * s.qk_head_dim ** -0.5
    lens = torch.tensor(s.context_lens(), device=q.device).view(-1, 1, 1)
    scores = scores.masked_fill(torch.arange(s.kv_len, device=q.device).view(1, 1, -1) >= lens, float("-inf"))
    return torch.softmax(scores, -1) @ rows[..., :s.kv_lora_rank]


def reference(inp: dict, dtype: DType, pass_: str):
    q = high_precision(inp["q"])
    return mla_math(q, gather_rows(inp, q.dtype), inp["shape"])


MLA_DECODE = OpFamily(name="mla_decode", shape_type=MLADecodeShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                      reference=reference, dtypes=("bf16", "fp16", "fp32"), shape_id=shape_id)


@MLA_DECODE.backend("torch", impl="gather the rows through the block table (dequantizing fp8), then "
                    "F.scaled_dot_product_attention with the heads as the queries of one 576-wide key head")
def mla_torch(inp: dict, dtype: DType, pass_: str):
    s: MLADecodeShape = inp["shape"]
    q = inp["q"].unsqueeze(1)  # (batch, 1, heads, row): one kv head, the heads its queries
    lens = inp["kv_lens"].view(-1, 1, 1, 1)
    keep = torch.arange(s.kv_len, device=q.device).view(1, 1, 1, -1) < lens

    def forward():
        rows = gather_rows(inp, q.dtype).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, rows, rows[..., :s.kv_lora_rank], attn_mask=keep,
                                             scale=s.qk_head_dim ** -0.5)
        return out.squeeze(1)
    return forward


@MLA_DECODE.backend("triton-mla", impl="opbench/kernels/mla.py mla_decode: absorbed MLA, split-KV over the block table, "
                    "a tile of heads per program reading each row once", requires=needs_triton_gpu)
def mla_triton(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.mla import mla_decode

    s: MLADecodeShape = inp["shape"]
    args = (inp["q"], inp["cache"], inp["block_table"], inp["kv_lens"], s.kv_lora_rank)
    kw = {"scale": s.qk_head_dim ** -0.5, "kv_scale": inp.get("kv_scale")}
    return lambda: mla_decode(*args, **kw)


def _flashmla_requires(s: MLADecodeShape, dtype: DType, device: str) -> str | None:
    if dtype.bits > 16:
        return "FlashMLA runs bf16/fp16 only"
    if s.page != 64:
        return f"FlashMLA takes a cache paged in 64-token blocks (this one: {'contiguous' if not s.page else s.page})"
    if s.kv_fp8_scales:
        return "FlashMLA's fp8 cache is its own packed layout (per-tile scales), not this one"
    return None


@MLA_DECODE.backend("flashmla", impl="flash_mla.flash_mla_with_kvcache (DeepSeek FlashMLA, Hopper) with "
                    "get_mla_metadata's split plan",
                    requires=all_of(installed("flash_mla", "flash-mla", "DeepSeek's FlashMLA"), needs_cuda,
                                    _flashmla_requires))
def mla_flashmla(inp: dict, dtype: DType, pass_: str):
    from flash_mla import flash_mla_with_kvcache, get_mla_metadata

    s: MLADecodeShape = inp["shape"]
    q = inp["q"].unsqueeze(1)  # (batch, 1 query, heads, row)
    meta, splits = get_mla_metadata(inp["kv_lens"], s.heads, 1)

    def forward():
        out, _ = flash_mla_with_kvcache(q, inp["cache"], inp["block_table"], inp["kv_lens"], s.kv_lora_rank, meta,
                                        splits, softmax_scale=s.qk_head_dim ** -0.5, causal=False)
        return out.squeeze(1)
    return forward
