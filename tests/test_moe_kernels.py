"""The MoE Triton kernels against float64 references, under TRITON_INTERPRET=1 on a CPU (tests/conftest.py),
at ragged sizes: an expert without tokens, one with a single token, N and K not multiples of the block.
fp32 and fp16 only: the interpreter computes bf16 dots wrongly."""

import pytest
import torch

from opbench.measure.gate import check
from opbench.ops import routing
from opbench.ops.dtypes import get_dtype
from opbench.ops.fused_moe import FUSED_MOE, FusedMoEShape
from opbench.ops.grouped_gemm import GROUPED_GEMM, GroupedGemmShape, loop, per_expert
from opbench.ops.moe_route import MOE_ROUTE, RouteShape
from opbench.ops.moe_permute import PermuteShape
from opbench.ops.moe_unpermute import MOE_UNPERMUTE

pytest.importorskip("triton")

DTYPES = ["fp32", "fp16"]
COUNTS = (0, 1, 37, 0, 5, 19, 2)  # empty experts, a single token, and more than one M tile (16 rows)
N, K = 45, 71  # the interpreter's tiles are 32 wide: neither is a multiple


def _ragged_inputs(dtype, pass_):
    torch.manual_seed(1)
    rows, groups = sum(COUNTS), len(COUNTS)
    t = get_dtype(dtype).torch
    inp = {"offs": routing.offsets(COUNTS), "counts": COUNTS}
    if pass_ == "fwd":
        inp.update(x=torch.randn(rows, K, dtype=t), w=torch.randn(groups, N, K, dtype=t))
    elif pass_ == "dgrad":
        inp.update(dy=torch.randn(rows, N, dtype=t), w=torch.randn(groups, N, K, dtype=t))
    else:
        inp.update(dy=torch.randn(rows, N, dtype=t), x=torch.randn(rows, K, dtype=t))
    return inp


@pytest.mark.parametrize("pass_", ["fwd", "dgrad", "wgrad"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_grouped_gemm_matches_float64_at_ragged_sizes(dtype, pass_):
    d = get_dtype(dtype)
    inp = _ragged_inputs(dtype, pass_)
    out = GROUPED_GEMM.backends["triton"].prepare(inp, d, pass_)()
    ref = loop(inp, pass_, lambda t: t.double())
    assert check(out, ref, d.tol).passed
    if pass_ == "wgrad":  # experts without tokens get a zero gradient, not garbage
        assert not out[0].any() and not out[3].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_grouped_gemm_at_a_drawn_expert_parallel_shape(dtype):
    s = GroupedGemmShape(tokens=5, experts=16, top_k=3, ep=2, n=N, k=K, skew_milli=1200)
    assert 0 in per_expert(s) and len(per_expert(s)) == 8  # the busiest rank's 8 experts, one of them idle
    d = get_dtype(dtype)
    torch.manual_seed(2)
    for pass_ in ("fwd", "wgrad"):
        inp = GROUPED_GEMM.inputs(s, d, pass_, "cpu")
        out = GROUPED_GEMM.backends["triton"].prepare(inp, d, pass_)()
        assert check(out, GROUPED_GEMM.reference(inp, d, pass_), d.tol).passed


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_fused_moe_matches_float64_with_idle_and_single_token_experts(dtype):
    s = FusedMoEShape(tokens=9, experts=10, top_k=2, hidden=K, ffn=N, skew_milli=1500)
    counts = routing.counts(s.tokens, s.experts, s.top_k, skew_milli=s.skew_milli)
    assert 0 in counts and 1 in counts
    d = get_dtype(dtype)
    torch.manual_seed(3)
    inp = FUSED_MOE.inputs(s, d, "fwd", "cpu")
    ref = FUSED_MOE.reference(inp, d, "fwd")
    for backend in ("triton", "torch"):  # the fused kernel and the unfused path it is priced against
        out = FUSED_MOE.backends[backend].prepare(inp, d, "fwd")()
        verdict = check(out, ref, d.tol)
        assert verdict.passed, (backend, verdict)


def test_fused_alignment_pads_each_expert_to_whole_blocks():
    from opbench.kernels.fused_moe import align

    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])  # expert 1 idle
    sorted_ids, block_expert, total = align(ids, 4, 4)
    assert total.item() == 12  # experts 0, 2 and 3 one block each
    assert sorted_ids[:12].tolist() == [1, 4, 6, 6, 0, 2, 5, 6, 3, 6, 6, 6]  # copy ids, 6 (= copies) pads
    assert block_expert[:3].tolist() == [0, 2, 3]


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("sigmoid, renorm", [(0, 1), (1, 1), (0, 0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_route_chooses_the_same_experts_and_weights(dtype, sigmoid, renorm, pass_):
    s = RouteShape(tokens=13, experts=20, top_k=3, sigmoid=sigmoid, renorm=renorm, skew_milli=800)
    d = get_dtype(dtype)
    torch.manual_seed(4)
    inp = MOE_ROUTE.inputs(s, d, pass_, "cpu")
    out = MOE_ROUTE.backends["triton"].prepare(inp, d, pass_)()
    assert check(out, MOE_ROUTE.reference(inp, d, pass_), d.tol).passed
    if pass_ == "fwd":
        assert torch.equal(out[1], routing.draw(13, 20, 3, skew_milli=800))


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_unpermute_combine_matches_float64(dtype, pass_):
    s = PermuteShape(tokens=11, experts=6, top_k=3, hidden=1100, skew_milli=900)  # > one 1024 block of H
    d = get_dtype(dtype)
    torch.manual_seed(5)
    inp = MOE_UNPERMUTE.inputs(s, d, pass_, "cpu")
    out = MOE_UNPERMUTE.backends["triton"].prepare(inp, d, pass_)()
    assert check(out, MOE_UNPERMUTE.reference(inp, d, pass_), d.tol).passed


def test_grouped_mm_backend_runs_on_cpu_and_names_what_it_cannot_take():
    requires = GROUPED_GEMM.backends["torch-grouped_mm"].requires
    aligned = GroupedGemmShape(tokens=6, experts=4, top_k=2, ep=1, n=48, k=32)
    assert requires(aligned, get_dtype("fp32"), "cpu") is None
    assert "multiple of 16 bytes" in requires(GroupedGemmShape(6, 4, 2, 1, N, K), get_dtype("fp32"), "cpu")
    assert "bf16" in requires(aligned, get_dtype("fp16"), "cuda")
    d = get_dtype("fp32")
    for pass_ in ("fwd", "dgrad", "wgrad"):
        inp = GROUPED_GEMM.inputs(aligned, d, pass_, "cpu")
        out = GROUPED_GEMM.backends["torch-grouped_mm"].prepare(inp, d, pass_)()
        assert check(out, GROUPED_GEMM.reference(inp, d, pass_), d.tol).passed


def test_triton_backends_skip_on_a_cpu_with_their_reason():
    for family in (GROUPED_GEMM, FUSED_MOE, MOE_ROUTE, MOE_UNPERMUTE):
        reason = family.backends["triton"].requires(None, get_dtype("fp32"), "cpu")
        assert reason and "GPU" in reason
