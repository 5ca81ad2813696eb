"""The case record: every kind written as extra_info and read back into the same record; anything
else refused with a reason; runs of older or foreign writers refused in one line."""

import json

import pytest

from opbench.analyze.runs import RunError, load_run
from opbench.record import (KINDS, RECORD_VERSION, Bound, CollectiveCase, Energy, Gate, GpuState, HostLoad, OpCase,
                            PeakCase, RecordError, Stability, UnitCase, from_info)

from tests.synthetic_runs import bench, benchmark_of, write_run

STABILITY = Stability(rounds=37, median_s=1.25e-4, q1_s=1.2e-4, q3_s=1.31e-4, min_s=1.1e-4, max_s=2.9e-4, cv=0.07,
                      iqr_rel=0.088, ci_rel=0.013, outliers=3, stable=False)
GPU = GpuState(sm_clock_mhz=1741.5, power_w=612.25, temperature_c=79.0, samples=23, power_violation_s=0.125,
               thermal_violation_s=0.0, throttled=("sw_power_cap", "hw_slowdown"))
TIMED = dict(timer="cuda-graph", unroll=7, l2="flush", working_set_bytes=3 * 2**20 + 5, host_s=3.5e-4,
             median_s=1.25e-4, stability=STABILITY, gpu=GPU, energy=Energy(0.0375, 1.02),
             correct=Gate(rel_err=3e-3, tol=1e-2, worst_output=2))

RECORDS = [
    OpCase(op="attention", backend="sdpa-flash", dtype="bf16", pass_="bwd",
           shape={"batch": 3, "heads": 5, "kv_heads": 1, "q_len": 77, "kv_len": 77, "head_dim": 64, "causal": 1},
           roles=("tiny/train/attn.core", "tiny-alt/train/attn.core"), flops=123_456_789, bytes=9_876_543,
           impl="torch sdpa", roofline=Bound(0.41, "compute", 312.5, "measured on X"), **TIMED),
    OpCase(op="rmsnorm", backend="torch", dtype="fp32", shape={"tokens": 13, "width": 191}, timer="cpu", unroll=64,
           l2="warm", median_s=2e-6, stability=Stability.of([2e-6, 2.1e-6, 1.9e-6], 0.01),
           host=HostLoad(load_per_core=1.5, steal=0.0625, busy=True), correct=Gate(0.0, 1e-5)),
    OpCase(op="gemm", backend="torch", dtype="bf16", shape={"m": 1, "n": 2, "k": 3}),  # gated out, never timed
    CollectiveCase(op="allreduce", backend="nccl", dtype="bf16", shape={"size_bytes": 3 * 2**20, "world": 3},
                   world=3, busbw_factor=4 / 3, rank_median_s=(1e-4, 1.5e-4, 1.2e-4), graph=True,
                   flops=0, bytes=3 * 2**20, **TIMED),
    PeakCase(op="peak.matmul", backend="torch", dtype="fp16", shape={"m": 6144, "n": 6144, "k": 6144},
             flops=2 * 6144**3, bytes=3 * 6144**2 * 2, metric="matmul_tflops", **TIMED),
    UnitCase(unit="model", plan="tiny/decode:b=4,s=200,tp=1/bf16", dtype="bf16", pass_="fwd+bwd", **TIMED),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: f"{r.kind}-{r.dtype}-{r.pass_}")
def test_every_kind_round_trips_through_the_json(record):
    info = json.loads(json.dumps(record.to_info()))  # as pytest-benchmark writes it and load_run reads it
    assert info["kind"] == record.kind and info["record"] == RECORD_VERSION
    assert info["pass"] == record.pass_ and "pass_" not in info
    back = from_info(info)
    assert type(back) is type(record) and back == record


def test_every_kind_is_covered_by_the_round_trip():
    assert {r.kind for r in RECORDS} == set(KINDS)


def test_derived_figures_are_written_for_readers_but_not_read_back():
    case = RECORDS[0]
    info = case.to_info()
    assert info["tflops"] == pytest.approx(123_456_789 / 1.25e-4 / 1e12)
    assert info["gbps"] == pytest.approx(9_876_543 / 1.25e-4 / 1e9)
    coll = RECORDS[3].to_info()
    assert coll["busbw_gbps"] == pytest.approx(3 * 2**20 / 1.25e-4 / 1e9 * 4 / 3)
    assert coll["slowest_rank"] == 1 and coll["rank_spread"] == pytest.approx(0.5)
    assert from_info({**info, "tflops": 1e9, "gbps": -1}) == case  # the time and work are the truth


