"""Composition and estimates of models whose layers differ, and of mixtures of experts at any expert-parallel
degree, on synthetic runs whose answers are known."""

import json

import pytest

from opbench import cli
from opbench.analyze.alphabeta import PROFILES, Fit, predict
from opbench.analyze.compose import Breakdown, Composer
from opbench.analyze.estimate import (estimate_from, fewest_gpus, idealized_runtime, memory, model_flops_per_token)
from opbench.measure.units import composed_s, unit_cases
from opbench.ops import get_family
from opbench.ops.base import shape_dict
from opbench.ops.collective import is_collective
from opbench.ops.dtypes import get_dtype
from opbench.record import OpCase
from opbench.spec.models import ZOO
from opbench.spec.plan import plan
from opbench.spec.workload import Workload, parse_workload

COST = {"grouped_gemm": 5e-6, "gemm": 3e-6, "attention": 4e-6, "moe_route": 2e-6}  # everything else 1 us


def measured(*plans, seconds=lambda c: COST.get(c.op, 1e-6)) -> list[OpCase]:
    """A synthetic run that timed every distinct op call of the plans (collectives left to the models)."""
    cases = {}
    for p in plans:
        for c in p.calls:
            if is_collective(c.op):
                continue
            family = get_family(c.op)
            dtype = family.case_dtype(p.workload.dtype)
            cases[(c.op, c.shape, c.pass_, dtype)] = OpCase(
                op=c.op, backend="torch", dtype=dtype, pass_=c.pass_, shape=shape_dict(c.shape),
                flops=family.flops(c.shape, c.pass_), bytes=family.bytes(c.shape, get_dtype(dtype), c.pass_),
                median_s=seconds(c))
    return list(cases.values())


def test_each_kind_of_layer_counts_its_own_layers():
    p = plan(ZOO["tiny-moe"], parse_workload("train:b=2,s=96", "fp32"))
    b = Composer(measured(p)).compose(p)
    per_call = {c.kind: 0.0 for c in p.calls}
    for c in p.calls:
        per_call[c.kind] += c.count * COST.get(c.op, 1e-6)
    assert b.kinds() == {"full/dense": (1, pytest.approx(per_call["full/dense"])),
                         "full/moe": (1, pytest.approx(per_call["full/moe"]))}
    assert b.total_s == pytest.approx(sum(per_call.values()))
    assert b.layer_s == pytest.approx((per_call["full/dense"] + per_call["full/moe"]) / 2)  # the mean layer
    modules = b.modules_s()
    assert sum(modules.values()) == pytest.approx(b.total_s)
    routing = sum(c.count * COST.get(c.op, 1e-6) for c in p.calls if c.role.startswith("moe.route."))
    assert modules["moe routing"] == pytest.approx(routing)  # router GEMM, top-k, permutations
    experts = sum(c.count * COST.get(c.op, 1e-6) for c in p.calls if c.role.startswith(("moe.expert", "moe.shared")))
    dense_mlp = sum(c.count * COST.get(c.op, 1e-6) for c in p.calls if c.role.startswith("mlp."))
    assert modules["mlp"] == pytest.approx(experts + dense_mlp)
    assert Breakdown.from_dict(json.loads(json.dumps(b.to_dict())), p) == b
    # units: one per kind of layer, each composed from its own kind's calls
    units = {u.unit for u in unit_cases([p])}
    assert units == {"layer:full/dense", "layer:full/moe", "model"}
    assert composed_s(b, "layer:full/moe") == pytest.approx(
        sum(c.count * COST.get(c.op, 1e-6) for c in p.calls if c.kind == "full/moe" and c.op != "adamw"))
    assert composed_s(b, "model") == pytest.approx(b.total_s - sum(
        c.count * COST.get(c.op, 1e-6) * c.layers for c in p.calls if c.op == "adamw"))


def test_a_homogeneous_model_composes_as_before():
    p = plan(ZOO["llama-3-8b"], parse_workload("decode:b=8,s=1024"))
    b = Composer(measured(p)).compose(p)
    layer = sum(c.count * COST.get(c.op, 1e-6) for c in p.calls if c.scope == "layer")
    model = sum(c.count * COST.get(c.op, 1e-6) for c in p.calls if c.scope == "model")
    assert b.layer_s == layer and b.total_s == 32 * layer + model  # the same arithmetic, to the last bit
    assert [u.unit for u in unit_cases([plan(ZOO["tiny"], parse_workload("decode:b=4,s=200"))])] == ["layer", "model"]


