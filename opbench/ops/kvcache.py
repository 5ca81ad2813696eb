"""The KV-cache write of inference: each new token's key and value stored into the cache, at the slots
the cache manager gives them (vLLM's reshape_and_cache, a paged cache flattened to slots).

Prefill writes the whole prompt, decode one token per sequence; training keeps no cache.
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


def flops(s: KVWriteShape, pass_: str = "fwd") -> int:
    """A copy: no arithmetic."""
    return 0


def bytes_moved(s: KVWriteShape, dtype: DType, pass_: str = "fwd") -> int:
    """K and V of the new tokens read and written into the cache, and the slots read:
    4 T H D b + 8 T."""
    return 4 * s.tokens * s.kv_heads * s.head_dim * dtype.bytes + SLOT_BYTES * s.tokens


def inputs(s: KVWriteShape, dtype: DType, pass_: str, device: str) -> dict:
    """A cache of twice the tokens' slots, so the writes land scattered among rows they do not fill."""
    slots = 2 * s.tokens

    def rows(n):
        return torch.randn(n, s.kv_heads, s.head_dim, device=device, dtype=dtype.torch)
    k_cache, v_cache = rows(slots), rows(slots)
    # the backends write into the caches in place: the reference starts from copies taken before
    return {"k": rows(s.tokens), "v": rows(s.tokens), "k_cache": k_cache, "v_cache": v_cache,
            "before": (k_cache.clone(), v_cache.clone()), "slots": torch.randperm(slots, device=device)[:s.tokens]}


def reference(inp: dict, dtype: DType, pass_: str):
    """The caches as they must be after the write: the untouched caches with the slots' rows replaced."""
    expected = []
    for new, before in zip((inp["k"], inp["v"]), inp["before"]):
        out = high_precision(before)
        out[inp["slots"]] = high_precision(new)
        expected.append(out)
    return tuple(expected)


KV_WRITE = OpFamily(name="kv_write", shape_type=KVWriteShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                    reference=reference)


@KV_WRITE.backend("torch", impl="Tensor.index_copy_ of K and V into the cache's slots")
def kv_write_torch(inp: dict, dtype: DType, pass_: str):
    k, v, k_cache, v_cache, slots = (inp[n] for n in ("k", "v", "k_cache", "v_cache", "slots"))

    def write():
        return k_cache.index_copy_(0, slots, k), v_cache.index_copy_(0, slots, v)
    return write
