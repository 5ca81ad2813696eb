"""Attention over a KV cache as serving stacks keep it: in pages a block table maps, and in fp8.

A cache of pages (num_pages, page, kv_heads, head_dim) is what vLLM, SGLang and TensorRT-LLM keep:
a sequence's logical page j is physical page block_table[b, j]. Pages are handed out as an allocator
leaves them after a while of serving, in no order: here a seeded shuffle. page 0 stands for a
contiguous cache (one page the length of the context per sequence, in order), which an fp8 cache
without paging is.

fp8 caches (e4m3) carry float32 scales, one for the whole cache or one per kv head, that the attention
kernel applies. Queries and the output stay in the workload's dtype. Causal masks are bottom-right as
in opbench.ops.attention: decode (one query per sequence) or a prompt attending its own pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opbench.ops import attention as attn
from opbench.ops.base import OpFamily, all_of, high_precision, installed, needs_cuda, needs_triton_gpu
from opbench.ops.dtypes import DType

PAGE_SEED = 15  # the allocator's shuffle: the same pages for every backend and run
FP8_MAX = 448.0  # the largest e4m3 value
INDEX_BYTES = 4  # int32 block-table entries and context lengths
SCALE_BYTES = 4


class Paged:
    """What a cache of `kv_len` tokens in pages of `page` tokens (0: one contiguous page) takes: the
    shapes of paged_attention and mla_decode both have these two fields."""
    page: int
    kv_len: int

    @property
    def page_tokens(self) -> int:
        return self.page or self.kv_len

    @property
    def pages_per_sequence(self) -> int:
        return -(-self.kv_len // self.page_tokens)


@dataclass(frozen=True)
class PagedAttentionShape(Paged):
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    q_len: int  # 1: decode; else a prompt over its own pages (q_len == kv_len)
    kv_len: int  # the longest context
    window: int = 0
    kv_len_min: int = 0  # as AttentionShape's: contexts spread from kv_len_min to kv_len
    page: int = 16  # tokens per page; 0: a contiguous cache
    kv_fp8_scales: int = 0  # 0: K and V in the queries' dtype; fp8 with 1: one scale each, 2: one per kv head
    sinks: int = 0  # 1: a learned logit per query head in every softmax

    def __post_init__(self) -> None:
        self.dense()  # the same checks
        if self.kv_fp8_scales not in (0, 1, 2):
            raise ValueError(f"paged attention: kv_fp8_scales {self.kv_fp8_scales}: 0 (no fp8), 1 or 2")

    def dense(self) -> attn.AttentionShape:
        """The same attention over a contiguous cache in the queries' dtype."""
        return attn.AttentionShape(self.batch, self.heads, self.kv_heads, self.head_dim, self.q_len, self.kv_len, 1,
                                    self.window, self.kv_len_min, sinks=self.sinks)



def shape_id(s: PagedAttentionShape) -> str:
    cache = (f"p{s.page}" if s.page else "contig") + ("-fp8" + ("h" if s.kv_fp8_scales == 2 else "t")
                                                      if s.kv_fp8_scales else "")
    return f"{attn.shape_id(s.dense())}-{cache}"


def flops(s: PagedAttentionShape, pass_: str = "fwd") -> int:
    """As the contiguous attention's: 4 x heads x head_dim x batch x q_len x avg_kv."""
    return attn.flops(s.dense(), pass_)


def kv_bytes_per_element(s, dtype: DType) -> int:
    return 1 if s.kv_fp8_scales else dtype.bytes


def bytes_moved(s: PagedAttentionShape, dtype: DType, pass_: str = "fwd") -> int:
    """Q and O in the workload's dtype; K and V of the keys read at the cache's bytes per element (fp8: 1);
    the block table and context lengths (int32) and the scales."""
    d = s.dense()
    q_side = 2 * s.batch * s.heads * s.q_len * s.head_dim * dtype.bytes
    kv_side = 2 * s.kv_heads * attn.kv_rows_read(d) * s.head_dim * kv_bytes_per_element(s, dtype)
    tables = s.batch * (s.pages_per_sequence + 1) * INDEX_BYTES
    scales = 2 * (s.kv_heads if s.kv_fp8_scales == 2 else 1) * SCALE_BYTES if s.kv_fp8_scales else 0
    return q_side + kv_side + tables + scales


