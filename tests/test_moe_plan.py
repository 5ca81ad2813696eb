"""Plans of models whose layers differ, and of mixtures of experts at ep 1 and beyond, by hand."""

import json
from dataclasses import replace

import pytest

from opbench.ops import routing
from opbench.ops.attention import AttentionShape
from opbench.ops.collective import AllToAllVShape, CollectiveShape
from opbench.ops.gemm import GemmShape
from opbench.ops.grouped_gemm import GroupedGemmShape, per_expert
from opbench.ops.moe_permute import PermuteShape
from opbench.ops.moe_route import RouteShape
from opbench.ops.tokenwise import RowsShape
from opbench.spec.models import ZOO
from opbench.spec.plan import Plan, fused_moe_calls, plan
from opbench.spec.workload import WORKLOAD_SYNTAX, PlanError, Workload, parse_workload


def calls_of(p, kind="full/moe", fwd_only=True):
    """(role, op, shape, count) of one kind of layer's calls."""
    return [(c.role, c.op, c.shape, c.count) for c in p.calls
            if c.kind == kind and (c.pass_ == "fwd" or not fwd_only)]


def mlp_block(p, kind="full/moe"):
    """The calls after the attention block's residual add."""
    calls = calls_of(p, kind)
    start = next(i for i, c in enumerate(calls) if c[0] == "norm.post_attn")
    return calls[start + 1:]


# Mixtral-8x7B: hidden 4096, 8 experts of width 14336, top-2, softmax with renormalisation --------------

def test_mixtral_8x7b_prefill_without_expert_parallelism():
    p = plan(ZOO["mixtral-8x7b"], parse_workload("prefill:b=1,s=512"))
    assert p.kinds() == {"full/moe": 32}
    assert mlp_block(p) == [
        ("moe.route.router", "gemm", GemmShape(512, 8, 4096), 1),
        ("moe.route.topk", "moe_route", RouteShape(512, 8, 2, 0, 1, 0, 0), 1),
        ("moe.route.permute", "moe_permute", PermuteShape(512, 8, 2, 4096, 0, 0), 1),
        ("moe.expert.gate_up", "grouped_gemm", GroupedGemmShape(512, 8, 2, 1, 2 * 14336, 4096, 0, 0), 1),
        ("moe.expert.act", "swiglu", RowsShape(512 * 2, 14336), 1),  # every copy, all experts on this GPU
        ("moe.expert.down", "grouped_gemm", GroupedGemmShape(512, 8, 2, 1, 4096, 14336, 0, 0), 1),
        ("moe.route.unpermute", "moe_unpermute", PermuteShape(512, 8, 2, 4096, 0, 0), 1),
        ("residual.mlp", "add", RowsShape(512, 4096), 1),
    ]
    gate_up = mlp_block(p)[3][2]
    assert sum(per_expert(gate_up)) == 1024 and len(per_expert(gate_up)) == 8
    assert all(c.layers == 32 for c in p.calls if c.scope == "layer")
    # tensor parallelism without ep shards every expert's width, and all-reduces after the experts
    tp2 = plan(ZOO["mixtral-8x7b"], parse_workload("prefill:b=1,s=512,tp=2"))
    roles = {c[0]: c[2] for c in mlp_block(tp2)}
    assert roles["moe.expert.gate_up"] == GroupedGemmShape(512, 8, 2, 1, 14336, 4096)
    assert roles["moe.expert.down"] == GroupedGemmShape(512, 8, 2, 1, 4096, 7168)
    assert roles["tp.allreduce.mlp"] == CollectiveShape(512 * 4096 * 2, 2)


