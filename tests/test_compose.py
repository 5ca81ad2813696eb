"""Composition arithmetic on synthetic runs whose answers are known."""

import pytest

from opbench.analyze.compose import Composer, MissingMeasurement, fit_roofline
from opbench.ops.base import shape_dict
from opbench.ops.dtypes import DTYPES
from opbench.ops.gemm import GemmShape, bytes_moved, flops
from opbench.record import OpCase, Stability
from opbench.spec.models import ZOO
from opbench.spec.plan import Plan, plan
from opbench.spec.workload import Workload


def timed(op, shape, dtype, pass_, backend, time_s, flops=0, nbytes=0) -> OpCase:
    """The record of a case timed at time_s per call (a run of 11 identical rounds)."""
    return OpCase(op=op, backend=backend, dtype=dtype, pass_=pass_, shape=shape_dict(shape), flops=flops,
                  bytes=nbytes, timer="cpu", median_s=time_s, stability=Stability.of([time_s] * 11, 0.01))


def measure_plan(p, seconds, backend="torch"):
    """A synthetic run that measured every distinct call of plan p, with time seconds(call)."""
    seen = {}
    for c in p.calls:
        key = (c.op, tuple(sorted(shape_dict(c.shape).items())), c.pass_)
        seen[key] = timed(c.op, c.shape, p.workload.dtype, c.pass_, backend, seconds(c))
    return list(seen.values())


def gemm(m, n, k, t, backend="torch", dtype="fp32", pass_="fwd"):
    s = GemmShape(m, n, k)
    return timed("gemm", s, dtype, pass_, backend, t, flops(s), bytes_moved(s, DTYPES[dtype]))


def test_measured_plan_sums_layers_and_model_scope():
    p = plan(ZOO["tiny"], Workload("prefill", 2, 96, dtype="fp32"))
    cost = {"gemm": 10e-6, "attention": 20e-6}  # everything else 1 us
    b = Composer(measure_plan(p, lambda c: cost.get(c.op, 1e-6))).compose(p)
    layer = sum(c.count * cost.get(c.op, 1e-6) for c in p.calls if c.scope == "layer")
    model = sum(c.count * cost.get(c.op, 1e-6) for c in p.calls if c.scope == "model")
    assert b.layer_s == pytest.approx(layer)
    assert b.total_s == pytest.approx(ZOO["tiny"].layers * layer + model)
    assert b.sources() == {"measured": len(p.calls), "interpolated": 0, "modeled": 0}
    modules = b.modules_s()
    assert sum(modules.values()) == pytest.approx(b.total_s)
    # attention block per layer: qkv + o GEMMs, rotary, the KV-cache write, core attention
    assert modules["attention"] == pytest.approx(ZOO["tiny"].layers * (2 * 10e-6 + 2 * 1e-6 + 20e-6))
    shares = b.to_dict()["modules"]
    assert sum(m["share"] for m in shares.values()) == pytest.approx(1.0)


def test_interpolation_along_a_sweep_and_modeled_outside_it():
    run = [gemm(100, 64, 64, 1e-3), gemm(300, 64, 64, 3e-3), gemm(64, 4096, 4096, 2e-3)]
    composer = Composer(run)
    t, source, backend, _ = composer.time("gemm", GemmShape(200, 64, 64), "fp32", "fwd")
    assert (t, source, backend) == (pytest.approx(2e-3), "interpolated", "torch")
    t, source, _, _ = composer.time("gemm", GemmShape(400, 64, 64), "fp32", "fwd")
    assert source == "modeled"
    exact = composer.time("gemm", GemmShape(300, 64, 64), "fp32", "fwd")
    assert exact[:2] == (3e-3, "measured")