def shuffled_block_table(batch: int, pages_per_sequence: int, device: str, seed: int = PAGE_SEED) -> torch.Tensor:
    """(batch, pages_per_sequence) int32: every physical page once, in a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(batch * pages_per_sequence, generator=gen)
    return order.view(batch, pages_per_sequence).to(device=device, dtype=torch.int32)


def quantize_fp8(x: torch.Tensor, per_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., kv_heads, head_dim) as e4m3 and its float32 scales (kv_heads,), the amax mapped to FP8_MAX;
    one scale repeated over the heads when not per_head."""
    heads = x.shape[-2]
    amax = x.float().abs().transpose(0, -2).reshape(heads, -1).amax(1)
    if not per_head:
        amax = amax.max().expand(heads)
    scale = (amax / FP8_MAX).clamp_min(1e-12).contiguous()
    return (x.float() / scale.view(heads, 1)).to(torch.float8_e4m3fn), scale


def inputs(s: PagedAttentionShape, dtype: DType, pass_: str, device: str) -> dict:
    """q; k_pages and v_pages (num_pages, page, kv_heads, head_dim) with a shuffled block table, fp8 with
    k_scale and v_scale when asked; kv_lens (int32); sinks."""
    d = s.dense()
    pages = s.batch * s.pages_per_sequence
    inp = {"shape": s, "q": torch.randn(s.batch, s.heads, s.q_len, s.head_dim, device=device, dtype=dtype.torch),
           "kv_lens": torch.tensor(attn.context_lens(d), device=device, dtype=torch.int32)}
    if s.page:
        inp["block_table"] = shuffled_block_table(s.batch, s.pages_per_sequence, device)
    else:
        inp["block_table"] = torch.arange(s.batch, device=device, dtype=torch.int32).view(-1, 1)
    for name in ("k", "v"):
        rows = torch.randn(pages, s.page_tokens, s.kv_heads, s.head_dim, device=device, dtype=dtype.torch)
        if s.kv_fp8_scales:
            rows, inp[f"{name}_scale"] = quantize_fp8(rows, per_head=s.kv_fp8_scales == 2)
        inp[f"{name}_pages"] = rows
    if s.sinks:
        inp["sinks"] = torch.randn(s.heads, device=device, dtype=torch.float32)
    return inp


def select_pages(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The pages of the block table's rows in order, (batch x pages per sequence, page, ...): index_select,
    on fp8 through a byte view (advanced indexing is many times slower on a CPU and takes no fp8 there)."""
    index = block_table.flatten().long()
    if pages.dtype == torch.float8_e4m3fn:
        return pages.view(torch.uint8).index_select(0, index).view(pages.dtype)
    return pages.index_select(0, index)


def gather(inp: dict, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The cache of `name` (k or v) as one contiguous (batch, kv_heads, kv_len, head_dim) tensor in
    `dtype`, dequantized: what the torch reference attends over."""
    s: PagedAttentionShape = inp["shape"]
    pages = select_pages(inp[f"{name}_pages"], inp["block_table"])  # (batch x pages, page, kv_heads, d)
    rows = pages.view(s.batch, -1, s.kv_heads, s.head_dim)[:, :s.kv_len].to(dtype)
    if s.kv_fp8_scales:
        rows = rows * inp[f"{name}_scale"].to(dtype).view(1, 1, -1, 1)
    return rows.transpose(1, 2)


def reference(inp: dict, dtype: DType, pass_: str):
    q = high_precision(inp["q"])
    k, v = (gather(inp, n, q.dtype) for n in "kv")
    s = inp["shape"]
    return attn.attention_math(q, k, v, s.dense(), high_precision(inp["sinks"]) if s.sinks else None)


PAGED_ATTENTION = OpFamily(
    name="paged_attention", shape_type=PagedAttentionShape, flops=flops, bytes=bytes_moved, inputs=inputs,
    reference=reference, dtypes=("bf16", "fp16", "fp32"), shape_id=shape_id,
)


def _decode_only(what: str):
    def requires(s: PagedAttentionShape, dtype: DType, device: str) -> str | None:
        return None if s.q_len == 1 else f"{what} is a decode kernel (one query per sequence; q_len is {s.q_len})"
    return requires


@PAGED_ATTENTION.backend("torch", impl="gather the pages through the block table (dequantizing fp8), then "
                         "F.scaled_dot_product_attention (eager attention_math with sinks)")
def paged_torch(inp: dict, dtype: DType, pass_: str):
    s: PagedAttentionShape = inp["shape"]
    d = s.dense()
    q, sinks = inp["q"], inp.get("sinks")
    keep = attn.visible(d, q.device)
    gqa = {"enable_gqa": True} if s.heads != s.kv_heads else {}

    def forward():
        k, v = gather(inp, "k", q.dtype), gather(inp, "v", q.dtype)
        if sinks is not None:
            return attn.attention_math(q, k, v, d, sinks)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, **gqa)
    return forward


