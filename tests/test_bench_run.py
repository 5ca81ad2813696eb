"""A CPU run of `pytest bench/` as a user starts it, and the JSON it writes."""

import json
import subprocess
import sys

import pytest

from opbench.cli import main
from opbench.record import RECORD_VERSION
from opbench.spec.models import ZOO
from opbench.measure.selection import PROFILES
from opbench.spec.workload import Workload, parse_workload
from opbench.spec.plan import plan

from tests.helpers import ROOT, run_pytest
from tests.synthetic_runs import bench as gemm_bench, write_run

REQUIRED = {"kind", "record", "op", "backend", "dtype", "pass", "shape", "roles", "flops", "bytes", "tflops", "gbps",
            "timer", "unroll", "median_s", "correct", "stability", "l2", "working_set_bytes", "host_s", "gpu", "host"}
STABILITY = {"rounds", "median_s", "q1_s", "q3_s", "min_s", "max_s", "cv", "iqr_rel", "ci_rel", "outliers", "stable"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "out.json"
    proc = run_pytest("bench/", f"--benchmark-json={out}", "-q")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads(out.read_text()), proc.stdout


def test_every_case_carries_the_extra_info_contract(smoke_run):
    _, data, _ = smoke_run
    ops = [b for b in data["benchmarks"] if b["extra_info"]["kind"] == "op"]
    assert ops
    for bench in ops:
        info = bench["extra_info"]
        assert REQUIRED <= set(info), (bench["name"], REQUIRED - set(info))
        assert info["record"] == RECORD_VERSION
        assert set(info["correct"]) == {"rel_err", "tol", "worst_output", "worst_rank", "passed"}
        assert info["correct"]["rel_err"] <= info["correct"]["tol"] and info["correct"]["worst_rank"] is None
        assert info["timer"] == "cpu" and info["unroll"] >= 1
        median = bench["stats"]["median"]
        assert info["median_s"] == median  # pytest-benchmark's statistics are the suite's samples
        assert info["tflops"] == pytest.approx(info["flops"] / median / 1e12)
        assert info["gbps"] == pytest.approx(info["bytes"] / median / 1e9)
        assert all(isinstance(v, int) for v in info["shape"].values())
        # ids are built from the identity, never from object reprs
        assert bench["param"].endswith(f"-{info['dtype']}-{info['pass']}-{info['backend']}")


def test_every_timed_case_records_its_stability_cache_mode_and_host(smoke_run):
    _, data, _ = smoke_run
    stable_ci = data["opbench"]["settings"]["stable_ci"]
    timed = [b for b in data["benchmarks"] if b["extra_info"]["kind"] in ("op", "peak", "unit")]
    assert {b["extra_info"]["kind"] for b in timed} == {"op", "peak", "unit"}
    for bench in timed:
        info, stats = bench["extra_info"], bench["stats"]
        stability = info["stability"]
        assert set(stability) == STABILITY, bench["name"]
        assert (stability["rounds"], stability["min_s"], stability["max_s"], stability["median_s"]) == (
            stats["rounds"], stats["min"], stats["max"], stats["median"])
        assert stability["rounds"] >= data["opbench"]["settings"]["min_rounds"]
        assert stability["q1_s"] <= stability["median_s"] <= stability["q3_s"]
        assert 0 <= stability["outliers"] <= stability["rounds"]
        # below 6 rounds no interval reaches 95%: null, as JSON has no infinity
        assert (stability["ci_rel"] is None) is (stability["rounds"] < 6)
        # stable: the median known within the limit, on a host that was not busy
        assert stability["stable"] is (stability["ci_rel"] is not None and stability["ci_rel"] <= stable_ci
                                       and not info["host"]["busy"])
        assert info["l2"] in ("warm", "rotate") and info["host_s"] is None and info["gpu"] is None
        assert set(info["host"]) == {"load_per_core", "steal", "busy"} and info["host"]["load_per_core"] >= 0
    assert {b["extra_info"]["l2"] for b in timed if b["extra_info"]["kind"] == "op"} == {"warm"}  # a CPU's default


def test_the_summary_marks_the_unstable_cases(smoke_run):
    _, data, stdout = smoke_run
    ops = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"]["kind"] == "op"]
    unstable = sum(not info["stability"]["stable"] for info in ops)
    lines = stdout.split("opbench summary", 1)[1].splitlines()
    assert f"{len(ops)} cases timed, {unstable} unstable" in stdout
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["op", "shape"])
    ci_at = lines[header].index(" CI ") + 1  # the table's columns are aligned: the CI cell starts here
    cells = [line[ci_at:].split()[0] for line in lines[header + 1:header + 1 + len(ops)]]
    assert [cell.endswith("!") for cell in cells].count(True) == unstable
    assert all(cell.rstrip("!").endswith("%") or cell.rstrip("!") == "n/a" for cell in cells)


def test_units_are_timed_after_their_own_gate(smoke_run):
    _, data, _ = smoke_run
    units = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"]["kind"] == "unit"]
    plans = {p["model"]["name"] + "/" for p in data["opbench"]["plans"]}
    # a layer unit per kind of layer (a MoE model's dense and MoE layers apart), and small whole models
    assert {(u["unit"].split(":")[0], u["dtype"]) for u in units} == {(unit, d) for unit in ("layer", "model")
                                                                      for d in ("fp32", "bf16", "fp16")}
    assert {u["unit"] for u in units if u["plan"].startswith("tiny-moe/")} == {
        "layer:full/dense", "layer:full/moe", "model"}
    for info in units:
        assert info["correct"]["rel_err"] <= info["correct"]["tol"] and info["median_s"] > 0
        assert info["timer"] == "cpu"
        assert any(info["plan"].startswith(p) for p in plans)


