"""MoE routing: router logits to each token's experts and their weights.

  scores   softmax over the experts (Mixtral, Qwen) or an independent sigmoid per expert (DeepSeek-V3)
  top-k    the top_k experts of each token, in decreasing score
  renorm   the chosen scores divided by their sum (router_norm), else kept as they are
Weights are fp32 and ids int64 whatever the logits' dtype, as inference stacks keep them. The logits
of a case come from the seeded routing draw (opbench.ops.routing.distinct_logits), evenly spaced so
that no two scores of a token tie in any dtype and every backend must choose the same experts. The
backward takes the weights' gradient to the logits' (the ids carry none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opbench.ops import routing
from opbench.ops.base import OpFamily, high_precision, needs_triton_gpu
from opbench.ops.dtypes import DType

WEIGHT_BYTES, ID_BYTES = 4, 8  # fp32 weights, int64 ids


@dataclass(frozen=True)
class RouteShape:
    tokens: int
    experts: int
    top_k: int
    sigmoid: int  # 0: softmax scores; 1: sigmoid scores
    renorm: int  # 1: the top-k weights renormalised to sum to one
    seed: int = routing.ROUTING_SEED
    skew_milli: int = 0


def shape_id(s: RouteShape) -> str:
    """'t64-e128top8-softmax-norm'."""
    return f"{routing.moe_id(s)}-{'sigmoid' if s.sigmoid else 'softmax'}{'-norm' if s.renorm else ''}"


def flops(s: RouteShape, pass_: str = "fwd") -> int:
    """Per token: scores 5 per expert for softmax (max, subtract, exp, sum, divide) or 4 for sigmoid
    (negate, exp, add, reciprocal); the top-k one comparison per expert per choice; renormalising 2 per
    choice (sum, divide). bwd: the renormalisation's 4 per choice and the scores' 4 per expert."""
    if pass_ == "fwd":
        per_token = (4 if s.sigmoid else 5) * s.experts + s.top_k * s.experts + 2 * s.top_k * s.renorm
    else:
        per_token = 4 * s.top_k * s.renorm + 4 * s.experts
    return s.tokens * per_token


def bytes_moved(s: RouteShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: the logits read, weights (fp32) and ids (int64) written. bwd: the weights' gradient and the
    ids read, the logits read and their gradient written."""
    logits = s.tokens * s.experts * dtype.bytes
    chosen = s.tokens * s.top_k * (WEIGHT_BYTES + ID_BYTES)
    return logits + chosen if pass_ == "fwd" else 2 * logits + chosen


def inputs(s: RouteShape, dtype: DType, pass_: str, device: str) -> dict:
    logits = routing.distinct_logits(s.tokens, s.experts, s.seed, s.skew_milli).to(device=device, dtype=dtype.torch)
    inp = {"logits": logits.contiguous(), "top_k": s.top_k, "sigmoid": bool(s.sigmoid), "renorm": bool(s.renorm)}
    if pass_ == "bwd":
        inp["dweights"] = torch.randn(s.tokens, s.top_k, device=device, dtype=torch.float32)
    return inp


def route(logits: torch.Tensor, top_k: int, sigmoid: bool, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch ops an eager MoE layer runs."""
    scores = logits.float().sigmoid() if sigmoid else logits.float().softmax(dim=-1)
    weights, ids = scores.topk(top_k, dim=-1)
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _formula(logits, top_k, sigmoid, renorm):
    """The same in float64 by a full sort: the reference."""
    scores = torch.sigmoid(logits) if sigmoid else torch.exp(logits - logits.logsumexp(dim=-1, keepdim=True))
    ordered, order = scores.sort(dim=-1, descending=True, stable=True)
    weights, ids = ordered[:, :top_k], order[:, :top_k]
    return (weights / weights.sum(dim=-1, keepdim=True) if renorm else weights), ids


def _pass(fn, inp: dict, pass_: str):
    """fwd: (weights, ids). bwd: the logits' gradient from the weights' (a leaf copy of the logits)."""
    args = (inp["top_k"], inp["sigmoid"], inp["renorm"])
    if pass_ == "fwd":
        return lambda: fn(inp["logits"], *args)
    logits = inp["logits"].detach().requires_grad_()
    weights = fn(logits, *args)[0]
    return lambda: torch.autograd.grad(weights, logits, inp["dweights"], retain_graph=True)[0]


def reference(inp: dict, dtype: DType, pass_: str):
    precise = dict(inp, logits=high_precision(inp["logits"]))
    if "dweights" in inp:
        precise["dweights"] = high_precision(inp["dweights"])
    out = _pass(_formula, precise, pass_)()
    return (out[0], out[1].to(precise["logits"].dtype)) if pass_ == "fwd" else out


MOE_ROUTE = OpFamily(name="moe_route", shape_type=RouteShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                     reference=reference, shape_id=shape_id)


@MOE_ROUTE.backend("torch", impl="eager torch: softmax or sigmoid in fp32, topk, division; backward: autograd")
def route_torch(inp: dict, dtype: DType, pass_: str):
    return _pass(route, inp, pass_)


@MOE_ROUTE.backend("triton", impl="opbench/kernels/moe_routing.py: route and route_backward, one program per token "
                                  "(scores, top-k and renormalisation together)", requires=needs_triton_gpu)
def route_triton(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.moe_routing import route as route_kernel
    from opbench.kernels.moe_routing import route_backward

    logits, top_k, args = inp["logits"], inp["top_k"], dict(sigmoid=inp["sigmoid"], renorm=inp["renorm"])
    if pass_ == "fwd":
        return lambda: route_kernel(logits, top_k, **args)
    dweights = inp["dweights"]
    return lambda: route_backward(logits, dweights, top_k, **args)
