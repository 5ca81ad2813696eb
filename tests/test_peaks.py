"""Peaks and the roofline: datasheet lookup, the best of the search, shares computed by hand."""

from dataclasses import replace

import pytest

from opbench.cli import main
from opbench.ops.gemm import GemmShape
from opbench.measure.peak_cases import LaunchShape, PeakCase, SizeShape, _skip_reason, copy_size, peak_cases, work
from opbench.measure.peaks import datasheet_for, measured_peaks
from opbench.analyze.roofline import Ceilings, add_roofline, bound, ceilings
from opbench.record import CollectiveCase, OpCase, from_info

from tests.synthetic_runs import bench, machine, peak, write_run


def record(benchmark: dict):
    """The record a benchmark entry of a run holds."""
    return from_info(benchmark["extra_info"])


@pytest.mark.parametrize("device_name, sheet", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA B200", "B200"),
    ("AMD Instinct MI300X", "MI300X"),
    ("NVIDIA GeForce RTX 4090", None),
    (None, None),
])
def test_datasheet_lookup_by_the_name_nvml_reports(device_name, sheet):
    found = datasheet_for(device_name)
    assert (found.name if found else None) == sheet


def test_datasheet_figures_are_dense_not_sparse():
    h100 = datasheet_for("NVIDIA H100 80GB HBM3")
    assert h100.matmul_tflops["bf16"] == 989 and h100.memory_gbps == 3350  # DESIGN.md's reference figures
    assert datasheet_for("NVIDIA A100-SXM4-80GB").matmul_tflops["bf16"] == 312
    assert "fp8" not in datasheet_for("NVIDIA A100-SXM4-80GB").matmul_tflops  # Ampere has no fp8 tensor cores


def test_measured_peaks_take_the_best_of_the_search():
    peaks = [record(peak("matmul_tflops", 1e-3, flops=700 * 10**9, shape={"m": 1, "n": 1, "k": 1})),
             record(peak("matmul_tflops", 1e-3, flops=790 * 10**9, shape={"m": 2, "n": 2, "k": 2})),
             record(peak("matmul_tflops", 1e-3, dtype="fp8", flops=1500 * 10**9, shape={"m": 3, "n": 3, "k": 3})),
             record(peak("copy_gbps", 1e-3, nbytes=3 * 10**9)),
             record(peak("launch_s", 5e-6, shape={"elements": 1})),
             record(peak("launch_s", 4e-6, shape={"elements": 1}))]
    untimed = replace(record(peak("matmul_tflops", 1e-3, flops=10**15, shape={"m": 4, "n": 4, "k": 4})),
                      median_s=None)  # gated, never timed: no peak
    p = measured_peaks(peaks + [untimed], "cuda", "NVIDIA H100 80GB HBM3")
    assert p.matmul_tflops == {"bf16": pytest.approx(790), "fp8": pytest.approx(1500)}
    assert p.matmul_best_shape["bf16"] == {"m": 2, "n": 2, "k": 2}
    assert p.copy_gbps == pytest.approx(3000) and p.launch_s == 4e-6 and p.h2d_gbps is None
    assert measured_peaks([], "cuda", "x") is None and measured_peaks([untimed], "cuda", "x") is None


H100_MEASURED = Ceilings({"bf16": 800.0}, 3000.0, "measured on H100", True)


def test_roofline_share_of_a_compute_bound_gemm_by_hand():
    # 8192^3 bf16: 1.0995e12 FLOPs, 402,653,184 bytes; intensity 2731 FLOP/B >> ridge 800e12/3000e9 = 267
    b = bound(record(bench(8192, 8192, 8192, 2e-3)), H100_MEASURED)
    assert b.limit == "compute"
    assert b.share == pytest.approx((2 * 8192**3 / 800e12) / 2e-3)  # 0.687
    assert b.attainable_tflops == pytest.approx(800)


def test_roofline_share_of_a_memory_bound_decode_gemm_by_hand():
    # 1 x 4096 x 4096 bf16: reads the 32 MiB weight; intensity ~1 FLOP/B, far left of the ridge
    nbytes = (4096 + 4096 * 4096 + 4096) * 2
    b = bound(record(bench(1, 4096, 4096, 15e-6)), H100_MEASURED)
    assert b.limit == "memory"
    assert b.share == pytest.approx(nbytes / 3000e9 / 15e-6)  # 0.747
    assert b.attainable_tflops == pytest.approx(2 * 4096 * 4096 / (nbytes / 3000e9) / 1e12)


def test_roofline_has_no_share_where_it_has_no_ceiling():
    assert bound(record(bench(64, 64, 64, 1e-6, dtype="fp8")), H100_MEASURED) is None  # fp8 not measured
    collective = CollectiveCase(op="allreduce", backend="nccl", dtype="bf16", shape={"size_bytes": 2**20, "world": 8},
                                bytes=2**20, median_s=1e-5, world=8, busbw_factor=1.75)
    assert bound(collective, H100_MEASURED) is None  # bound by the fabric
    copy_only = OpCase(op="add", backend="torch", dtype="fp8", shape={"tokens": 1, "width": 1}, bytes=3 * 10**9,
                       median_s=2e-3)
    assert bound(copy_only, H100_MEASURED).share == pytest.approx(0.5)  # bandwidth alone bounds it
    assert bound(replace(copy_only, median_s=None), H100_MEASURED) is None  # not timed
    assert bound(record(peak("copy_gbps", 1e-3, nbytes=10**9)), H100_MEASURED) is None  # peaks define the ceilings
    assert bound(record(bench(64, 64, 64, 1e-6)), None) is None


