"""`opbench selftest`: the command on this CPU, and each check's verdict on figures handed in, so the
GPU checks' judgement is tested without a GPU."""

import json
import time

import pytest
import torch

from opbench.cli import main
from opbench.measure import selftest
from opbench.measure.peaks import datasheet_for
from opbench.measure.selftest import (FAIL, NEEDS_GPU, PASS, VERDICTS, WARN, Check, Env, Result, clock_verdict,
                                      device_event_durations_s, exit_code, l2_verdict, nvml_verdict, peaks_verdict,
                                      profiled_time_per_call, repeat_verdict, run_check, sized)
from tests.helpers import run_python

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine reports")


# The command on this machine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest") / "selftest.json"
    start = time.perf_counter()
    proc = run_python("-m", "opbench", "selftest", "--json", str(out), timeout=300)
    return proc, json.loads(out.read_text()) if out.exists() else None, time.perf_counter() - start


@cpu_only
def test_selftest_exits_0_on_a_cpu_and_names_the_gpu_checks(cpu_run):
    proc, _, wall_s = cpu_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for number, name in ((1, "clock vs profiler"), (2, "L2 modes"), (5, "NVML telemetry")):
        assert f"{NEEDS_GPU} {number} {name}:" in proc.stdout
    assert "[3/5] repeatability" in proc.stdout and "pass 3/3" in proc.stdout  # progress as it goes
    assert "checks 1, 2, 5 need a GPU" in proc.stdout
    assert wall_s < 120  # ~10 s on an idle 2-core CPU; the bound only catches a runaway


@cpu_only
def test_selftest_json_has_every_check_with_its_verdict_and_figures(cpu_run):
    _, doc, _ = cpu_run
    assert doc["exit"] == 0 and doc["machine"]["device"] == "cpu"
    checks = {c["number"]: c for c in doc["checks"]}
    assert sorted(checks) == [1, 2, 3, 4, 5]
    assert all(c["verdict"] in VERDICTS and c["summary"] for c in checks.values())
    assert [checks[n]["verdict"] for n in (1, 2, 5)] == [NEEDS_GPU] * 3
    assert all("no CUDA GPU" in checks[n]["figures"]["reason"] for n in (1, 2, 5))
    repeat = checks[3]["figures"]
    assert checks[3]["verdict"] in (PASS, WARN) and repeat["passes"] == 3 and repeat["limit_cv"] == 0.05
    assert [c["case"].split()[0] for c in repeat["cases"]] == ["gemm", "rmsnorm", "attention"]
    assert all(len(c["medians_s"]) == 3 and c["cv"] >= 0 for c in repeat["cases"])
    peaks = checks[4]["figures"]
    assert checks[4]["verdict"] == PASS and "no datasheet for a CPU" in checks[4]["summary"]
    assert set(peaks["matmul_tflops"]) == {"fp32", "bf16"} and peaks["copy_gbps"] > 0 and peaks["datasheet"] is None


def test_help_explains_each_check(capsys):
    with pytest.raises(SystemExit):
        main(["selftest", "--help"])
    text = capsys.readouterr().out
    for c in selftest.CHECKS:
        assert f"{c.number}. {c.name}:" in text
    assert "--json" in text and "NEEDS GPU" in text


# Verdicts on figures handed in ------------------------------------------------------------------------------

def _rows(*pairs):
    return [{"kernel": f"k{i}", "clock_s": clock, "kineto_s": kineto} for i, (clock, kineto) in enumerate(pairs)]


def test_clock_within_3_percent_passes_beyond_fails():
    assert clock_verdict(_rows((102e-6, 100e-6), (1.001e-3, 1e-3))).verdict == PASS
    assert clock_verdict(_rows((105e-6, 100e-6), (1.001e-3, 1e-3))).verdict == FAIL
    assert clock_verdict(_rows((95e-6, 100e-6))).verdict == FAIL  # a clock reading short is as wrong


def test_clock_judges_kernels_of_10_us_and_more_only():
    assert clock_verdict(_rows((6e-6, 5e-6), (1.01e-3, 1e-3))).verdict == PASS  # 20% off at 5 us: not judged
    assert clock_verdict(_rows((6e-6, 5e-6))).verdict == WARN  # nothing left to judge