def test_mixtral_8x7b_prefill_at_ep_8():
    """One expert per GPU; each of the 8 GPUs brings its 512 tokens, 8192 copies in all."""
    p = plan(ZOO["mixtral-8x7b"], parse_workload("prefill:b=1,s=512,ep=8"))
    block = mlp_block(p)
    busiest = max(routing.counts(512 * 8, 8, 2))  # the most loaded of the 8 experts, over the group's draw
    assert busiest > 8192 // 8  # the mean
    dispatch = AllToAllVShape(512, 4096, 8, 2, 8, 0, 0)
    assert block == [
        ("moe.route.router", "gemm", GemmShape(512, 8, 4096), 1),
        ("moe.route.topk", "moe_route", RouteShape(512, 8, 2, 0, 1), 1),
        ("moe.route.permute", "moe_permute", PermuteShape(512, 8, 2, 4096), 1),
        ("ep.dispatch", "alltoallv", dispatch, 1),
        ("moe.route.regroup", "moe_permute", PermuteShape(busiest, 1, 1, 4096), 2),
        ("moe.expert.gate_up", "grouped_gemm", GroupedGemmShape(512, 8, 2, 8, 28672, 4096), 1),
        ("moe.expert.act", "swiglu", RowsShape(busiest, 14336), 1),
        ("moe.expert.down", "grouped_gemm", GroupedGemmShape(512, 8, 2, 8, 4096, 14336), 1),
        ("ep.combine", "alltoallv", dispatch, 1),
        ("moe.route.unpermute", "moe_unpermute", PermuteShape(512, 8, 2, 4096), 1),
        ("residual.mlp", "add", RowsShape(512, 4096), 1),
    ]
    assert per_expert(block[5][2]) == (busiest,)
    assert p.workload.gpus == 8 and p.workload.replicas == 8


# Qwen3-30B-A3B: hidden 2048, 128 experts of width 768, top-8; 32 query and 4 kv heads of 128 -----------

def test_qwen3_30b_a3b_decode_at_ep_1_and_8():
    p1 = plan(ZOO["qwen3-30b-a3b"], parse_workload("decode:b=64,s=4096"))
    roles = {c[0]: c[2] for c in calls_of(p1)}
    assert roles["attn.qkv"] == GemmShape(64, (32 + 2 * 4) * 128, 2048)
    assert roles["attn.o"] == GemmShape(64, 2048, 32 * 128)
    assert roles["attn.core"] == AttentionShape(64, 32, 4, 128, 1, 4096, 1, 0, 0)
    assert roles["moe.route.router"] == GemmShape(64, 128, 2048)
    assert roles["moe.route.topk"] == RouteShape(64, 128, 8, 0, 1)
    assert roles["moe.expert.gate_up"] == GroupedGemmShape(64, 128, 8, 1, 2 * 768, 2048)
    assert roles["moe.expert.act"] == RowsShape(64 * 8, 768)
    assert roles["moe.expert.down"] == GroupedGemmShape(64, 128, 8, 1, 2048, 768)
    assert "moe.shared.gate_up" not in roles and "ep.dispatch" not in roles
    assert 0 in per_expert(roles["moe.expert.gate_up"])  # 512 copies over 128 experts: some idle

    p8 = plan(ZOO["qwen3-30b-a3b"], parse_workload("decode:b=64,s=4096,ep=8"))
    roles = {c[0]: c for c in calls_of(p8)}
    rows = routing.ep_splits(64, 128, 8, 8)
    received = [sum(r[j] for r in rows) for j in range(8)]
    assert roles["ep.dispatch"][2] == AllToAllVShape(64, 2048, 128, 8, 8)
    assert roles["moe.expert.gate_up"][2] == GroupedGemmShape(64, 128, 8, 8, 1536, 2048)
    assert len(per_expert(roles["moe.expert.gate_up"][2])) == 16  # 128 experts / 8 GPUs
    assert roles["moe.expert.act"][2] == RowsShape(max(received), 768)
    assert roles["moe.route.regroup"][2:] == (PermuteShape(max(received), 16, 1, 2048), 2)


