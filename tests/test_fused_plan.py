"""Fusions live in the plan: plan() marks the calls a fused kernel may replace, the bench module takes its
cases from that, and composition swaps the fused kernel in when asked and measured, saying so."""

import importlib
import json

import pytest

from opbench.analyze.compose import Composer
from opbench.cli import main
from opbench.measure.cases import build_cases
from opbench.spec.models import ZOO
from opbench.spec.plan import Plan, plan
from opbench.spec.workload import Workload

from tests.planned_runs import op_records, write_run

REPLACED = ("residual.attn", "norm.post_attn", "residual.mlp", "norm.input")


def test_plan_marks_add_and_rmsnorm_as_fusable():
    p = plan(ZOO["tiny"], Workload("train", 2, 96, dtype="fp32"))
    assert [f.label for f in p.fusions] == ["residual.attn + norm.post_attn -> add_rmsnorm",
                                            "residual.mlp + norm.input -> add_rmsnorm"]
    rows = next(c.shape for c in p.calls if c.role == "residual.attn")
    assert [(c.op, c.shape, c.pass_, c.scope) for c in p.fusions[0].calls] == [
        ("add_rmsnorm", rows, "fwd", "layer"), ("add_rmsnorm", rows, "bwd", "layer")]  # the add's passes
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert plan(ZOO["tiny-alt"], Workload("train", 2, 96)).fusions == ()  # LayerNorm: no add_rmsnorm


def test_fusing_replaces_the_calls_it_fuses():
    p = plan(ZOO["tiny"], Workload("prefill", 2, 96))
    fused = p.fuse(p.fusions)
    roles = [c.role for c in fused.calls]
    assert not set(REPLACED) & set(roles) and fused.fusions == ()
    assert roles.count("residual.attn+norm.post_attn") == roles.count("residual.mlp+norm.input") == 1
    assert "norm.final" in roles  # stands for the first layer's input norm, which no add precedes


def test_bench_module_is_a_thin_table_of_the_plans_fusions():
    module = importlib.import_module("bench.test_add_rmsnorm")
    assert module.OP == "add_rmsnorm" and not hasattr(module, "CASES")
    plans = [plan(ZOO[m], Workload("train", 2, 96)) for m in ("tiny", "tiny-alt")]
    cases = build_cases(plans, "add_rmsnorm", ["torch"])
    add = {(c.shape, c.pass_) for c in build_cases(plans[:1], "add", ["torch"])}
    assert {(c.shape, c.pass_) for c in cases} == add  # every add of the RMSNorm model, none of tiny-alt's
    assert cases[0].roles == ("tiny/train/residual.attn+norm.post_attn", "tiny/train/residual.mlp+norm.input")


def _seconds(call):
    return 1e-6 if call.op == "add_rmsnorm" else 1e-5


def test_composition_uses_the_fused_kernel_when_asked_and_measured():
    p = plan(ZOO["tiny"], Workload("train", 2, 96, dtype="fp32"))
    records = op_records([p], _seconds)
    plain = Composer(records).compose(p)
    fused = Composer(records, fused=True).compose(p)
    assert plain.fused == () and fused.fused == tuple(f.label for f in p.fusions)
    replaced = sum(c.count * c.time_s for c in plain.calls if c.role in REPLACED)
    added = sum(c.count * c.time_s for c in fused.calls if c.op == "add_rmsnorm")
    assert added == pytest.approx(4 * 1e-6) and replaced == pytest.approx(8 * 1e-5)  # fwd and bwd, twice
    assert fused.layer_s == pytest.approx(plain.layer_s - replaced + added)
    assert fused.to_dict()["fused"] == list(fused.fused)
    unmeasured = Composer([r for r in records if r.op != "add_rmsnorm"], fused=True).compose(p)
    assert unmeasured.fused == () and unmeasured.total_s == pytest.approx(plain.total_s)


def test_estimate_fuse_flag_reports_what_it_replaced(tmp_path, capsys):
    p = plan(ZOO["tiny"], Workload("prefill", 2, 96, dtype="fp32"))
    run = write_run(tmp_path / "run.json", op_records([p], _seconds), plans=[p])
    args = ["estimate", str(run), "--model", "tiny", "--phase", "prefill", "--batch", "2", "--context", "96",
            "--dtype", "fp32", "--fuse"]
    main(args)
    text = capsys.readouterr().out
    assert "  fused: residual.attn + norm.post_attn -> add_rmsnorm; residual.mlp + norm.input -> add_rmsnorm" in text
    main(args + ["--json"])
    breakdown = json.loads(capsys.readouterr().out)["breakdown"]
    assert len(breakdown["fused"]) == 2 and {c["role"] for c in breakdown["calls"]}.isdisjoint(REPLACED)
    main(args[:-1] + ["--json"])
    assert json.loads(capsys.readouterr().out)["breakdown"]["fused"] == []