def test_every_gemm_role_of_the_smoke_plan_is_measured(smoke_run):
    _, data, _ = smoke_run
    measured = {role for b in data["benchmarks"] if b["extra_info"]["kind"] == "op" and b["extra_info"]["op"] == "gemm"
                for role in b["extra_info"]["roles"]}
    smoke = PROFILES["smoke"]
    expected = set()
    for model, text in smoke.pairs:
        for dtype in smoke.dtypes:
            workload = parse_workload(text)
            if workload.weights:  # a weight format runs in its activation dtype alone
                continue
            p = plan(ZOO[model], parse_workload(text, smoke.model_dtypes.get(model, (dtype,))[0]))
            expected |= {f"{model}/{p.workload.phase}/{c.role}" for c in p.calls if c.op == "gemm"}
    assert expected and expected <= measured


def test_json_records_plans_machine_and_summary(smoke_run):
    _, data, stdout = smoke_run
    section = data["opbench"]
    assert section["profile"] == "smoke" and section["device"] == "cpu"
    assert {p["model"]["name"] for p in section["plans"]} == {m for m, _ in PROFILES["smoke"].pairs}
    assert data["machine_info"]["gpu"]["available"] is False and data["machine_info"]["gpu"]["reason"]
    assert data["machine_info"]["software"]["torch"]
    assert "opbench summary" in stdout and "FLOP/s" in stdout


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


def test_the_json_composes_every_plan_and_checks_the_units(smoke_run):
    _, data, stdout = smoke_run
    section = data["opbench"]
    assert not section["missing"]
    assert {b["plan"] for b in section["breakdowns"]} == {
        f"{p['model']['name']}/{Workload(**p['workload']).label}/{p['workload']['dtype']}" for p in section["plans"]}
    for b in section["breakdowns"]:  # the smoke run measured every call it plans but those among GPUs
        assert all(c["source"] == "measured" for c in b["calls"] if not c["role"].startswith(("ep.", "tp.")))
    units = {(v["plan"], v["unit"]) for v in section["validation"]}
    assert ("tiny/train:b=2,s=96,tp=1/fp32", "layer") in units and ("tiny/decode:b=4,s=200,tp=1/bf16", "model") in units
    for v in section["validation"]:
        assert v["error_pct"] == pytest.approx(100 * (v["composed_s"] - v["measured_s"]) / v["measured_s"])
    assert "opbench estimates" in stdout and "composed vs measured" in stdout


def test_estimate_a_workload_that_was_not_measured_for_a_config_json(smoke_run, tmp_path, capsys):
    out, _, _ = smoke_run
    config = tmp_path / "my-model" / "config.json"  # the tiny model's dimensions under another name
    config.parent.mkdir()
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 192, "num_hidden_layers": 3,
                                  "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 520,
                                  "vocab_size": 1000, "max_position_embeddings": 512}))
    assert main(["estimate", str(out), "--model", str(config), "--phase", "decode", "--batch", "8",
                 "--context", "150", "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "my-model/decode:b=8,s=150,tp=1/fp32: per output token" in text
    assert "interpolated: attn.qkv gemm fwd" in text  # 8 tokens lie between the measured 4 and 192
    assert main(["estimate", str(out), "--model", str(config), "--phase", "train", "--batch", "2", "--context", "96",
                 "--dtype", "fp32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["breakdown"]["sources"] == {"measured": len(data["breakdown"]["calls"]), "interpolated": 0,
                                            "modeled": 0}
    assert data["estimate"]["time_s"] == pytest.approx(data["breakdown"]["total_s"])


def test_idealized_runtime_file(smoke_run, tmp_path):
    out, _, _ = smoke_run
    helm = tmp_path / "helm.json"
    assert main(["idealized", str(out), "--model", "tiny", "--name", "test/tiny", "--dtype", "bf16",
                 "--decode-context", "200", "-o", str(helm)]) == 0
    (name, data), = json.loads(helm.read_text()).items()  # HELM's file: the model's name, then its runtimes
    assert name == "test/tiny" and set(data) == {"runtime_per_output_token", "runtime_for_prompt_tokens"}
    from opbench.analyze.helm import IDEALIZED_PROMPT_TOKENS  # HELM's buckets, to the max_seq_len 512
    assert list(data["runtime_for_prompt_tokens"]) == [str(p) for p in IDEALIZED_PROMPT_TOKENS if p <= 512]
    prompts = list(data["runtime_for_prompt_tokens"].values())
    assert all(t > 0 for t in prompts) and data["runtime_per_output_token"] > 0


def test_an_estimate_from_a_run_without_an_op_names_it_and_how_to_measure_it(tmp_path, capsys):
    run = write_run(tmp_path / "gemm-only.json", [gemm_bench(64, 64, 64, 1e-5, dtype="fp32")])
    with pytest.raises(SystemExit) as stop:
        main(["estimate", str(run), "--model", "tiny", "--phase", "prefill", "--context", "64", "--dtype", "fp32"])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no measurement of embedding (embed)" in line
    assert "with: pytest bench/test_embedding.py " in line and "--model tiny --workload prefill:b=1,s=64,tp=1" in line
