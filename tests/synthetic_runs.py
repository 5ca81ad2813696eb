"""Run files written by hand: pytest-benchmark's schema with opbench's extra_info, and chosen statistics."""

import json
from pathlib import Path

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


def bench(m, n, k, median_s, spread=0.01, *, dtype="bf16", pass_="fwd", backend="torch", roles=("tiny/prefill/attn.o",),
          **extra) -> dict:
    """A GEMM case whose rounds have the given median and an IQR of +-spread around it."""
    info = {"op": "gemm", "backend": backend, "dtype": dtype, "pass": pass_, "shape": {"m": m, "n": n, "k": k},
            "roles": list(roles), "flops": 2 * m * n * k, "bytes": (m * k + k * n + m * n) * 2,
            "median_s": median_s, "timer": "cuda-graph", "unroll": 4, **extra}
    info["tflops"], info["gbps"] = info["flops"] / median_s / 1e12, info["bytes"] / median_s / 1e9
    param = f"{m}x{n}x{k}-{dtype}-{pass_}-{backend}"
    stats = {"min": median_s * (1 - 3 * spread), "max": median_s * (1 + 3 * spread), "median": median_s,
             "q1": median_s * (1 - spread), "q3": median_s * (1 + spread), "rounds": 20, "mean": median_s,
             "stddev": median_s * spread, "iqr": 2 * median_s * spread}
    return {"name": f"test_gemm[{param}]", "fullname": f"bench/test_gemm.py::test_gemm[{param}]", "param": param,
            "group": None, "params": {}, "extra_info": info, "stats": stats, "options": {}}


def peak(metric, median_s, *, dtype="bf16", flops=0, nbytes=0, shape=None) -> dict:
    """A peak case (see opbench/peak_cases.py) with the given median."""
    kind = metric.split("_")[0]
    shape = shape or {"size_bytes": nbytes}
    info = {"op": f"peak.{kind}", "backend": "torch", "dtype": dtype, "pass": "fwd", "shape": shape, "roles": [],
            "flops": flops, "bytes": nbytes, "median_s": median_s, "peak": metric,
            "tflops": flops / median_s / 1e12, "gbps": nbytes / median_s / 1e9, "timer": "cuda-graph", "unroll": 1}
    param = f"{kind}-{'x'.join(map(str, shape.values()))}-{dtype}-fwd-torch"
    stats = {"min": median_s, "max": median_s, "median": median_s, "q1": median_s, "q3": median_s, "rounds": 5}
    return {"name": f"test_peak[{param}]", "param": param, "extra_info": info, "stats": stats}


def write_run(path: Path, benchmarks: list[dict], machine_info: dict | None = None,
              section: dict | None = None) -> Path:
    data = {"machine_info": machine_info or machine(), "commit_info": {}, "benchmarks": benchmarks,
            "datetime": "2026-01-01T00:00:00", "version": "5.2.3",
            "opbench": section if section is not None else {"device": "cuda", "profile": "default", "plans": []}}
    path.write_text(json.dumps(data))
    return path