def test_qwen3_30b_a3b_with_tensor_and_expert_parallelism():
    """tp 4 inside ep 8: two attention replicas of 4 GPUs; each GPU dispatches a quarter of its replica's
    tokens, and the quarters are gathered again after the combine."""
    p = plan(ZOO["qwen3-30b-a3b"], parse_workload("decode:b=64,s=4096,tp=4,ep=8"))
    roles = {c[0]: c[2] for c in calls_of(p)}
    assert roles["attn.core"] == AttentionShape(64, 8, 1, 128, 1, 4096, 1, 0, 0)
    assert roles["moe.route.router"] == GemmShape(16, 128, 2048)
    assert roles["moe.expert.gate_up"] == GroupedGemmShape(16, 128, 8, 8, 1536, 2048)  # whole experts
    assert roles["tp.allgather.moe"] == CollectiveShape(64 * 2048 * 2, 4)
    assert "tp.allreduce.mlp" not in roles and p.workload.gpus == 8 and p.workload.replicas == 2
    tp4 = {c[0]: c[2] for c in calls_of(plan(ZOO["qwen3-30b-a3b"], parse_workload("decode:b=64,s=4096,tp=4")))}
    assert tp4["moe.expert.gate_up"] == GroupedGemmShape(64, 128, 8, 1, 2 * 192, 2048)
    assert tp4["moe.expert.down"] == GroupedGemmShape(64, 128, 8, 1, 2048, 192)


def test_training_runs_every_pass_and_dispatches_twice():
    p = plan(ZOO["tiny-moe"], parse_workload("train:b=2,s=96,ep=2"))
    moe = calls_of(p, fwd_only=False)
    passes = {(c[0], c[1]): set() for c in moe}
    for c in p.calls:
        if c.kind == "full/moe":
            passes[(c.role, c.op)].add(c.pass_)
    assert passes[("moe.expert.gate_up", "grouped_gemm")] == {"fwd", "dgrad", "wgrad"}
    assert passes[("moe.route.topk", "moe_route")] == {"fwd", "bwd"}
    assert {c[3] for c in moe if c[0].startswith("ep.")} == {2}  # forward and backward


def test_plan_errors_name_what_does_not_fit():
    with pytest.raises(PlanError, match="ep=3 does not divide tiny-moe's 8 experts"):
        plan(ZOO["tiny-moe"], parse_workload("decode:b=4,s=64,ep=3"))
    narrow = replace(ZOO["tiny-moe"], heads=8, kv_heads=4, moe_ffn_hidden=138)  # 138 does not split four ways
    with pytest.raises(PlanError, match="tp=4 does not divide tiny-moe's expert width 138"):
        plan(narrow, parse_workload("decode:b=4,s=64,tp=4"))
    assert plan(narrow, parse_workload("decode:b=4,s=64,tp=4,ep=4"))  # whole experts under ep
    with pytest.raises(PlanError, match="no experts"):
        plan(ZOO["tiny"], parse_workload("decode:b=4,s=64,ep=2"))
    with pytest.raises(PlanError, match="multiple of tp"):
        parse_workload("decode:b=4,s=64,tp=4,ep=2")


# Layer kinds -------------------------------------------------------------------------------------------

def test_a_homogeneous_model_has_one_kind_repeated_in_every_layer():
    p = plan(ZOO["llama-3-8b"], parse_workload("train:b=1,s=512"))
    assert p.kinds() == {"full/dense": 32}
    assert all((c.layers, c.kind) == ((32, "full/dense") if c.scope == "layer" else (1, "")) for c in p.calls)
    assert plan(ZOO["mistral-7b"], parse_workload("prefill:b=1,s=8192")).kinds() == {"window/dense": 32}


