"""FLOPs and bytes of the MoE op families, by hand: FLOPs count the routed copies only, bytes the weights of
the experts a token reached."""

import pytest

from opbench.ops import routing
from opbench.ops.collective import ALLTOALLV, AllToAllVShape, busbw_factor
from opbench.ops.dtypes import get_dtype
from opbench.ops.fused_moe import FUSED_MOE, FusedMoEShape
from opbench.ops.grouped_gemm import GROUPED_GEMM, GroupedGemmShape, per_expert
from opbench.ops.moe_permute import MOE_PERMUTE, PermuteShape
from opbench.ops.moe_route import MOE_ROUTE, RouteShape
from opbench.ops.moe_unpermute import MOE_UNPERMUTE

FP32, BF16 = get_dtype("fp32"), get_dtype("bf16")
# 7 tokens, 9 experts, top-3, Zipf 1: the draw gives these rows per expert (21 copies, expert 6 idle)
DRAWN = (2, 5, 3, 2, 1, 2, 0, 4, 2)


def test_the_draw_these_figures_rest_on():
    assert routing.counts(7, 9, 3, skew_milli=1000) == DRAWN


@pytest.mark.parametrize("pass_", ["fwd", "dgrad", "wgrad"])
def test_grouped_gemm_counts_routed_rows_and_the_experts_hit(pass_):
    s = GroupedGemmShape(tokens=7, experts=9, top_k=3, ep=1, n=20, k=30, skew_milli=1000)
    assert per_expert(s) == DRAWN
    assert GROUPED_GEMM.flops(s, pass_) == 2 * 21 * 20 * 30 == 25200
    # 21 rows of 20 and of 30 elements, and the weights of the 8 experts that received a token
    assert GROUPED_GEMM.bytes(s, FP32, pass_) == (21 * (20 + 30) + 8 * 20 * 30) * 4 == 23400
    assert GROUPED_GEMM.bytes(s, BF16, pass_) == 11700


def test_at_a_decode_batch_of_one_the_expert_weights_are_the_cost():
    s = GroupedGemmShape(tokens=1, experts=128, top_k=8, ep=1, n=1536, k=2048)  # Qwen3-30B-A3B gate/up
    weights = 8 * 1536 * 2048 * 2
    assert GROUPED_GEMM.bytes(s, BF16) == 8 * (1536 + 2048) * 2 + weights == 50_388_992
    assert weights / GROUPED_GEMM.bytes(s, BF16) > 0.99
    assert GROUPED_GEMM.flops(s) == 2 * 8 * 1536 * 2048


def test_grouped_gemm_under_ep_counts_the_busiest_ranks_experts():
    s = GroupedGemmShape(tokens=4, experts=8, top_k=2, ep=2, n=10, k=10, skew_milli=1200)
    assert per_expert(s) == (3, 2, 4, 0)  # rank 1's experts 4-7 receive 9 of the 16 copies
    assert GROUPED_GEMM.flops(s) == 2 * 9 * 100
    assert GROUPED_GEMM.bytes(s, FP32) == (9 * 20 + 3 * 100) * 4


def test_routing_work():
    softmax, sigmoid = RouteShape(10, 16, 4, 0, 1), RouteShape(10, 16, 4, 1, 0)
    # per token: scores 5 per expert (softmax) or 4 (sigmoid), top-k 1 per expert and choice, renorm 2 per choice
    assert MOE_ROUTE.flops(softmax, "fwd") == 10 * (5 * 16 + 4 * 16 + 2 * 4) == 1520
    assert MOE_ROUTE.flops(sigmoid, "fwd") == 10 * (4 * 16 + 4 * 16) == 1280
    assert MOE_ROUTE.flops(softmax, "bwd") == 10 * (4 * 4 + 4 * 16) == 800
    # logits read; fp32 weights and int64 ids written
    assert MOE_ROUTE.bytes(softmax, BF16, "fwd") == 10 * 16 * 2 + 10 * 4 * (4 + 8) == 800
    assert MOE_ROUTE.bytes(softmax, BF16, "bwd") == 2 * 10 * 16 * 2 + 10 * 4 * 12 == 1120


def test_permutation_and_combine_work():
    s = PermuteShape(tokens=10, experts=16, top_k=4, hidden=32)
    # fwd: 10 rows read, 40 copies written, ids read and row_of written (int64), 16 int32 offsets
    assert MOE_PERMUTE.bytes(s, BF16, "fwd") == (10 + 40) * 32 * 2 + 2 * 40 * 8 + 16 * 4 == 3904
    assert MOE_PERMUTE.bytes(s, BF16, "bwd") == (10 + 40) * 32 * 2 + 40 * 8 == 3520
    assert (MOE_PERMUTE.flops(s, "fwd"), MOE_PERMUTE.flops(s, "bwd")) == (0, 3 * 10 * 32)
    # combine: a multiply and an add per copy element; the copies, row_of and weights read, the tokens written
    assert MOE_UNPERMUTE.flops(s, "fwd") == 2 * 40 * 32 == 2560
    assert MOE_UNPERMUTE.flops(s, "bwd") == 3 * 40 * 32
    assert MOE_UNPERMUTE.bytes(s, BF16, "fwd") == (40 + 10) * 32 * 2 + 40 * (8 + 4) == 3680
    assert MOE_UNPERMUTE.bytes(s, BF16, "bwd") == (10 + 2 * 40) * 32 * 2 + 40 * 12 + 40 * 4 == 6400


def test_fused_moe_work():
    s = FusedMoEShape(tokens=7, experts=9, top_k=3, hidden=30, ffn=20, skew_milli=1000)
    assert FUSED_MOE.flops(s) == 2 * 21 * 30 * 40 + 2 * 21 * 20 * 30 == 6 * 21 * 30 * 20
    # tokens in and out, the 8 hit experts' W1 (40 x 30) and W2 (30 x 20), ids and weights
    assert FUSED_MOE.bytes(s, BF16) == (2 * 7 * 30 + 8 * (40 * 30 + 30 * 20)) * 2 + 21 * 12 == 29892


def test_uneven_all_to_all_size_is_the_busiest_buffer():
    s = AllToAllVShape(tokens=4, hidden=192, experts=8, top_k=2, world=2, skew_milli=1200)
    # each rank sends 8 copies; rank 1 receives 9 of them
    assert ALLTOALLV.bytes(s, FP32) == 9 * 192 * 4 == 6912
    assert ALLTOALLV.flops(s) == 0 and busbw_factor("alltoallv", 8) == 7 / 8
    assert ALLTOALLV.id_of(s) == "t4-e8top2-192-n2-zipf1.2"


def test_shape_ids_are_short_and_stable():
    assert GROUPED_GEMM.id_of(GroupedGemmShape(64, 128, 8, 8, 1536, 2048)) == "t64-e128top8-ep8-1536x2048"
    assert GROUPED_GEMM.id_of(GroupedGemmShape(64, 128, 8, 1, 1536, 2048, seed=3, skew_milli=1200)) == \
        "t64-e128top8-1536x2048-zipf1.2-seed3"
    assert MOE_ROUTE.id_of(RouteShape(64, 256, 8, 1, 1)) == "t64-e256top8-sigmoid-norm"
    assert MOE_PERMUTE.id_of(PermuteShape(64, 128, 8, 2048)) == "t64-e128top8-2048"
    assert FUSED_MOE.id_of(FusedMoEShape(2048, 128, 8, 2048, 768)) == "t2048-e128top8-2048x768"