def test_expert_parallelism_beyond_the_machine_is_modeled_from_the_fabric():
    model = ZOO["qwen3-30b-a3b"]
    run = measured(plan(model, parse_workload("decode:b=64,s=4096")))  # one GPU's run
    p16 = plan(model, parse_workload("decode:b=64,s=4096,ep=16"))
    b = Composer(run, fabric="ib-ndr-400g").compose(p16)
    a2a = [c for c in b.calls if c.op == "alltoallv"]
    assert {c.role for c in a2a} == {"ep.dispatch", "ep.combine"}
    assert all(c.source == "modeled" and c.backend == "profile ib-ndr-400g" for c in a2a)
    shape = next(c.shape for c in p16.calls if c.op == "alltoallv")
    size = get_family("alltoallv").bytes(shape, get_dtype("bf16"))
    assert a2a[0].time_s == pytest.approx(PROFILES["ib-ndr-400g"].alpha_s + 15 / 16 * size / 47e9)
    assert {c.source for c in b.calls if c.op == "grouped_gemm"} == {"modeled"}  # 8 local experts: not measured
    # a collectives run's sweep of the even all-to-all stands in where the uneven one has no bandwidth
    alpha_only = Fit("alltoallv", 1e-4, None, 2, "measured: gloo fp32, world of 2")
    sweep = Fit("alltoall", 2e-5, 100.0, 8, "measured: nccl bf16, world of 8")
    composer = Composer(run, fits=[alpha_only, sweep])
    t, _, backend, _ = composer.time("alltoallv", shape, "bf16", "fwd")
    assert t == pytest.approx(predict("alltoall", size, 16, sweep)) and "alltoall standing in" in backend
    flat = Fit("alltoall", 1e-4, None, 2, "measured: gloo fp32, world of 2")  # no bandwidth either: the fabric
    assert Composer(run, fits=[alpha_only, flat]).time("alltoallv", shape, "bf16", "fwd")[2] == \
        "profile h100-nvlink-ring"


def test_estimates_of_a_mixture_of_experts():
    model = ZOO["qwen3-30b-a3b"]
    w = parse_workload("decode:b=64,s=4096,ep=8")
    b = Composer(measured(plan(model, w))).compose(plan(model, w))
    e = estimate_from(b, collective_s=None)
    assert e.gpus == 8 and e.tokens_per_s_per_gpu == pytest.approx(64 * 8 / b.total_s / 8)
    # MFU's FLOPs per token use the active parameters: 8 of 128 experts, not all of them
    active = sum(model.layer_params(i, active=True) for i in range(model.layers))
    assert model_flops_per_token(model, 4096) == 6 * active + 12 * 48 * 32 * 128 * 4096
    assert active < model.layers * model.params_per_layer / 5
    dense = ZOO["tiny"]
    assert model_flops_per_token(dense, 96) == 6 * dense.layers * dense.params_per_layer + 12 * 2 * 6 * 32 * 96


def test_memory_holds_every_expert_or_the_ranks_share():
    """Mixtral-8x7B at ep 8, by hand: one expert per GPU, attention and embeddings whole."""
    attention = 4096 * (32 * 128 + 8 * 256) + 32 * 128 * 4096
    layer = attention + 2 * 4096 + 3 * 4096 * 14336 + 4096 * 8  # norms, one expert, the router
    embeddings = 32000 * 4096 * 2 + 4096
    m = ZOO["mixtral-8x7b"]
    assert memory(m, parse_workload("decode:b=1,s=1024,ep=8")).weights_bytes == (32 * layer + embeddings) * 2
    assert memory(m, parse_workload("decode:b=1,s=1024")).weights_bytes == m.params * 2  # every expert
    assert memory(m, parse_workload("decode:b=1,s=1024,tp=2")).weights_bytes == m.params  # sharded by tp


def test_fewest_gpus_for_a_mixture_of_experts():
    big = ZOO["qwen3-235b-a22b"]
    gib80 = 80 * 2**30
    assert fewest_gpus(big, Workload("decode", 1, 4096), gib80) == 8  # 470 GB of bf16 weights over tp 8
    n = fewest_gpus(big, Workload("decode", 1, 4096, ep=2), gib80)
    assert memory(big, Workload("decode", 1, 4096, ep=n)).total_bytes <= 0.9 * gib80
    assert memory(big, Workload("decode", 1, 4096, ep=n // 2)).total_bytes > 0.9 * gib80


def test_idealized_runtime_of_a_mixture_of_experts():
    model = ZOO["tiny-moe"]
    composer = Composer(measured(plan(model, parse_workload("prefill:b=1,s=64")),
                                 plan(model, parse_workload("decode:b=1,s=64"))))
    helm = idealized_runtime(composer, model, decode_context=64, prompt_tokens=(1, 16, 64, 256))
    assert set(helm["runtime_for_prompt_tokens"]) == {"1", "16", "64", "256"}
    assert 0 < helm["runtime_for_prompt_tokens"]["16"] < helm["runtime_for_prompt_tokens"]["256"]
    at_ep2 = idealized_runtime(composer, model, decode_context=64, prompt_tokens=(16,), cost_aware=True, ep=2)
    assert at_ep2["runtime_per_output_token"] > 2 * helm["runtime_per_output_token"] * 0.5


def test_opbench_estimate_composes_ep_16_from_a_one_gpu_run(tmp_path, capsys):
    model = ZOO["qwen3-30b-a3b"]
    records = measured(plan(model, parse_workload("decode:b=64,s=4096")))
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"machine_info": {}, "datetime": "2026-01-01T00:00:00", "opbench": {"device": "cpu"},
                               "benchmarks": [{"name": f"b{i}", "extra_info": r.to_info()}
                                              for i, r in enumerate(records)]}))
    assert cli.main(["estimate", str(run), "--model", "qwen3-30b-a3b", "--phase", "decode", "--batch", "64",
                     "--context", "4096", "--ep", "16", "--fabric", "ib-ndr-400g"]) == 0
    out = capsys.readouterr().out
    assert "qwen3-30b-a3b/decode:b=64,s=4096,tp=1,ep=16/bf16" in out
    assert "modeled: ep.dispatch alltoallv fwd" in out and "(profile ib-ndr-400g)" in out
    assert "moe routing" in out