NBYTES = (1 * 4096 + 4096 * 4096 + 1 * 4096) * 2  # the decode o-projection in bf16: ~33.6 MB
ROOF = datasheet_for("NVIDIA H200").memory_gbps  # 4800 GB/s


def _us_at(gbps: float) -> float:
    return NBYTES / (gbps * 1e9)


def test_l2_modes_in_order_under_the_roof_pass():
    assert l2_verdict(_us_at(4000), _us_at(3500), _us_at(3400), NBYTES, ROOF).verdict == PASS


def test_l2_warm_above_the_roof_warns():
    v = l2_verdict(_us_at(7000), _us_at(4000), _us_at(3900), NBYTES, ROOF)
    assert v.verdict == WARN and "warm reads above" in v.summary


def test_l2_rotate_above_the_roof_fails():
    v = l2_verdict(_us_at(7000), _us_at(5500), _us_at(4000), NBYTES, ROOF)
    assert v.verdict == FAIL and "rotate" in v.summary
    assert l2_verdict(_us_at(7000), _us_at(4000), _us_at(5000), NBYTES, ROOF).verdict == FAIL  # flush too


def test_l2_modes_out_of_order_warn():
    assert l2_verdict(_us_at(3000), _us_at(3500), _us_at(3400), NBYTES, ROOF).verdict == WARN  # warm slower
    assert l2_verdict(_us_at(4000), _us_at(3000), _us_at(3500), NBYTES, ROOF).verdict == WARN  # flush 14% faster
    assert l2_verdict(_us_at(4000), _us_at(3500), _us_at(3400), NBYTES, None).verdict == WARN  # no datasheet


def test_repeatability_limits_on_gpu_and_cpu():
    assert repeat_verdict({"gemm": 0.005, "rmsnorm": 0.009}, "cuda").verdict == PASS
    assert repeat_verdict({"gemm": 0.005, "rmsnorm": 0.015}, "cuda").verdict == WARN
    assert repeat_verdict({"gemm": 0.005, "rmsnorm": 0.03}, "cuda").verdict == FAIL
    assert repeat_verdict({"gemm": 0.03}, "cpu").verdict == PASS
    assert repeat_verdict({"gemm": 0.30}, "cpu").verdict == WARN  # a CPU's noise never fails the suite
    busy = repeat_verdict({"gemm": 0.01}, "cpu", busy=True)
    assert busy.verdict == WARN and "busy" in busy.summary


H200 = datasheet_for("NVIDIA H200")


def test_peaks_as_shares_of_the_datasheet():
    assert peaks_verdict("cuda", {"bf16": 790}, 4300, H200).verdict == PASS  # 80%, 90%
    low_matmul = peaks_verdict("cuda", {"bf16": 500}, 4300, H200)  # 51%
    assert low_matmul.verdict == WARN and "matmul bf16 51%" in low_matmul.summary
    assert peaks_verdict("cuda", {"bf16": 790}, 3000, H200).verdict == WARN  # copy 62%
    assert peaks_verdict("cuda", {"bf16": 790}, 4300, None, "Some GPU").verdict == WARN
    cpu = peaks_verdict("cpu", {"fp32": 0.1}, 10.0, None)
    assert cpu.verdict == PASS and "no datasheet for a CPU" in cpu.summary


STATE = {"sm_clock_mhz": 1980.0, "power_w": 450.0, "temperature_c": 60, "samples": 40,
         "power_violation_s": 0.0, "thermal_violation_s": 0.0, "throttled": []}


def test_nvml_telemetry():
    info = {"available": True, "devices": [{}]}
    assert nvml_verdict(info, None, STATE).verdict == PASS
    assert nvml_verdict(info, "NVML's energy counter cannot be read: Not Supported", STATE).verdict == WARN
    assert nvml_verdict(info, None, {**STATE, "thermal_violation_s": None}).verdict == WARN
    assert nvml_verdict(info, None, None).verdict == FAIL
    missing = nvml_verdict({"available": False, "reason": "nvidia-ml-py is not installed"}, None, None)
    assert missing.verdict == FAIL and "nvidia-ml-py" in missing.summary


