"""The CUDA timing path on a real GPU: what the fakes of test_cuda_timing.py cannot show. Skipped
without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from opbench.measure import hardware, peak_cases, timing
from opbench.measure.timing import RunSettings
from opbench.ops.gemm import GemmShape

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def settings(**kw) -> RunSettings:
    return RunSettings("cuda", budget_s=kw.pop("budget_s", 0.2), min_rounds=5, l2=kw.pop("l2", "warm"), **kw)


def eager_ms(fn, n: int = 20) -> float:
    """Device milliseconds per call of n calls launched back to back (long calls: no host gap)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def test_a_large_gemm_is_graph_captured_and_timed_as_eager_events_time_it():
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with timing.measure_stream("cuda"):
        samples = timing.measure([lambda: a @ b], settings())
    median_ms = sorted(samples.per_call_s)[len(samples.per_call_s) // 2] * 1e3
    assert samples.timer == "cuda-graph" and samples.setup_s > 0
    assert median_ms == pytest.approx(eager_ms(lambda: a @ b), rel=0.1)
    assert 2 * 8192**3 / (median_ms * 1e-3) < 2.5e15  # below any GPU's dense bf16 peak


def test_a_backward_is_graph_captured_on_its_forward_stream():
    with timing.measure_stream("cuda"):
        x = torch.randn(4096, 4096, device="cuda", requires_grad=True)
        y = torch.nn.functional.rms_norm(x, (4096,))
        dy = torch.randn_like(y)
        samples = timing.measure([lambda: torch.autograd.grad(y, x, dy, retain_graph=True)], settings())
    assert samples.timer == "cuda-graph"
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


def test_a_call_with_a_host_sync_falls_back_to_events_and_leaves_no_capture_stream():
    x = torch.randn(1 << 20, device="cuda")
    with timing.measure_stream("cuda"):
        stream = torch.cuda.current_stream()
        samples = timing.measure([lambda: x.sum().item()], settings())
        assert torch.cuda.current_stream() == stream
    assert samples.timer == "cuda-event"
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.cuda.synchronize()  # no CUDA error left behind


def test_tiny_kernels_replayed_behind_the_spin_show_no_launch_gaps():
    x = torch.zeros(1, device="cuda")
    with timing.measure_stream("cuda"):
        samples = timing.measure([lambda: x.add_(1)], settings())
    per_call = sorted(samples.per_call_s)[len(samples.per_call_s) // 2]
    assert samples.unroll == timing.MAX_UNROLL
    assert per_call < 4e-6  # a graph node of a 1-element kernel, not a host launch (~5-10 us)
    assert per_call < samples.host_s


def test_flush_mode_makes_an_l2_resident_read_slower_than_warm():
    x = torch.randn(4 * 2**20, device="cuda")  # 16 MiB: inside every recent L2
    with timing.measure_stream("cuda"):
        warm = timing.measure([lambda: x.sum()], settings())
        flush = timing.measure([lambda: x.sum()], settings(l2="flush"))
    assert flush.unroll == 1
    assert min(flush.per_call_s) > min(warm.per_call_s)


def test_rotation_covers_twice_the_l2():
    l2 = timing.l2_bytes()
    n = 2**20  # 4 MiB per copy
    copies = [torch.randn(n, device="cuda") for _ in range(timing.copies_for(4 * n, l2, "rotate"))]
    with timing.measure_stream("cuda"):
        samples = timing.measure([lambda c=c: c.sum() for c in copies], settings(l2="rotate"), footprint_bytes=4 * n)
    assert samples.working_set_bytes >= 2 * l2 and samples.unroll % len(copies) == 0


@pytest.mark.skipif(hardware.energy_unavailable() is not None, reason="NVML's energy counter cannot be read")
def test_the_energy_window_lasts_a_second():
    a, b = (torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with timing.measure_stream("cuda"):
        samples = timing.measure([lambda: a @ b], settings(energy=True))
    assert samples.energy.window_s >= timing.ENERGY_WINDOW_S
    assert 0 < samples.energy.j_per_call < 10
    assert samples.energy.scope == timing.ENERGY_SCOPE


def test_nvml_watches_the_rounds():
    if hardware._nvml_device() is None:
        pytest.skip("NVML cannot read this GPU")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    with timing.measure_stream("cuda"):
        samples = timing.measure([lambda: a @ a], settings(budget_s=0.3))
    assert samples.gpu.samples >= 3 and samples.gpu.sm_clock_mhz > 0
    assert samples.gpu.power_violation_s is None or samples.gpu.power_violation_s >= 0


def test_a_tf32_matmul_differs_from_its_reference_by_tf32s_rounding():
    _, verdict = peak_cases.gate(peak_cases.PeakCase("matmul", "tf32", GemmShape(2048, 2048, 2048)), "cuda")
    assert 1e-5 < verdict.rel_err < 2e-3  # a reference in TF32 would agree to ~0: the check would be vacuous
