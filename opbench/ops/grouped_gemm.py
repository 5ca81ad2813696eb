"""Grouped GEMM: the experts of a mixture-of-experts layer, each a linear layer over its own tokens.

Contiguous layout: the routed token copies sit in one (rows, k) matrix sorted by expert, expert e's
rows from offs[e-1] to offs[e] (int32 cumulative ends); the weights are (experts, n, k), each expert's
out x in as a linear layer holds it. The shape names the layer (n: out features, k: in features) for
every pass, and the pass says which GEMM runs:
  fwd    Y_e (m_e, n) = X_e W_e^T
  dgrad  dX_e (m_e, k) = dY_e W_e
  wgrad  dW_e (n, k) = dY_e^T X_e     (ragged along the reduction; an expert without tokens gets zeros)
The rows per expert come from the seeded routing draw (opbench.ops.routing): under expert parallelism
(ep > 1) they are the busiest rank's experts, each ep rank bringing `tokens` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opbench.ops import routing
from opbench.ops.dtypes import DType
from opbench.ops.base import OpFamily, all_of, high_precision, needs_triton_gpu


@dataclass(frozen=True)
class GroupedGemmShape:
    tokens: int  # tokens each rank routes (the layer's tokens on one GPU)
    experts: int  # routed experts of the layer (all ranks)
    top_k: int  # experts per token
    ep: int  # expert-parallel ranks; this GPU holds experts / ep of them
    n: int  # out features of each expert's linear layer
    k: int  # in features
    seed: int = routing.ROUTING_SEED
    skew_milli: int = 0  # Zipf exponent x 1000 of the routing draw; 0 uniform


def per_expert(s) -> tuple[int, ...]:
    """Rows of each expert on this GPU (the busiest rank's under ep)."""
    return routing.local_counts(s.tokens, s.experts, s.top_k, s.ep, s.seed, s.skew_milli)


def shape_id(s: GroupedGemmShape) -> str:
    return routing.moe_id(s, s.n, s.k)


def flops(s: GroupedGemmShape, pass_: str = "fwd") -> int:
    """2 x rows x n x k: the routed token copies only, whatever the pass."""
    return 2 * sum(per_expert(s)) * s.n * s.k


def bytes_moved(s: GroupedGemmShape, dtype: DType, pass_: str = "fwd") -> int:
    """The two activation matrices (rows x k and rows x n, one read and one written in every pass) and
    the weights of the experts that received a token: (rows (n + k) + hit n k) x element size."""
    counts = per_expert(s)
    hit = sum(1 for c in counts if c)
    return (sum(counts) * (s.n + s.k) + hit * s.n * s.k) * dtype.bytes


def describe(s: GroupedGemmShape) -> str:
    counts = per_expert(s)
    where = ""
    if s.ep > 1:
        r = routing.busiest_rank(s.tokens, s.experts, s.top_k, s.ep, s.seed, s.skew_milli)
        per = s.experts // s.ep
        where = f"busiest of {s.ep} ranks: rank {r}, experts {r * per}-{(r + 1) * per - 1}; "
    return where + routing.describe_counts(counts)


def inputs(s: GroupedGemmShape, dtype: DType, pass_: str, device: str) -> dict:
    counts = per_expert(s)
    rows, groups = sum(counts), len(counts)

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype.torch)
    inp = {"offs": routing.offsets(counts, device), "counts": counts}
    if pass_ == "fwd":
        inp.update(x=randn(rows, s.k), w=randn(groups, s.n, s.k))
    elif pass_ == "dgrad":
        inp.update(dy=randn(rows, s.n), w=randn(groups, s.n, s.k))
    else:
        inp.update(dy=randn(rows, s.n), x=randn(rows, s.k))
    return inp


def _segments(counts) -> list[tuple[int, int]]:
    ends = [sum(counts[:i + 1]) for i in range(len(counts))]
    return list(zip([0] + ends[:-1], ends))