@PAGED_ATTENTION.backend("triton-paged", impl="opbench/kernels/paged_attention.py paged_decode_attention: split-KV over "
                         "the block table, fp8 dequantized by per-head scales on the scores and output",
                         requires=all_of(needs_triton_gpu, _decode_only("the Triton paged kernel")))
def paged_triton(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.paged_attention import paged_decode_attention

    s: PagedAttentionShape = inp["shape"]
    args = (inp["q"], inp["k_pages"], inp["v_pages"], inp["block_table"], inp["kv_lens"])
    kw = {"k_scale": inp.get("k_scale"), "v_scale": inp.get("v_scale"), "window": s.window,
          "sinks": inp.get("sinks")}
    return lambda: paged_decode_attention(*args, **kw)


def _flash_paged_requires(fa3: bool):
    def requires(s: PagedAttentionShape, dtype: DType, device: str) -> str | None:
        if s.sinks:
            return "flash-attn's KV-cache entry point takes no attention sinks"
        if s.kv_fp8_scales:
            return "flash-attn's KV-cache entry point here takes K and V in the queries' dtype (fp8 needs fp8 queries)"
        if dtype.bits > 16:
            return "flash-attn runs fp16/bf16 only"
        if not fa3 and s.page and s.page % 256:
            return f"FlashAttention-2's block table takes pages of a multiple of 256 tokens; these are {s.page}"
        return None
    return requires


def _flash_paged(kvcache):
    def prepare(inp: dict, dtype: DType, pass_: str):
        s: PagedAttentionShape = inp["shape"]
        q = inp["q"].transpose(1, 2)  # (batch, q_len, heads, d)
        window = (s.window - 1, 0) if s.window else (-1, -1)
        args = {"cache_seqlens": inp["kv_lens"], "block_table": inp["block_table"], "causal": True,
                "window_size": window}

        def forward():
            out = kvcache(q, inp["k_pages"], inp["v_pages"], **args)
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
        return forward
    return prepare


@PAGED_ATTENTION.backend("fa2-paged", impl="flash_attn.flash_attn_with_kvcache with block_table (FlashAttention-2)",
                         requires=all_of(installed("flash_attn", "flash-attn", "FlashAttention-2's flash_attn"),
                                         needs_cuda, _flash_paged_requires(fa3=False)))
def paged_fa2(inp: dict, dtype: DType, pass_: str):
    from flash_attn import flash_attn_with_kvcache

    return _flash_paged(flash_attn_with_kvcache)(inp, dtype, pass_)


@PAGED_ATTENTION.backend("fa3-paged", impl="flash_attn_interface.flash_attn_with_kvcache with block_table "
                         "(FlashAttention-3, Hopper; any page size)",
                         requires=all_of(installed("flash_attn_interface", "flash-attn",
                                                   "FlashAttention-3's flash_attn_interface, built from hopper/"),
                                         needs_cuda, _flash_paged_requires(fa3=True)))
def paged_fa3(inp: dict, dtype: DType, pass_: str):
    from flash_attn_interface import flash_attn_with_kvcache

    return _flash_paged(flash_attn_with_kvcache)(inp, dtype, pass_)
