"""The peak cases of bench/test_peaks.py: what they run, their gate, and how they are timed.

Dense matmul TFLOP/s per dtype (the best of a search over large shapes), device memory copy
bandwidth, host-to-device and device-to-host bandwidth (pinned host memory) and kernel launch
overhead. On a CPU the same cases measure the CPU's fp32 and bf16 matmul rate, its memcpy bandwidth
and torch's per-op dispatch cost, labelled CPU by the run; host-device copies skip.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch

from opbench.ops.dtypes import get_dtype
from opbench.measure.gate import check, fail_unless_passed
from opbench.measure.hardware import HostWatch, last_level_cache_bytes
from opbench.measure.runner import finish
from opbench.ops.base import shape_dict
from opbench.ops.gemm import GEMM, GemmShape, bytes_moved, flops
from opbench.measure.timing import RunSettings, Samples, measure, measure_stream, take_rounds
from opbench.record import Gate, PeakCase as Peak


@dataclass(frozen=True)
class SizeShape:
    size_bytes: int  # one buffer


@dataclass(frozen=True)
class LaunchShape:
    elements: int  # of the tensor the launched kernel touches


# kind -> the key of the measured peak it yields
METRICS = {"matmul": "matmul_tflops", "copy": "copy_gbps", "h2d": "h2d_gbps", "d2h": "d2h_gbps",
           "launch": "launch_s"}

# Large shapes fill every SM with full tiles; the best of them is the card's dense matmul ceiling.
# On a CPU, sizes that take milliseconds, in the dtypes the CPU smoke profile runs.
_MATMUL_SHAPES = {"cuda": tuple(GemmShape(n, n, n) for n in (4096, 6144, 8192, 12288, 16384)),
                  "cpu": (GemmShape(256, 256, 256), GemmShape(512, 512, 512))}
_MATMUL_DTYPES = ("bf16", "fp16", "tf32", "fp8", "fp32")
_CPU_MATMUL_DTYPES = ("fp32", "bf16")
_HOST_LINK_BYTES = 256 * 2**20
_LAUNCHES_PER_ROUND = 1000


@dataclass(frozen=True)
class PeakCase:
    kind: str  # a key of METRICS
    dtype: str
    shape: GemmShape | SizeShape | LaunchShape

    @property
    def op(self) -> str:
        return f"peak.{self.kind}"

    @property
    def id(self) -> str:
        if isinstance(self.shape, SizeShape):
            size = f"{self.shape.size_bytes // 2**20}MiB"
        else:
            size = "x".join(str(v) for v in shape_dict(self.shape).values())
        return f"{self.kind}-{size}-{self.dtype}-fwd-torch"


_IMPL = {"copy": "Tensor.copy_, device to device", "h2d": "Tensor.copy_ from pinned host memory",
         "d2h": "Tensor.copy_ to pinned host memory",
         "launch": f"Tensor.add_ on a 1-element tensor, {_LAUNCHES_PER_ROUND} launches back to back per round"}


def copy_size(device: str) -> int:
    """A GPU copies 1 GiB (8x or more the L2 of current GPUs: 50 MB on an H100, 126 MB on a B200), a
    CPU 4x its last-level cache, at least 64 MiB: out of cache either way, so the copy measures memory."""
    if device == "cuda":
        return 2**30
    return max(2**26, 4 * last_level_cache_bytes())


def peak_cases(device: str) -> list[PeakCase]:
    cases = [PeakCase("matmul", d, s) for d in _MATMUL_DTYPES for s in _MATMUL_SHAPES[device]]
    cases.append(PeakCase("copy", "fp32", SizeShape(copy_size(device))))
    cases += [PeakCase(k, "fp32", SizeShape(_HOST_LINK_BYTES)) for k in ("h2d", "d2h")]
    cases.append(PeakCase("launch", "fp32", LaunchShape(1)))
    return cases


def _skip_reason(case: PeakCase, device: str) -> str | None:
    if case.kind in ("h2d", "d2h") and device != "cuda":
        return "host-device copies need a CUDA GPU"
    if case.kind != "matmul":
        return None
    reason = GEMM.backends["torch"].requires(case.shape, get_dtype(case.dtype), device)
    if reason:
        return f"torch: {reason}"
    if device != "cuda" and case.dtype not in _CPU_MATMUL_DTYPES:
        return f"on a CPU the matmul ceiling is measured in {' and '.join(_CPU_MATMUL_DTYPES)} only"
    return None


def prepare(case: PeakCase, device: str) -> tuple[Callable[[], object], Callable[[], object], Callable[[], object]]:
    """(the timed call, one call's output on fresh data, what that output should be)."""
    dtype = get_dtype(case.dtype)
    if case.kind == "matmul":
        inputs = GEMM.inputs(case.shape, dtype, "fwd", device)
        fn = GEMM.backends["torch"].prepare(inputs, dtype, "fwd")
        return fn, fn, lambda: GEMM.reference(inputs, dtype, "fwd")
    if case.kind == "launch":
        x = torch.zeros(case.shape.elements, device=device)
        fn = lambda: x.add_(1)  # noqa: E731 - a kernel that does next to nothing
        return fn, lambda: x.zero_().add_(1), lambda: torch.ones_like(x)
    n = case.shape.size_bytes // dtype.bytes
    src_on, dst_on = {"copy": (device, device), "h2d": ("cpu", device), "d2h": (device, "cpu")}[case.kind]
    pinned = device == "cuda"  # host buffers of host-device copies are pinned, as fast transfers need
    src = torch.randn(n, dtype=dtype.torch, device=src_on, pin_memory=pinned and src_on == "cpu")
    dst = torch.empty(n, dtype=dtype.torch, device=dst_on, pin_memory=pinned and dst_on == "cpu")
    fn = lambda: dst.copy_(src, non_blocking=True)  # noqa: E731

    def output() -> torch.Tensor:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()  # a non-blocking copy into host memory is not there before this
        return dst
    return fn, output, lambda: src.to(dst.device)


def gate(case: PeakCase, device: str) -> tuple[Callable[[], object], Gate]:
    """The timed call and the gate's verdict on it. The output is computed in the case's math mode,
    the reference with TF32 off: a tf32 reference would share the rounding it is there to catch.
    Output and reference are dropped on return (the largest matmul's hold gigabytes)."""
    dtype = get_dtype(case.dtype)
    with dtype.math_mode():
        fn, output, expected = prepare(case, device)
        out = output()
    with get_dtype("fp32").math_mode():
        verdict = check(out, expected(), dtype.tol if case.kind == "matmul" else 0.0)
    return fn, verdict


def _time_launches(fn: Callable[[], object], settings: RunSettings, started: float) -> Samples:
    """Back-to-back launches on the host clock, with nothing (no CUDA graph) hiding their cost: per
    launch, the larger of the host's launch cost and the GPU's time per tiny kernel."""
    sync = torch.cuda.synchronize if settings.device == "cuda" else (lambda: None)
    fn()
    sync()
    rounds_start = time.perf_counter()

    def one_round() -> float:
        start = time.perf_counter()
        for _ in range(_LAUNCHES_PER_ROUND):
            fn()
        sync()
        return (time.perf_counter() - start) / _LAUNCHES_PER_ROUND
    with HostWatch() as watch:  # launches are host time: a busy host makes them unreliable, GPU or not
        samples = take_rounds(one_round, settings.budget_s, settings.min_rounds, settings.ci_target)
    return Samples(samples, "cpu" if settings.device == "cpu" else "host", _LAUNCHES_PER_ROUND, "warm",
                   host=watch.load, setup_s=rounds_start - started, timing_s=time.perf_counter() - rounds_start)


def work(case: PeakCase) -> tuple[int, int]:
    """(FLOPs, bytes) of one call: GEMM's conventions; a device copy reads and writes each byte, a
    host-device copy moves each byte over the link once; a launch counts its element read and written."""
    if case.kind == "matmul":
        return flops(case.shape), bytes_moved(case.shape, get_dtype(case.dtype))
    if case.kind == "launch":
        return case.shape.elements, 2 * case.shape.elements * get_dtype(case.dtype).bytes
    return 0, case.shape.size_bytes * (2 if case.kind == "copy" else 1)


def run_peak(benchmark, case: PeakCase, settings: RunSettings) -> Peak:
    """A peak case: the same record, gate and timing as the plan's cases."""
    started = time.perf_counter()
    device = settings.device
    case_flops, case_bytes = work(case)
    record = Peak(op=case.op, backend="torch", dtype=case.dtype, shape=shape_dict(case.shape), flops=case_flops,
                  bytes=case_bytes, impl=GEMM.backends["torch"].impl if case.kind == "matmul" else _IMPL[case.kind],
                  metric=METRICS[case.kind])
    reason = _skip_reason(case, device)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    with measure_stream(device):
        fn, verdict = gate(case, device)
        record = replace(record, correct=verdict)
        fail_unless_passed(verdict)
        with get_dtype(case.dtype).math_mode():
            if not benchmark.enabled:
                samples = None
            elif case.kind == "launch":
                samples = _time_launches(fn, settings, started)
            else:  # a ceiling is the best the card does: warm caches, no energy reading
                samples = measure([fn], replace(settings, l2="warm", energy=False), started=started)
    return finish(benchmark, record, samples, settings)