def test_nested_records_keep_their_types():
    back = from_info(json.loads(json.dumps(RECORDS[0].to_info())))
    assert isinstance(back.stability, Stability) and isinstance(back.gpu, GpuState)
    assert back.gpu.throttled == ("sw_power_cap", "hw_slowdown") and back.roles == RECORDS[0].roles
    assert isinstance(back.correct, Gate) and back.correct.passed and back.correct.worst_output == 2
    assert back.stability.stable is False and back.stability.outliers == 3


@pytest.mark.parametrize("info, message", [
    ({}, "no record kind (known: op, collective, peak, unit)"),
    (None, "no record kind"),
    ({"op": "gemm", "dtype": "bf16", "shape": {"m": 1}}, "no record kind"),
    ({"kind": "kernel", "record": RECORD_VERSION}, "kind 'kernel' (known: op, collective, peak, unit)"),
    ({**RECORDS[1].to_info(), "record": 1}, f"record version 1, this opbench reads version {RECORD_VERSION}"),
    ({**RECORDS[1].to_info(), "record": None}, "record version None"),
    ({"kind": "op", "record": RECORD_VERSION, "dtype": "bf16", "backend": "torch", "shape": {}},
     "op record: "),  # no op
])
def test_from_info_refuses_what_is_not_a_record_of_this_version(info, message):
    with pytest.raises(RecordError) as error:
        from_info(info)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_field_is_named():
    info = RECORDS[4].to_info()
    del info["metric"]
    with pytest.raises(RecordError, match="peak record: .*metric"):
        from_info(info)


def _raw_run(path, benchmarks, **top):
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benchmarks, **top}))
    return path


def test_a_run_of_an_older_opbench_is_refused_in_one_line(tmp_path):
    old = {"op": "gemm", "backend": "torch", "dtype": "bf16", "pass": "fwd", "shape": {"m": 5, "n": 7, "k": 9},
           "roles": [], "flops": 630, "bytes": 286, "median_s": 3e-6, "tflops": 2.1e-4, "gbps": 0.0953,
           "timer": "cuda-graph", "unroll": 4, "correct": {"rel_err": 0.0, "tol": 0.01, "passed": True}}
    path = _raw_run(tmp_path / "old.json", [{"name": "test_gemm[5x7x9-bf16-fwd-torch]", "extra_info": old,
                                             "stats": {"median": 3e-6}}], opbench={"device": "cuda"})
    with pytest.raises(RunError) as error:
        load_run(path)
    text = str(error.value)
    assert "\n" not in text and text.startswith(str(path))
    assert "'test_gemm[5x7x9-bf16-fwd-torch]' was written by an opbench older than 0.2 (no record kind)" in text


def test_a_foreign_pytest_benchmark_run_is_refused(tmp_path):
    plain = [{"name": f"test_sort[{n}]", "stats": {"median": 1e-3 * n}, "extra_info": {"n": n}} for n in (3, 5)]
    with pytest.raises(RunError, match="pytest-benchmark run of 2 benchmarks without opbench data"):
        load_run(_raw_run(tmp_path / "foreign.json", plain))
    with pytest.raises(RunError, match="without opbench data"):
        load_run(_raw_run(tmp_path / "bare.json", [{"name": "test_x", "stats": {}}]))  # no extra_info at all


def test_load_run_reads_the_records_and_passes_over_plain_benchmarks(tmp_path):
    unit, gated_out = RECORDS[5], RECORDS[2]
    benchmarks = [bench(5, 7, 9, 3e-6), bench(11, 13, 17, 5e-6, dtype="fp32"),
                  benchmark_of(unit, [unit.median_s], "test_layer[tiny-decode-bf16-model]"),
                  benchmark_of(gated_out, [1.0], "test_gemm[1x2x3-bf16-fwd-torch]"),
                  {"name": "test_plain", "stats": {"median": 1.0}, "extra_info": {}}]
    run = load_run(write_run(tmp_path / "run.json", benchmarks))
    assert [(m.kind, m.shape["m"], m.dtype) for m in run.measurements] == [("op", 5, "bf16"), ("op", 11, "fp32")]
    assert run.measurements[0] == from_info(benchmarks[0]["extra_info"])
    assert run.units == (unit,)  # units apart; the untimed case is not a measurement
