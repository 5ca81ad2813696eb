"""The card's ceilings: datasheet figures of common GPUs, the peaks a run measured, and `opbench peaks`.

The peaks are measured by bench/test_peaks.py (opbench/peak_cases.py); each peak case's extra_info
names its metric under "peak", and measured_peaks() takes the best of each over a run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from opbench.record import PeakCase
from opbench.analyze.runs import RunError, device_label, load_run, used_gpu
from opbench.text import format_flops, format_seconds, table_lines


@dataclass(frozen=True)
class Datasheet:
    name: str
    pattern: str  # regular expression matched against the device name NVML or torch reports
    matmul_tflops: Mapping[str, float]  # dense tensor math (no 2:4 sparsity); fp32: non-tensor FP32
    memory_gbps: float
    host_link_gbps: float  # each direction
    source: str


# Vendors quote tensor throughput "with sparsity"; the dense figures below are half of those.
DATASHEETS: tuple[Datasheet, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5 and PCIe columns), PCIe Gen5 x16: 64 GB/s a direction.
    # https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
    Datasheet("H100 PCIe", r"H100.*PCIe",
              {"fp8": 1513, "bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}, 2000, 64,
              "NVIDIA H100 datasheet, PCIe"),
    Datasheet("H100 SXM", r"H100.*(SXM|HBM3)",
              {"fp8": 1979, "bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}, 3350, 64,
              "NVIDIA H100 datasheet, SXM5"),
    # NVIDIA H200 product page and datasheet: H100 SXM compute, 141 GB HBM3e at 4.8 TB/s.
    # https://www.nvidia.com/en-us/data-center/h200/
    Datasheet("H200", r"H200",
              {"fp8": 1979, "bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}, 4800, 64,
              "NVIDIA H200 datasheet, SXM"),
    # NVIDIA A100 datasheet: 80GB SXM 2039 GB/s, 80GB PCIe 1935 GB/s, 40GB 1555 GB/s; PCIe Gen4 x16.
    # https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
    Datasheet("A100 PCIe 80GB", r"A100.*80GB.*PCIe",
              {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}, 1935, 32, "NVIDIA A100 datasheet, 80GB PCIe"),
    Datasheet("A100 SXM 80GB", r"A100.*80GB",
              {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}, 2039, 32, "NVIDIA A100 datasheet, 80GB SXM"),
    Datasheet("A100 40GB", r"A100",
              {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}, 1555, 32, "NVIDIA A100 datasheet, 40GB"),
    # NVIDIA L40S datasheet: 864 GB/s GDDR6, PCIe Gen4 x16.
    # https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413
    Datasheet("L40S", r"L40S",
              {"fp8": 733, "bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}, 864, 32, "NVIDIA L40S datasheet"),
    # NVIDIA HGX B200 (8 GPUs; per GPU = 1/8): FP8 72 PF, BF16 36 PF, TF32 18 PF sparse, FP32 600 TF,
    # 8 TB/s HBM3e per GPU, PCIe Gen5 x16 to the host. https://www.nvidia.com/en-us/data-center/hgx/
    Datasheet("B200", r"B200",
              {"fp8": 4500, "bf16": 2250, "fp16": 2250, "tf32": 1125, "fp32": 75}, 8000, 64,
              "NVIDIA HGX B200 specifications, per GPU"),
    # AMD Instinct MI300X data sheet: 5.3 TB/s HBM3, PCIe Gen5 x16 (FP32: matrix rate).
    # https://www.amd.com/content/dam/amd/en/documents/instinct-tech-docs/data-sheets/amd-instinct-mi300x-data-sheet.pdf
    Datasheet("MI300X", r"MI300X",
              {"fp8": 2615, "bf16": 1307, "fp16": 1307, "tf32": 654, "fp32": 163}, 5300, 64,
              "AMD Instinct MI300X data sheet"),
)


def datasheet_for(device_name: str | None) -> Datasheet | None:
    """The first datasheet whose pattern the device name matches (the table lists specific SKUs first)."""
    if not device_name:
        return None
    return next((d for d in DATASHEETS if re.search(d.pattern, device_name, re.IGNORECASE)), None)


# Measured peaks, from a run's extra_info ---------------------------------------------------------------

@dataclass(frozen=True)
class MeasuredPeaks:
    device: str  # "cuda" or "cpu"
    label: str  # the GPU's name, or "CPU (...)"
    matmul_tflops: dict[str, float]  # per dtype, the best of the search
    matmul_best_shape: dict[str, dict[str, int]]  # per dtype, the shape that reached it
    copy_gbps: float | None
    h2d_gbps: float | None
    d2h_gbps: float | None
    launch_s: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def measured_peaks(peaks: Iterable[PeakCase], device: str, label: str) -> MeasuredPeaks | None:
    """The best of each peak metric over a run's peak records; None if it has none."""
    matmul: dict[str, tuple[float, dict]] = {}
    rates: dict[str, float] = {}
    launch_s = None
    for p in peaks:
        if not p.median_s:
            continue
        if p.metric == "matmul_tflops":
            if p.tflops > matmul.get(p.dtype, (0.0, {}))[0]:
                matmul[p.dtype] = (p.tflops, p.shape)
        elif p.metric == "launch_s":
            launch_s = p.median_s if launch_s is None else min(launch_s, p.median_s)
        else:
            rates[p.metric] = max(rates.get(p.metric, 0.0), p.gbps)
    if not (matmul or rates or launch_s):
        return None
    return MeasuredPeaks(device, label, {d: t for d, (t, _) in matmul.items()},
                         {d: s for d, (_, s) in matmul.items()}, rates.get("copy_gbps"), rates.get("h2d_gbps"),
                         rates.get("d2h_gbps"), launch_s)


