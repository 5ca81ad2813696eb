"""Run files written by hand: pytest-benchmark's schema, each case's extra_info a real record
(opbench.record: `to_info()` of an OpCase or PeakCase with its Stability), and rounds chosen so that
the statistics are known."""

import json
import statistics
from dataclasses import replace
from pathlib import Path

from opbench.measure.timing import STABLE_CI
from opbench.record import Gate, GpuState, OpCase, PeakCase, Record, Stability

H100 = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "vbios": "96.00.99.00.01", "memory_total_bytes": 85 * 2**30,
        "max_sm_clock_mhz": 1980, "max_mem_clock_mhz": 2619, "app_sm_clock_mhz": 1980, "app_mem_clock_mhz": 2619,
        "power_limit_w": 700.0, "ecc_enabled": True, "mig_enabled": False}


def machine(driver="550.54.15", torch="2.4.0", gpu=H100, **software) -> dict:
    return {"machine": "x86_64", "system": "Linux", "release": "6.8", "python_implementation": "CPython",
            "python_version": "3.11.7", "cpu": {"brand_raw": "Intel Xeon"},
            "gpu": {"available": True, "driver": driver, "cuda_driver": "12.4", "devices": [gpu],
                    "used_uuid": gpu["uuid"]},
            "software": {"torch": torch, "cuda_runtime": "12.4", "cudnn": 90100, "nccl": "2.21.5",
                         "triton": "3.0.0", "flash_attn": None, **software}}


def rounds(median_s: float, spread: float, n: int = 21) -> list[float]:
    """n rounds (n odd) evenly spread over median x (1 -+ 2 spread): the median is median_s and the
    quartiles median x (1 -+ spread), exactly."""
    half = (n - 1) // 2
    return [median_s * (1 + 2 * spread * (i - half) / half) for i in range(n)]


def stats(samples: list[float]) -> dict:
    """pytest-benchmark's statistics of the rounds, as it computes them."""
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    return {"min": min(samples), "max": max(samples), "mean": statistics.fmean(samples),
            "stddev": statistics.stdev(samples) if len(samples) > 1 else 0.0, "rounds": len(samples),
            "median": statistics.median(samples), "q1": q1, "q3": q3, "iqr": q3 - q1, "data": list(samples)}


def benchmark_of(record: Record, samples: list[float], name: str, fullname: str | None = None) -> dict:
    """One entry of a run's "benchmarks": the record timed by `samples`, as the runner writes it."""
    param = name[name.index("[") + 1:-1]
    return {"name": name, "fullname": fullname or f"bench/{name.split('[')[0]}.py::{name}", "param": param,
            "group": None, "params": {}, "extra_info": record.to_info(), "stats": stats(samples), "options": {}}


def gemm_case(m, n, k, median_s, spread=0.004, *, dtype="bf16", pass_="fwd", backend="torch",
              roles=("tiny/prefill/attn.o",), stable=None, gpu: GpuState | None = None, **fields) -> tuple:
    """(record, rounds) of a GEMM case whose rounds have the given median and quartiles at
    median x (1 -+ spread); `stable` overrides the stability rule's verdict."""
    samples = rounds(median_s, spread)
    stability = Stability.of(samples, STABLE_CI)
    if stable is not None:
        stability = replace(stability, stable=stable)
    size = 1 if dtype == "fp8" else 4 if dtype == "fp32" else 2
    record = OpCase(op="gemm", backend=backend, dtype=dtype, pass_=pass_, shape={"m": m, "n": n, "k": k},
                    roles=tuple(roles), flops=2 * m * n * k, bytes=(m * k + k * n + m * n) * size, impl="torch.matmul",
                    timer="cuda-graph", unroll=4, l2="rotate", working_set_bytes=(m * k + k * n + m * n) * size * 4,
                    median_s=stability.median_s, stability=stability, gpu=gpu, correct=Gate(1e-3, 1e-2), **fields)
    return record, samples


def bench(m, n, k, median_s, spread=0.004, **kwargs) -> dict:
    """A GEMM case's benchmark entry (see gemm_case)."""
    record, samples = gemm_case(m, n, k, median_s, spread, **kwargs)
    return benchmark_of(record, samples, f"test_gemm[{m}x{n}x{k}-{record.dtype}-{record.pass_}-{record.backend}]")


def gpu_state(sm_clock_mhz=1980.0, throttled=()) -> GpuState:
    return GpuState(sm_clock_mhz, 650.0, 70.0, 40, 0.0, 0.0, tuple(throttled))


def peak(metric, median_s, *, dtype="bf16", flops=0, nbytes=0, shape=None) -> dict:
    """A peak case (see opbench/measure/peak_cases.py) with the given median."""
    kind = metric.split("_")[0]
    shape = shape or {"size_bytes": nbytes}
    samples = [median_s] * 5
    record = PeakCase(op=f"peak.{kind}", backend="torch", dtype=dtype, shape=shape, flops=flops, bytes=nbytes,
                      metric=metric, timer="cuda-graph", unroll=1, l2="warm", median_s=median_s,
                      stability=Stability.of(samples, STABLE_CI), correct=Gate(0.0, 0.0))
    return benchmark_of(record, samples, f"test_peak[{kind}-{'x'.join(map(str, shape.values()))}-{dtype}-fwd-torch]")


def write_run(path: Path, benchmarks: list[dict], machine_info: dict | None = None,
              section: dict | None = None) -> Path:
    data = {"machine_info": machine_info or machine(), "commit_info": {}, "benchmarks": benchmarks,
            "datetime": "2026-01-01T00:00:00", "version": "5.3.1",
            "opbench": section if section is not None else {"device": "cuda", "profile": "default", "plans": []}}
    path.write_text(json.dumps(data))
    return path