def loop(inp: dict, pass_: str, cast=lambda t: t) -> torch.Tensor:
    """Expert by expert, one matmul each: what the other backends are checked against (in float64)."""
    segments = _segments(inp["counts"])
    if pass_ == "fwd":
        x, w = cast(inp["x"]), cast(inp["w"])
        return torch.cat([x[a:b] @ w[e].t() for e, (a, b) in enumerate(segments)])
    if pass_ == "dgrad":
        dy, w = cast(inp["dy"]), cast(inp["w"])
        return torch.cat([dy[a:b] @ w[e] for e, (a, b) in enumerate(segments)])
    dy, x = cast(inp["dy"]), cast(inp["x"])
    return torch.stack([dy[a:b].t() @ x[a:b] for a, b in segments])


def grouped_linear(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a W_e^T for each expert's rows (w: (experts, out, in)), differentiable: what an eager MoE layer
    calls. torch.nn.functional.grouped_mm where it takes the operands (16-byte rows; float32, bf16 or
    fp16 on a CPU, bf16 on CUDA), else a loop over the experts."""
    aligned = (a.shape[1] * a.element_size()) % 16 == 0 and (w.shape[1] * w.element_size()) % 16 == 0
    supported = a.dtype == torch.bfloat16 or (a.device.type == "cpu" and a.dtype in (torch.float32, torch.float16))
    if hasattr(F, "grouped_mm") and aligned and supported:
        return F.grouped_mm(a, w.transpose(-2, -1), offs=offs)
    ends = offs.tolist()
    return torch.cat([a[s:e] @ w[i].t() for i, (s, e) in enumerate(zip([0] + ends[:-1], ends))])


def reference(inp: dict, dtype: DType, pass_: str) -> torch.Tensor:
    return loop(inp, pass_, high_precision)


GROUPED_GEMM = OpFamily(name="grouped_gemm", shape_type=GroupedGemmShape, flops=flops, bytes=bytes_moved,
                        inputs=inputs, reference=reference, shape_id=shape_id, describe=describe)


@GROUPED_GEMM.backend("torch", impl="a Python loop over the experts, torch.matmul each (cuBLAS / the CPU BLAS)")
def torch_loop(inp: dict, dtype: DType, pass_: str):
    return lambda: loop(inp, pass_)


def needs_grouped_mm(s: GroupedGemmShape, dtype: DType, device: str) -> str | None:
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm (torch 2.9 or newer)"
    if (s.n * dtype.bytes) % 16 or (s.k * dtype.bytes) % 16:
        return f"torch.nn.functional.grouped_mm needs rows of a multiple of 16 bytes (n={s.n}, k={s.k}, {dtype.name})"
    if device == "cuda" and dtype.torch != torch.bfloat16:
        return "torch.nn.functional.grouped_mm takes bf16 on CUDA"
    return None


@GROUPED_GEMM.backend("torch-grouped_mm", impl="torch.nn.functional.grouped_mm, offsets as int32 cumulative ends",
                      requires=needs_grouped_mm)
def torch_grouped_mm(inp: dict, dtype: DType, pass_: str):
    offs = inp["offs"]
    if pass_ == "fwd":
        x, wt = inp["x"], inp["w"].transpose(-2, -1)
        return lambda: F.grouped_mm(x, wt, offs=offs)
    if pass_ == "dgrad":
        dy, w = inp["dy"], inp["w"]
        return lambda: F.grouped_mm(dy, w, offs=offs)
    dyt, x = inp["dy"].t(), inp["x"]
    return lambda: F.grouped_mm(dyt, x, offs=offs)


@GROUPED_GEMM.backend("triton", impl="opbench/kernels/grouped_gemm.py: tiles of each expert's rows (fwd, dgrad), "
                                     "a ragged reduction per expert (wgrad)", requires=all_of(needs_triton_gpu))
def triton_grouped(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.grouped_gemm import grouped_gemm, grouped_gemm_wgrad

    offs = inp["offs"]
    if pass_ == "fwd":
        x, wt = inp["x"], inp["w"].transpose(-2, -1)
        return lambda: grouped_gemm(x, wt, offs)
    if pass_ == "dgrad":
        dy, w = inp["dy"], inp["w"]
        return lambda: grouped_gemm(dy, w, offs)
    dy, x = inp["dy"], inp["x"]
    return lambda: grouped_gemm_wgrad(dy, x, offs)