def test_ceilings_prefer_measured_peaks_and_fall_back_to_the_datasheet():
    measured = measured_peaks([record(peak("copy_gbps", 1e-3, nbytes=10**9))], "cuda", "H100")
    assert ceilings(measured, machine()).source == "measured on H100"
    sheet = ceilings(None, machine())
    assert not sheet.measured and sheet.memory_gbps == 3350
    assert sheet.source == "from the datasheet of H100 SXM, not measured"
    assert ceilings(None, {"gpu": {"available": False}}) is None


def test_add_roofline_writes_peaks_and_shares_whatever_the_order():
    case = bench(8192, 8192, 8192, 2e-3)
    data = {"machine_info": machine(), "opbench": {"device": "cuda"},
            "benchmarks": [case, peak("matmul_tflops", 1e-3, flops=800 * 10**9, shape={"m": 1, "n": 1, "k": 1}),
                           peak("copy_gbps", 1e-3, nbytes=3 * 10**9)]}
    add_roofline(data)
    assert data["opbench"]["peaks"]["matmul_tflops"] == {"bf16": pytest.approx(800)}
    assert data["opbench"]["ceilings"]["source"] == "measured on NVIDIA H100 80GB HBM3"
    assert case["extra_info"]["roofline"]["share"] == pytest.approx(0.687, abs=1e-3)
    assert record(case).roofline.limit == "compute"  # written into the record, read back with it
    assert data["benchmarks"][1]["extra_info"]["roofline"] is None  # the peaks define the ceilings


def test_peak_case_work_by_hand():
    assert work(PeakCase("matmul", "bf16", GemmShape(4096, 4096, 4096))) == (2 * 4096**3, 3 * 4096 * 4096 * 2)
    assert work(PeakCase("copy", "fp32", SizeShape(2**30))) == (0, 2 * 2**30)  # read and written
    assert work(PeakCase("h2d", "fp32", SizeShape(2**28))) == (0, 2**28)  # over the link once
    assert work(PeakCase("launch", "fp32", LaunchShape(1))) == (1, 8)


def test_peak_ids_follow_the_case_id_convention():
    ids = [c.id for c in peak_cases("cuda")]
    assert "matmul-8192x8192x8192-bf16-fwd-torch" in ids and "copy-1024MiB-fp32-fwd-torch" in ids
    assert "launch-1-fp32-fwd-torch" in ids and len(ids) == len(set(ids))
    assert {c.dtype for c in peak_cases("cuda") if c.kind == "matmul"} == {"bf16", "fp16", "tf32", "fp8", "fp32"}


def test_on_cpu_the_peaks_that_mean_nothing_skip_with_a_reason():
    reasons = {c.id: _skip_reason(c, "cpu") for c in peak_cases("cpu")}
    assert reasons["matmul-512x512x512-fp32-fwd-torch"] is None and reasons[f"copy-{copy_size('cpu') // 2**20}MiB-fp32-fwd-torch"] is None
    assert "CUDA GPU" in reasons["h2d-256MiB-fp32-fwd-torch"]
    assert "tf32 math needs an NVIDIA GPU" in reasons["matmul-256x256x256-tf32-fwd-torch"]
    assert "compute capability 8.9" in reasons["matmul-256x256x256-fp8-fwd-torch"]
    assert "fp32 and bf16 only" in reasons["matmul-256x256x256-fp16-fwd-torch"]


def test_opbench_peaks_prints_measured_beside_the_datasheet(tmp_path, capsys):
    run = write_run(tmp_path / "peaks.json", [
        peak("matmul_tflops", 1e-3, flops=791 * 10**9, shape={"m": 8192, "n": 8192, "k": 8192}),
        peak("copy_gbps", 1e-3, nbytes=3 * 10**9), peak("launch_s", 4e-6, shape={"elements": 1})])
    assert main(["peaks", str(run)]) == 0
    out = capsys.readouterr().out
    assert "datasheet: H100 SXM" in out
    assert any(line.split()[:6] == ["matmul", "bf16", "(best", "at", "8192x8192x8192)", "791"] and "80%" in line
               for line in out.splitlines())
    assert any(line.startswith("device memory copy") and "3000 GB/s" in line and "90%" in line
               for line in out.splitlines())
    main(["peaks"])
    assert "MI300X" in capsys.readouterr().out


def test_opbench_peaks_on_a_run_without_peaks_is_one_line(tmp_path, capsys):
    run = write_run(tmp_path / "run.json", [bench(64, 64, 64, 1e-6)])
    with pytest.raises(SystemExit) as stop:
        main(["peaks", str(run)])
    assert stop.value.code == 2
    assert "has no peak cases" in capsys.readouterr().err


def test_a_cpu_copy_leaves_the_last_level_cache(monkeypatch):
    import opbench.measure.peak_cases as pc

    monkeypatch.setattr(pc, "last_level_cache_bytes", lambda: 256 * 2**20)
    assert pc.copy_size("cpu") == 4 * 256 * 2**20
    monkeypatch.setattr(pc, "last_level_cache_bytes", lambda: 0)  # unknown: 64 MiB
    assert pc.copy_size("cpu") == 64 * 2**20