def test_roofline_fit_recovers_known_ceilings():
    peak_f, peak_b = 50e12, 2e12
    shapes = [GemmShape(8192, 8192, 8192), GemmShape(4096, 4096, 4096), GemmShape(1, 4096, 4096),
              GemmShape(16, 8192, 8192), GemmShape(2048, 2048, 2048)]
    run = []
    for s in shapes:
        f, b = flops(s), bytes_moved(s, DTYPES["bf16"])
        run.append(timed("gemm", s, "bf16", "fwd", "torch", max(f / peak_f, b / peak_b), f, b))
    fitted_f, fitted_b = fit_roofline([(m.flops, m.bytes, m.median_s) for m in run])
    assert fitted_f == pytest.approx(peak_f) and fitted_b == pytest.approx(peak_b)
    new = GemmShape(3, 1000, 3000)  # memory-bound, measured nowhere
    t, source, _, _ = Composer(run).time("gemm", new, "bf16", "fwd")
    assert source == "modeled" and t == pytest.approx(bytes_moved(new, DTYPES["bf16"]) / peak_b)


def test_backend_policies_pick_among_allowed_backends():
    run = [gemm(64, 64, 64, 2e-3, "torch"), gemm(64, 64, 64, 1e-3, "triton")]
    shape = GemmShape(64, 64, 64)
    assert Composer(run).time("gemm", shape, "fp32", "fwd")[2] == "triton"
    assert Composer(run, "vendor").time("gemm", shape, "fp32", "fwd")[:3] == (2e-3, "measured", "torch")
    assert Composer(run, "torch").time("gemm", shape, "fp32", "fwd")[2] == "torch"


def test_missing_op_names_the_op_and_role():
    composer = Composer([gemm(64, 64, 64, 1e-3)])
    with pytest.raises(MissingMeasurement, match=r"no measurement of embedding \(embed\)"):
        composer.compose(plan(ZOO["tiny"], Workload("decode", 1, 64, dtype="fp32")))
    with pytest.raises(MissingMeasurement, match=r"no measurement of gemm \(attn.qkv, attn.o, mlp.gate_up, mlp.down, "
                                                 r"lm_head\); measure it with: pytest bench/test_gemm.py --model tiny "
                                                 r"--workload decode:b=1,s=64,tp=1 --dtype bf16"):
        p = plan(ZOO["tiny"], Workload("decode", 1, 64))
        Composer([]).compose(Plan(p.model, p.workload, tuple(c for c in p.calls if c.op == "gemm")))


def test_collectives_come_from_a_measured_fit_or_else_the_fabric_profile():
    from opbench.analyze.alphabeta import AlphaBeta, PROFILES
    from opbench.ops.collective import CollectiveShape

    shape = CollectiveShape(size_bytes=64 * 2**20, world=8)
    t, source, model, _ = Composer([], fabric="h100-nvlink-ring").time("allreduce", shape, "bf16", "fwd")
    # alpha + 2(n-1)/n x S / busbw = 10 us + 1.75 x 64 MiB / 370 GB/s
    assert (source, model) == ("modeled", "profile h100-nvlink-ring")
    assert t == pytest.approx(10e-6 + 1.75 * 64 * 2**20 / 370e9)
    assert PROFILES["h100-nvlink-ring"].world == 8
    fit = AlphaBeta("allreduce", 20e-6, 100.0, 2, "measured: nccl bf16, world of 2")
    t, _, model, _ = Composer([], fits=[fit]).time("allreduce", shape, "bf16", "fwd")
    assert model == fit.source and t == pytest.approx(20e-6 + 1.75 * 64 * 2**20 / 100e9)


def test_the_roofline_is_fitted_to_the_fastest_backend_of_each_case():
    slow, fast = gemm(4096, 4096, 4096, 1.0, "slowlib"), gemm(4096, 4096, 4096, 0.01, "torch")
    t, source, _, _ = Composer([slow, fast]).time("gemm", GemmShape(2048, 4096, 4096), "fp32", "fwd")
    # one case fits both ceilings at its own rates: half its FLOPs, two thirds of its bytes
    assert source == "modeled" and t == pytest.approx(0.01 * max(1 / 2, 2 / 3))
