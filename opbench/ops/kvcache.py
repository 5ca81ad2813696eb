"""The KV-cache write of inference: each new token's key and value stored into the cache, at the slots
the cache manager gives them (vLLM's reshape_and_cache, a paged cache flattened to slots).

Prefill writes the whole prompt, decode one token per sequence; training keeps no cache.

A paged cache (page > 0) is (num_pages, page, kv_heads, head_dim) whose pages a shuffled block table
hands out (opbench.ops.paged_attention): token i's slot is page block[i // page] at row i % page, the
scatter serving stacks pay. An fp8 cache quantizes each new row by its kv head's scale on the way in.
MLA caches one 576-wide row per token (kv_heads 1, head_dim latent + rope) and no separate V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opbench.ops.dtypes import DType
from opbench.ops.base import OpFamily, high_precision

SLOT_BYTES = 8  # int64 slot indices


@dataclass(frozen=True)
class KVWriteShape:
    tokens: int  # new tokens whose K and V are written
    kv_heads: int
    head_dim: int
    page: int = 0  # tokens per page of a paged cache; 0: rows of a flat cache
    kv_fp8_scales: int = 0  # fp8 cache: 1 one scale, 2 one per kv head; 0: the activations' dtype
    latent: int = 0  # 1: MLA's one cached row per token (no V)


def shape_id(s: KVWriteShape) -> str:
    base = f"{s.tokens}x{s.kv_heads}x{s.head_dim}"
    return (base + (f"-p{s.page}" if s.page else "") + ("-fp8" if s.kv_fp8_scales else "")
            + ("-latent" if s.latent else ""))


def tensors(s: KVWriteShape) -> tuple[str, ...]:
    return ("k",) if s.latent else ("k", "v")

def flops(s: KVWriteShape, pass_: str = "fwd") -> int:
    """A copy: no arithmetic."""
    return 0


def bytes_moved(s: KVWriteShape, dtype: DType, pass_: str = "fwd") -> int:
    """K and V (MLA: the one row) of the new tokens read and written into the cache, and the slots
    read: 4 T H D b + 8 T; an fp8 cache writes one byte an element: 2 T H D (b + 1) + 8 T."""
    written = 1 if s.kv_fp8_scales else dtype.bytes
    return len(tensors(s)) * s.tokens * s.kv_heads * s.head_dim * (dtype.bytes + written) + SLOT_BYTES * s.tokens


def paged_slots(tokens: int, page: int, device: str) -> tuple[torch.Tensor, int]:
    """(slots, pages): token i at row i % page of the i // page-th page of a shuffled allocation of
    twice the pages the tokens need."""
    from opbench.ops.paged_attention import shuffled_block_table

    pages = 2 * -(-tokens // page)
    table = shuffled_block_table(1, pages, "cpu")[0].long()
    i = torch.arange(tokens)
    return (table[i // page] * page + i % page).to(device), pages


def inputs(s: KVWriteShape, dtype: DType, pass_: str, device: str) -> dict:
    """A cache of twice the tokens' slots (paged: twice their pages), so the writes land scattered among
    rows they do not fill; fp8 with per-head scales (one repeated for kv_fp8_scales 1)."""
    if s.page:
        slots, pages = paged_slots(s.tokens, s.page, device)
        cache_rows = (pages, s.page)
    else:
        slots, cache_rows = torch.randperm(2 * s.tokens, device=device)[:s.tokens], (2 * s.tokens,)

    def rows(*lead):
        return torch.randn(*lead, s.kv_heads, s.head_dim, device=device, dtype=dtype.torch)
    inp = {"slots": slots}
    for name in tensors(s):
        cache = rows(*cache_rows)
        if s.kv_fp8_scales:
            from opbench.ops.paged_attention import quantize_fp8

            cache, inp[f"{name}_scale"] = quantize_fp8(cache, per_head=s.kv_fp8_scales == 2)
        inp[name], inp[f"{name}_cache"] = rows(s.tokens), cache
    # the backends write into the caches in place: the reference starts from copies taken before
    inp["before"] = tuple(inp[f"{n}_cache"].clone() for n in tensors(s))
    inp["shape"] = s
    return inp


def stored(new: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """New rows as the cache stores them: as they are, or divided by their head's scale in fp8."""
    if scale is None:
        return new
    return (new.float() / scale.view(-1, 1)).to(torch.float8_e4m3fn)


def reference(inp: dict, dtype: DType, pass_: str):
    """The caches as they must be after the write: the untouched caches with the slots' rows replaced."""
    expected = []
    for name, before in zip(tensors(inp["shape"]), inp["before"]):
        out = high_precision(before).flatten(0, -3)
        out[inp["slots"]] = high_precision(stored(inp[name], inp.get(f"{name}_scale")))
        expected.append(out.view(before.shape))
    return tuple(expected)


KV_WRITE = OpFamily(name="kv_write", shape_type=KVWriteShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                    reference=reference, shape_id=shape_id)


@KV_WRITE.backend("torch", impl="Tensor.index_copy_ of K and V into the cache's slots (a paged cache viewed as "
                  "rows; fp8: divided by the head's scale and cast first)")
def kv_write_torch(inp: dict, dtype: DType, pass_: str):
    names = tensors(inp["shape"])
    caches = [inp[f"{n}_cache"] for n in names]
    flat = [c.view(-1, *c.shape[-2:]) for c in caches]  # pages are rows of `page` slots each
    news, scales, slots = [inp[n] for n in names], [inp.get(f"{n}_scale") for n in names], inp["slots"]
    if all(scale is None for scale in scales):
        def write():
            for f, new in zip(flat, news):
                f.index_copy_(0, slots, new)
            return tuple(caches)
        return write

    def write_fp8():  # index_copy_ takes no fp8: the rows are copied as bytes
        for f, new, scale in zip(flat, news, scales):
            f.view(torch.uint8).index_copy_(0, slots, stored(new, scale).view(torch.uint8))
        return tuple(caches)
    return write_fp8