def run_peaks(run) -> MeasuredPeaks:
    """A run's measured peaks; RunError for a run that has none."""
    peaks = measured_peaks(run.of_kind("peak"), run.device, device_label(run.machine_info, run.device))
    if peaks is None:
        raise RunError(f"{run.path} has no peak cases; measure them with "
                       "`pytest bench/test_peaks.py --benchmark-json=FILE`")
    return peaks


def _datasheet_table() -> list[tuple]:
    dtypes = ("fp8", "bf16", "fp16", "tf32", "fp32")
    rows = [("GPU", *(f"{d} TFLOP/s" for d in dtypes), "memory GB/s", "host link GB/s", "source")]
    for d in DATASHEETS:
        rows.append((d.name, *(f"{d.matmul_tflops[t]:g}" if t in d.matmul_tflops else "-" for t in dtypes),
                     f"{d.memory_gbps:g}", f"{d.host_link_gbps:g}", d.source))
    return rows


def comparison_rows(peaks: MeasuredPeaks, sheet: Datasheet | None) -> list[tuple[str, str, str, str]]:
    """(metric, measured, datasheet, measured / datasheet) for each measured peak."""
    def row(metric: str, value: float, text: str, sheet_value: float | None, unit: str) -> tuple[str, str, str, str]:
        return (metric, text, f"{sheet_value:g} {unit}" if sheet_value else "-",
                f"{value / sheet_value:.0%}" if sheet_value else "-")

    rows = [row(f"matmul {dtype} (best at {'x'.join(map(str, peaks.matmul_best_shape[dtype].values()))})",
                tflops, format_flops(tflops * 1e12), sheet.matmul_tflops.get(dtype) if sheet else None, "TFLOP/s")
            for dtype, tflops in peaks.matmul_tflops.items()]
    for metric, value, sheet_value in (("device memory copy", peaks.copy_gbps, sheet and sheet.memory_gbps),
                                       ("host to device", peaks.h2d_gbps, sheet and sheet.host_link_gbps),
                                       ("device to host", peaks.d2h_gbps, sheet and sheet.host_link_gbps)):
        if value:
            rows.append(row(metric, value, f"{value:.4g} GB/s", sheet_value, "GB/s"))
    if peaks.launch_s:
        what = "kernel launch overhead" if peaks.device == "cuda" else "per-op overhead (torch dispatch on CPU)"
        rows.append((what, format_seconds(peaks.launch_s), "-", "-"))
    return rows


def add_command(sub) -> None:
    p = sub.add_parser("peaks", help="the datasheet ceilings of common GPUs; given a run, its measured peaks "
                                     "beside its GPU's datasheet")
    p.add_argument("run", nargs="?", help="a run with peak cases: pytest bench/test_peaks.py --benchmark-json=FILE")
    p.set_defaults(func=_command)


def _command(args) -> int:
    if args.run is None:
        print("dense datasheet figures (no 2:4 sparsity); measure a card with "
              "`pytest bench/test_peaks.py --benchmark-json=peaks.json`, then `opbench peaks peaks.json`")
        print("\n".join(table_lines(_datasheet_table())))
        return 0
    run = load_run(args.run)
    peaks = run_peaks(run)
    sheet = datasheet_for((used_gpu(run.machine_info) or {}).get("name"))
    print(f"peaks measured on {peaks.label} ({run.path}); "
          + (f"datasheet: {sheet.name} ({sheet.source})" if sheet else "no datasheet for this device"))
    print("\n".join(table_lines([("metric", "measured", "datasheet", "of datasheet"),
                                  *comparison_rows(peaks, sheet)])))
    return 0
