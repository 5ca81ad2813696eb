"""MoE un-permutation with the weighted combine: the experts' output rows, in expert order, gathered back
to their tokens and summed with the routing weights, out[t] = sum_j w[t, j] y[row_of[t * top_k + j]].

Shape: moe_permute's PermuteShape (the same tokens, experts and draw). The weights are fp32 (as the
router writes them), the rows in the case's dtype. The backward gives the rows' gradient (each copy
its token's gradient times its weight) and the weights' (the dot product of the two).
"""

from __future__ import annotations

import torch

from opbench.ops import routing
from opbench.ops.base import OpFamily, needs_triton_gpu
from opbench.ops.dtypes import DType
from opbench.ops.moe_permute import INDEX_BYTES, PermuteShape, describe, row_map, shape_id
from opbench.ops.tokenwise import Grads, autograd_pass, reference

WEIGHT_BYTES = 4
GRADS = Grads(outputs=("dout",), wrt=("y", "weights"))


def flops(s: PermuteShape, pass_: str = "fwd") -> int:
    """fwd: a multiply and an add per element of every copy, 2 T k H. bwd: the rows' gradient one
    multiply per element, the weights' a multiply and an add: 3 T k H."""
    return (2 if pass_ == "fwd" else 3) * s.tokens * s.top_k * s.hidden


def bytes_moved(s: PermuteShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: the copies, row_of and the weights read, the tokens written. bwd: the tokens' gradient, the
    copies, row_of and the weights read, the copies' and the weights' gradients written."""
    copies = s.tokens * s.top_k
    index = copies * (INDEX_BYTES + WEIGHT_BYTES)
    if pass_ == "fwd":
        return (copies + s.tokens) * s.hidden * dtype.bytes + index
    return (s.tokens + 2 * copies) * s.hidden * dtype.bytes + index + copies * WEIGHT_BYTES


def inputs(s: PermuteShape, dtype: DType, pass_: str, device: str) -> dict:
    ids = routing.draw(s.tokens, s.experts, s.top_k, s.seed, s.skew_milli).to(device)
    copies = s.tokens * s.top_k
    inp = {"y": torch.randn(copies, s.hidden, device=device, dtype=dtype.torch), "row_of": row_map(ids),
           "weights": torch.randn(s.tokens, s.top_k, device=device).softmax(dim=-1)}
    if pass_ == "bwd":
        inp["dout"] = torch.randn(s.tokens, s.hidden, device=device, dtype=dtype.torch)
    return inp


def combine(y: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The torch ops an eager MoE layer runs: a gather of every copy, a weighted sum over each token's."""
    tokens, k = weights.shape
    gathered = y.index_select(0, row_of).view(tokens, k, y.shape[1])
    return (gathered * weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)


def _formula(y, row_of, weights):
    k = weights.shape[1]
    return sum(weights[:, j:j + 1] * y[row_of[j::k]] for j in range(k))


MOE_UNPERMUTE = OpFamily(name="moe_unpermute", shape_type=PermuteShape, flops=flops, bytes=bytes_moved,
                         inputs=inputs, reference=reference(_formula, GRADS), shape_id=shape_id, describe=describe)


@MOE_UNPERMUTE.backend("torch", impl="eager torch: index_select of the copies, multiply by the weights, sum; "
                                     "backward: autograd")
def unpermute_torch(inp: dict, dtype: DType, pass_: str):
    return autograd_pass(combine, inp, pass_, GRADS)


@MOE_UNPERMUTE.backend("triton", impl="opbench/kernels/moe_routing.py: unpermute_combine (gather, weight and sum in one "
                                      "pass) and combine_backward", requires=needs_triton_gpu)
def unpermute_triton(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.moe_routing import combine_backward, unpermute_combine

    y, row_of, weights = inp["y"], inp["row_of"], inp["weights"]
    if pass_ == "fwd":
        return lambda: unpermute_combine(y, row_of, weights)
    dout = inp["dout"]
    return lambda: combine_backward(dout, y, row_of, weights)
