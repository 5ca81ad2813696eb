"""MoE token permutation: each token's copies, one per chosen expert, gathered into expert order, the
contiguous layout the grouped GEMMs read.

Copy id t * top_k + j is token t's j-th expert. The forward returns the permuted rows (tokens x top_k,
hidden), the row each copy landed in (row_of, int64, for the un-permutation) and the experts' int32
cumulative row ends (the grouped GEMMs' offsets); copies of one expert keep their token order. The
backward sums the gradients of a token's copies back onto the token. The expert ids of a case are the
seeded routing draw's (opbench.ops.routing), so the experts' runs are as ragged as the plan's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opbench.ops import routing
from opbench.ops.base import OpFamily, high_precision
from opbench.ops.dtypes import DType

INDEX_BYTES, OFFSET_BYTES = 8, 4  # int64 ids and row indices, int32 offsets


@dataclass(frozen=True)
class PermuteShape:
    """tokens rows of `hidden` elements, each sent to top_k of `experts` experts (also moe_unpermute's)."""
    tokens: int
    experts: int
    top_k: int
    hidden: int
    seed: int = routing.ROUTING_SEED
    skew_milli: int = 0


def shape_id(s: PermuteShape) -> str:
    """'t64-e128top8-2048'."""
    return routing.moe_id(s, s.hidden)


def describe(s: PermuteShape) -> str:
    return routing.describe_counts(routing.counts(s.tokens, s.experts, s.top_k, s.seed, s.skew_milli))


def flops(s: PermuteShape, pass_: str = "fwd") -> int:
    """fwd: a copy, no arithmetic. bwd: top_k - 1 additions per element of every token."""
    return 0 if pass_ == "fwd" else (s.top_k - 1) * s.tokens * s.hidden


def bytes_moved(s: PermuteShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: the tokens read once, their copies written, the ids read and row_of written, the offsets
    written. bwd: the copies' gradients and row_of read, the tokens' gradients written."""
    copies = s.tokens * s.top_k
    rows = (s.tokens + copies) * s.hidden * dtype.bytes
    if pass_ == "fwd":
        return rows + 2 * copies * INDEX_BYTES + s.experts * OFFSET_BYTES
    return rows + copies * INDEX_BYTES


def row_map(ids: torch.Tensor) -> torch.Tensor:
    """row_of[copy]: the row of each copy in expert order (copies of one expert in token order)."""
    order = ids.flatten().argsort(stable=True)
    row_of = torch.empty_like(order)
    row_of[order] = torch.arange(order.numel(), device=order.device)
    return row_of


def inputs(s: PermuteShape, dtype: DType, pass_: str, device: str) -> dict:
    ids = routing.draw(s.tokens, s.experts, s.top_k, s.seed, s.skew_milli).to(device)
    copies = s.tokens * s.top_k
    if pass_ == "fwd":
        return {"x": torch.randn(s.tokens, s.hidden, device=device, dtype=dtype.torch), "ids": ids,
                "experts": s.experts}
    return {"dxs": torch.randn(copies, s.hidden, device=device, dtype=dtype.torch), "row_of": row_map(ids),
            "top_k": s.top_k}


def permute(x: torch.Tensor, ids: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch ops an eager MoE layer runs: a stable sort of the copies by expert, a gather of rows."""
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    xs = x.index_select(0, order // ids.shape[1])
    row_of = torch.empty_like(order)
    row_of[order] = torch.arange(order.numel(), device=order.device)
    offs = torch.bincount(flat, minlength=experts).cumsum(0).to(torch.int32)
    return xs, row_of, offs


def unpermute_sum(dxs: torch.Tensor, row_of: torch.Tensor, top_k: int) -> torch.Tensor:
    """The permutation's backward: each token's copies gathered back and summed."""
    return dxs.index_select(0, row_of).view(-1, top_k, dxs.shape[1]).sum(dim=1)


def reference(inp: dict, dtype: DType, pass_: str):
    """Expert by expert, in float64 (row_of and the offsets as floats, for the gate)."""
    if pass_ != "fwd":
        dxs, row_of, k = high_precision(inp["dxs"]), inp["row_of"], inp["top_k"]
        return sum(dxs[row_of[j::k]] for j in range(k))
    x, ids, experts = high_precision(inp["x"]), inp["ids"], inp["experts"]
    flat, k = ids.flatten(), ids.shape[1]
    runs = [torch.nonzero(flat == e).flatten() for e in range(experts)]  # copy ids, in token order
    copies = torch.cat(runs)
    row_of = torch.empty_like(copies)
    row_of[copies] = torch.arange(copies.numel(), device=copies.device)
    ends = torch.tensor([len(r) for r in runs], device=x.device).cumsum(0)
    return x[copies // k], row_of.to(x.dtype), ends.to(x.dtype)


MOE_PERMUTE = OpFamily(name="moe_permute", shape_type=PermuteShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                       reference=reference, shape_id=shape_id, describe=describe)


@MOE_PERMUTE.backend("torch", impl="eager torch: stable argsort of the expert ids, index_select of the rows, "
                                   "bincount and cumsum; backward: index_select and a sum over the copies")
def permute_torch(inp: dict, dtype: DType, pass_: str):
    if pass_ == "fwd":
        x, ids, experts = inp["x"], inp["ids"], inp["experts"]
        return lambda: permute(x, ids, experts)
    dxs, row_of, k = inp["dxs"], inp["row_of"], inp["top_k"]
    return lambda: unpermute_sum(dxs, row_of, k)
