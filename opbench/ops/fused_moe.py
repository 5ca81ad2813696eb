"""Fused MoE: the routed experts of a SwiGLU MoE layer as one op, from the unpermuted tokens and their
routing to the combined output:
  out[t] = sum_j w[t, j] (silu(x_t W1_e^T [gate]) * x_t W1_e^T [up]) W2_e^T,   e = ids[t, j]
The suite's Triton kernel fuses the permutation into the grouped GEMMs (kernels/fused_moe.py); the
torch backend is the unfused path an eager layer runs (permute, grouped GEMM, SwiGLU, grouped GEMM,
weighted un-permutation), so the two side by side price the fusion. Inference only (forward); the
ids are the seeded routing draw's, the weights random and renormalised. Cases come from the plans'
MoE layers without expert parallelism (opbench.spec.plan.fused_moe_calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opbench.ops import routing
from opbench.ops.base import OpFamily, high_precision, needs_triton_gpu
from opbench.ops.dtypes import DType
from opbench.ops.grouped_gemm import grouped_linear
from opbench.ops.moe_permute import permute
from opbench.ops.moe_unpermute import combine

INDEX_BYTES, WEIGHT_BYTES = 8, 4


@dataclass(frozen=True)
class FusedMoEShape:
    tokens: int
    experts: int
    top_k: int
    hidden: int
    ffn: int  # each expert's MLP width (on this GPU)
    seed: int = routing.ROUTING_SEED
    skew_milli: int = 0


def shape_id(s: FusedMoEShape) -> str:
    """'t64-e128top8-2048x768'."""
    return routing.moe_id(s, s.hidden, s.ffn)


def per_expert(s: FusedMoEShape) -> tuple[int, ...]:
    return routing.counts(s.tokens, s.experts, s.top_k, s.seed, s.skew_milli)


def describe(s: FusedMoEShape) -> str:
    return routing.describe_counts(per_expert(s))


def flops(s: FusedMoEShape, pass_: str = "fwd") -> int:
    """The two GEMMs over the routed copies only: 2 T k H (2 F) + 2 T k F H = 6 T k H F (the SwiGLU and
    the combine, 5 T k F and 2 T k H, are left out as noise beside them)."""
    return 6 * s.tokens * s.top_k * s.hidden * s.ffn


def bytes_moved(s: FusedMoEShape, dtype: DType, pass_: str = "fwd") -> int:
    """What no implementation avoids: the tokens read and the output written, the ids and weights read,
    and the weights of the experts that received a token (3 H F each); at decode batches the experts'
    weights are nearly all of it."""
    hit = sum(1 for c in per_expert(s) if c)
    return (2 * s.tokens * s.hidden + hit * 3 * s.hidden * s.ffn) * dtype.bytes \
        + s.tokens * s.top_k * (INDEX_BYTES + WEIGHT_BYTES)


def inputs(s: FusedMoEShape, dtype: DType, pass_: str, device: str) -> dict:
    def randn(*size, scale=1.0):
        return (torch.randn(*size, device=device) * scale).to(dtype.torch)
    # weights scaled as initialised layers are, so the fp16 activations stay in range
    return {"x": randn(s.tokens, s.hidden), "w1": randn(s.experts, 2 * s.ffn, s.hidden, scale=s.hidden ** -0.5),
            "w2": randn(s.experts, s.hidden, s.ffn, scale=s.ffn ** -0.5),
            "ids": routing.draw(s.tokens, s.experts, s.top_k, s.seed, s.skew_milli).to(device),
            "weights": torch.rand(s.tokens, s.top_k, device=device).add_(0.1).softmax(dim=-1)}


def reference(inp: dict, dtype: DType, pass_: str) -> torch.Tensor:
    """Copy by copy in float64: each chosen expert's MLP on the token, weighted and summed."""
    x, w1, w2 = (high_precision(inp[n]) for n in ("x", "w1", "w2"))
    ids, weights = inp["ids"], high_precision(inp["weights"])
    out = torch.zeros_like(x)
    for j in range(ids.shape[1]):
        e = ids[:, j]
        gate, up = torch.einsum("th,tfh->tf", x, w1[e]).chunk(2, dim=-1)
        out += weights[:, j:j + 1] * torch.einsum("tf,thf->th", F.silu(gate) * up, w2[e])
    return out


def experts_unfused(x, w1, w2, ids, weights) -> torch.Tensor:
    """The eager path: permute, grouped GEMM (torch.nn.functional.grouped_mm where it takes the shape,
    else a loop over the experts), SwiGLU, grouped GEMM, weighted un-permutation."""
    xs, row_of, offs = permute(x, ids, w1.shape[0])
    gate, up = grouped_linear(xs, w1, offs).chunk(2, dim=-1)
    return combine(grouped_linear(F.silu(gate) * up, w2, offs), row_of, weights)


FUSED_MOE = OpFamily(name="fused_moe", shape_type=FusedMoEShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                     reference=reference, shape_id=shape_id, describe=describe)


@FUSED_MOE.backend("torch", impl="unfused eager torch: permute, torch.nn.functional.grouped_mm (a loop where it "
                                 "does not take the shape), SwiGLU, grouped_mm, weighted un-permutation")
def fused_moe_torch(inp: dict, dtype: DType, pass_: str):
    x, w1, w2, ids, weights = (inp[n] for n in ("x", "w1", "w2", "ids", "weights"))
    return lambda: experts_unfused(x, w1, w2, ids, weights)


@FUSED_MOE.backend("triton", impl="opbench/kernels/fused_moe.py: the permutation fused into both grouped GEMMs "
                                  "(rows gathered by copy id), the routing weight in the down GEMM's epilogue",
                   requires=needs_triton_gpu)
def fused_moe_triton(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.fused_moe import fused_moe

    x, w1, w2, ids, weights = (inp[n] for n in ("x", "w1", "w2", "ids", "weights"))
    return lambda: fused_moe(x, w1, w2, weights, ids)
