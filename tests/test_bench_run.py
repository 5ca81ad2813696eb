"""A CPU run of `pytest bench/` as a user starts it, and the JSON it writes."""

import json
import subprocess
import sys

import pytest

from opbench.models import ZOO
from opbench.selection import PROFILES
from opbench.workload import parse_workload, plan

from helpers import ROOT, run_pytest

REQUIRED = {"op", "backend", "dtype", "pass", "shape", "roles", "flops", "bytes", "tflops", "gbps", "timer",
            "unroll", "correct"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "out.json"
    proc = run_pytest("bench/", f"--benchmark-json={out}", "-q")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads(out.read_text()), proc.stdout


def test_every_case_carries_the_extra_info_contract(smoke_run):
    _, data, _ = smoke_run
    ops = [b for b in data["benchmarks"] if b["extra_info"]["op"] not in ("layer", "model")]
    assert ops
    for bench in ops:
        info = bench["extra_info"]
        assert REQUIRED <= set(info), (bench["name"], REQUIRED - set(info))
        assert info["correct"]["passed"] and info["correct"]["rel_err"] <= info["correct"]["tol"]
        assert info["timer"] == "cpu" and info["unroll"] >= 1
        median = bench["stats"]["median"]
        assert info["tflops"] == pytest.approx(info["flops"] / median / 1e12)
        assert info["gbps"] == pytest.approx(info["bytes"] / median / 1e9)
        assert all(isinstance(v, int) for v in info["shape"].values())
        # ids are built from the identity, never from object reprs
        assert bench["param"].endswith(f"-{info['dtype']}-{info['pass']}-{info['backend']}")


def test_units_are_timed_after_their_own_gate(smoke_run):
    _, data, _ = smoke_run
    units = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"]["op"] in ("layer", "model")]
    plans = {p["model"]["name"] + "/" for p in data["opbench"]["plans"]}
    assert {(u["op"], u["dtype"]) for u in units} == {(op, d) for op in ("layer", "model")
                                                       for d in ("fp32", "bf16", "fp16")}
    for info in units:
        assert info["correct"]["passed"] and info["median_s"] > 0 and info["timer"] == "cpu"
        assert any(info["plan"].startswith(p) for p in plans)


def test_every_gemm_role_of_the_smoke_plan_is_measured(smoke_run):
    _, data, _ = smoke_run
    measured = {role for b in data["benchmarks"] if b["extra_info"]["op"] == "gemm"
                for role in b["extra_info"]["roles"]}
    smoke = PROFILES["smoke"]
    expected = set()
    for model, text in smoke.pairs:
        for dtype in smoke.dtypes:
            p = plan(ZOO[model], parse_workload(text, dtype))
            expected |= {f"{model}/{p.workload.phase}/{c.role}" for c in p.calls if c.op == "gemm"}
    assert expected and expected <= measured


def test_json_records_plans_machine_and_summary(smoke_run):
    _, data, stdout = smoke_run
    section = data["opbench"]
    assert section["profile"] == "smoke" and section["device"] == "cpu"
    assert {p["model"]["name"] for p in section["plans"]} == {"tiny", "tiny-alt"}
    assert data["machine_info"]["gpu"]["available"] is False and data["machine_info"]["gpu"]["reason"]
    assert data["machine_info"]["software"]["torch"]
    assert "opbench summary" in stdout and "TFLOP/s" in stdout


def test_pytest_benchmark_compare_loads_the_json(smoke_run):
    out, _, _ = smoke_run
    proc = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "test_gemm[" in proc.stdout


BROKEN_BACKEND = '''
from opbench.ops.gemm import GEMM

@GEMM.backend("broken", impl="off by 10% on purpose")
def broken(inp, dtype, pass_):
    return lambda: (inp["a"] @ inp["b"]) * 1.1
'''


def test_a_wrong_backend_fails_its_cases_and_the_rest_still_run(tmp_path):
    (tmp_path / "broken_backend.py").write_text(BROKEN_BACKEND)
    out = tmp_path / "out.json"
    proc = run_pytest("bench/test_gemm.py", "-p", "broken_backend", "--backend", "torch,broken",
                      "--workload", "decode:b=3,s=50", "--dtype", "fp32", f"--benchmark-json={out}", "-q",
                      extra_path=tmp_path)
    assert proc.returncode == 1
    assert "wrong result: relative error" in proc.stdout
    backends = {b["extra_info"]["backend"] for b in json.loads(out.read_text())["benchmarks"]}
    assert backends == {"torch"}  # failed cases keep no time; the others are all there