def test_exit_code_fails_on_fail_only():
    def result(verdict):
        return Result(1, "x", verdict, "")
    assert exit_code([result(PASS), result(WARN), result(NEEDS_GPU)]) == 0
    assert exit_code([result(PASS), result(FAIL)]) == 1


def test_a_check_that_breaks_fails_and_says_why():
    def broken(env):
        raise RuntimeError("no such kernel")
    lines = []
    result = run_check(Check(9, "broken", "", broken), Env("cpu", say=lines.append))
    assert result.verdict == FAIL and "no such kernel" in result.summary
    assert lines[-1].startswith("FAIL      9 broken:")


# Measurement pieces that run on a CPU -----------------------------------------------------------------------

def test_kineto_durations_of_cpu_ops():
    """The parsing the GPU check uses on CUDA kernel events, on the CPU events of a profiled run."""
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(128, 128)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            torch.mm(a, a)
    durations = device_event_durations_s(prof.events(), "cpu", "aten::mm")
    assert len(durations) == 4 and all(d > 0 for d in durations)
    assert device_event_durations_s(prof.events(), "cuda") == []  # no device event on a CPU run


def test_profiled_time_per_call_lies_within_the_wall_time():
    a = torch.randn(128, 128)
    start = time.perf_counter()
    per_call = profiled_time_per_call(lambda: torch.mm(a, a), 5, "cpu", name="aten::mm")
    assert 0 < per_call <= (time.perf_counter() - start) / 5
    with pytest.raises(RuntimeError, match="no cpu event named aten::nothing"):
        profiled_time_per_call(lambda: torch.mm(a, a), 2, "cpu", name="aten::nothing")


def test_kernels_are_sized_to_their_target(monkeypatch):
    monkeypatch.setattr(selftest, "_event_time_s", lambda fn: fn())  # a "kernel" returns its own time

    _, n, t = sized(lambda n: (lambda: n * 1e-12), 10e-6, 2**22, 1.0, 2**16, (2**16, 2**31))  # linear in n
    assert abs(t / 10e-6 - 1) < 0.1 and n % 2**16 == 0
    _, n, t = sized(lambda n: (lambda: n ** 3 * 1e-15), 10e-3, 4096, 1 / 3, 256, (256, 32768))  # a cube
    assert abs(t / 10e-3 - 1) < 0.1 and n % 256 == 0
    _, n, _ = sized(lambda n: (lambda: n * 1e-15), 10e-3, 4096, 1 / 3, 256, (256, 32768))
    assert n == 32768  # held to its limit rather than allocating without end


def _event(name, activity_type, us, device_type=None):
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    event = SimpleNamespace(name=name, device_type=device_type or DeviceType.CUDA,
                            time_range=SimpleNamespace(elapsed_us=lambda: us))
    if activity_type is not None:
        event.activity_type = activity_type
    return event


def test_cuda_events_count_kernels_copies_and_sets_not_cupti_overhead():
    from torch.autograd import DeviceType

    events = [_event("void elementwise_kernel<...>", "kernel", 12.0), _event("Memcpy DtoD", "gpu_memcpy", 3.0),
              _event("Activity Buffer Request", "overhead", 500.0), _event("aten::mul", "cpu_op", 20.0, DeviceType.CPU),
              _event("cudaLaunchKernel", "cuda_runtime", 4.0, DeviceType.CPU)]
    assert device_event_durations_s(events, "cuda") == pytest.approx([12e-6, 3e-6])
    older = [_event("gemm_kernel", None, 7.0), _event("aten::mm", None, 9.0, DeviceType.CPU)]  # no activity type
    assert device_event_durations_s(older, "cuda") == pytest.approx([7e-6])


def test_the_gpu_checks_take_their_shapes_from_the_plan():
    from opbench.ops.gemm import GemmShape
    from opbench.spec.models import get_model
    from opbench.spec.plan import plan
    from opbench.spec.workload import parse_workload

    assert selftest._decode_gemm() == GemmShape(1, 4096, 4096)  # Llama-3-8B's o-projection at batch 1
    for model, workload, dtype in selftest.REPEAT_PLAN.values():
        roles = {c.role for c in plan(get_model(model), parse_workload(workload, dtype)).calls}
        assert {role for role, _ in selftest.REPEAT_ROLES} <= roles