def test_alternating_windows_and_dense_first_layers_plan_each_kind_once():
    oss = plan(ZOO["gpt-oss-120b"], parse_workload("prefill:b=1,s=1024"))
    assert oss.kinds() == {"window/moe": 18, "full/moe": 18}
    windows = {c.kind: c.shape.window for c in oss.calls if c.op == "attention"}
    assert windows == {"window/moe": 128, "full/moe": 0}
    v3 = plan(ZOO["deepseek-v3"], parse_workload("decode:b=8,s=1024"))
    assert v3.kinds() == {"full/dense": 3, "full/moe": 58}
    roles = {c[0]: c[2] for c in calls_of(v3)}
    assert roles["moe.route.topk"] == RouteShape(8, 256, 8, 1, 1)  # sigmoid scores, renormalised
    assert roles["moe.shared.gate_up"] == GemmShape(8, 2 * 2048, 7168)
    assert "mlp.gate_up" in {c[0] for c in calls_of(v3, "full/dense")}
    adam = {c.kind: (c.layers, c.shape.params) for c in plan(ZOO["tiny-moe"], parse_workload("train:b=1,s=64")).calls
            if c.role == "optim.adamw"}
    assert adam == {"full/dense": (1, ZOO["tiny-moe"].layer_params(0)), "full/moe": (1, ZOO["tiny-moe"].layer_params(1))}


def test_plans_round_trip_through_json_and_read_plans_without_kinds():
    p = plan(ZOO["tiny-moe"], parse_workload("decode:b=4,s=200,ep=2,skew=1.2"))
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    dense = plan(ZOO["tiny"], parse_workload("decode:b=4,s=200"))
    old = dense.to_dict()
    for c in old["calls"]:
        del c["layers"], c["kind"]
    assert Plan.from_dict(json.loads(json.dumps(old))) == dense


def test_fused_moe_calls_stand_for_the_experts_of_inference_plans_without_ep():
    p = plan(ZOO["qwen3-30b-a3b"], parse_workload("prefill:b=1,s=2048"))
    fused = fused_moe_calls(p)
    assert [(c.role, c.op, c.layers) for c in fused] == [("moe.expert.fused", "fused_moe", 48)]
    s = fused[0].shape
    assert (s.tokens, s.experts, s.top_k, s.hidden, s.ffn) == (2048, 128, 8, 2048, 768)
    assert fused_moe_calls(plan(ZOO["qwen3-30b-a3b"], parse_workload("decode:b=64,s=4096,ep=8"))) == []
    assert fused_moe_calls(plan(ZOO["tiny-moe"], parse_workload("train:b=1,s=64"))) == []


# The workload grammar -------------------------------------------------------------------------------------

def test_ep_and_skew_in_the_workload_grammar():
    w = parse_workload("decode:b=64,s=4096,ep=8,skew=1.2")
    assert (w.ep, w.skew, w.gpus) == (8, 1.2, 8)
    assert w.label == "decode:b=64,s=4096,tp=1,ep=8,skew=1.2"
    assert parse_workload("decode:b=64,s=4096").label == "decode:b=64,s=4096,tp=1"  # unchanged without them
    assert plan(ZOO["tiny-moe"], w.__class__("decode", 4, 64, ep=2, skew=0.5)).workload.skew == 0.5
    with pytest.raises(PlanError, match="skew must be a number"):
        parse_workload("decode:b=1,s=8,skew=high")
    with pytest.raises(PlanError, match="ep must be an integer"):
        parse_workload("decode:b=1,s=8,ep=1.5")
    with pytest.raises(PlanError, match="skew must be a number >= 0"):
        Workload("decode", 1, 8, skew=-1)
    with pytest.raises(PlanError) as error:
        parse_workload("decode b=1")
    assert WORKLOAD_SYNTAX in str(error.value) and ",ep=N" in WORKLOAD_SYNTAX


def test_the_routing_skew_is_recorded_in_the_plan_and_its_shapes():
    p = plan(ZOO["tiny-moe"], parse_workload("prefill:b=2,s=96,skew=1.2"))
    assert p.to_dict()["workload"]["skew"] == 1.2
    assert {c.shape.skew_milli for c in p.calls if hasattr(c.shape, "skew_milli")} == {1200}
