"""The one runner: availability, correctness gate, timing, then the record into extra_info.

Every kind of case goes through `finish`: the samples are handed to pytest-benchmark (so its
statistics are the suite's), and the record (opbench.record) is written as the case's extra_info.
Op cases are run here; units, peaks and collectives build their calls and gate in their own
modules and end the same way.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

from opbench.measure.bench_adapter import record_samples
from opbench.measure.cases import Case
from opbench.measure.gate import check, fail_unless_passed
from opbench.measure.hardware import last_level_cache_bytes
from opbench.measure.timing import RunSettings, Samples, copies_for, l2_bytes, measure, measure_stream
from opbench.ops import get_family
from opbench.ops.base import shape_dict
from opbench.ops.dtypes import get_dtype
from opbench.record import OpCase, Record, Stability


def is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text


def finish(benchmark, record: Record, samples: Samples | None, settings: RunSettings) -> Record:
    """The record with its timing, handed to pytest-benchmark and written as extra_info. Without
    samples (benchmarking disabled) the record says how the case ran and holds no time."""
    if samples is None or not benchmark.enabled:
        record_samples(benchmark, ())  # the gate alone ran: pytest-benchmark learns its fixture was used
    else:
        stability = Stability.of(samples.per_call_s, settings.stable_ci)
        if samples.host is not None and samples.host.busy:
            stability = dataclasses.replace(stability, stable=False)
        record = dataclasses.replace(
            record, timer=samples.timer, unroll=samples.unroll, l2=samples.l2,
            working_set_bytes=samples.working_set_bytes, host_s=samples.host_s, median_s=stability.median_s,
            stability=stability, gpu=samples.gpu, host=samples.host, energy=samples.energy,
            setup_s=samples.setup_s, timing_s=samples.timing_s)
        record_samples(benchmark, samples.per_call_s)
    benchmark.extra_info.update(record.to_info())
    return record


def timed(calls: list[Callable[[], Any]], settings: RunSettings, benchmark, footprint_bytes: int = 0,
          started: float | None = None) -> Samples | None:
    """The samples of a case, or None where pytest-benchmark is disabled (the gate alone ran).
    `started`: the case's start (time.perf_counter), from which its setup time is counted."""
    if not benchmark.enabled:
        return None
    return measure(calls, settings, footprint_bytes=footprint_bytes, started=started)


def cache_bytes(device: str) -> int:
    """The cache the rotation must overflow: the GPU's L2, or the CPU's last level."""
    return l2_bytes() if device == "cuda" else last_level_cache_bytes()


def skip_oom(error: BaseException, device: str) -> None:
    if not is_oom(error):
        raise error
    if device == "cuda":
        torch.cuda.empty_cache()
    pytest.skip(f"out of memory: {str(error).splitlines()[0][:200]}")


def run_case(benchmark, case: Case, settings: RunSettings):
    """An op case: its backend's availability, the gate on fresh inputs, timing over input copies."""
    started = time.perf_counter()
    family = get_family(case.op)
    backend = family.backends[case.backend]
    dtype = get_dtype(case.dtype)
    nbytes = family.bytes(case.shape, dtype, case.pass_)
    record = OpCase(op=case.op, backend=case.backend, dtype=case.dtype, pass_=case.pass_,
                    shape=shape_dict(case.shape), roles=tuple(case.roles), flops=family.flops(case.shape, case.pass_),
                    bytes=nbytes, impl=backend.impl)
    reason = backend.requires(case.shape, dtype, settings.device)
    if reason:
        pytest.skip(f"{case.backend}: {reason}")

    torch.manual_seed(zlib.crc32(case.id.encode()))
    samples = None
    try:
        with measure_stream(settings.device):
            with dtype.math_mode():
                inputs = family.inputs(case.shape, dtype, case.pass_, settings.device)
                fn = backend.prepare(inputs, dtype, case.pass_)
                out = fn()
            with get_dtype("fp32").math_mode():  # the reference never runs in tf32
                verdict = check(out, family.reference(inputs, dtype, case.pass_), dtype.tol)
            del out
            record = dataclasses.replace(record, correct=verdict)
            fail_unless_passed(verdict)
            with dtype.math_mode():
                calls = [fn]
                for _ in range(copies_for(nbytes, cache_bytes(settings.device), settings.l2) - 1):
                    calls.append(backend.prepare(family.inputs(case.shape, dtype, case.pass_, settings.device),
                                                 dtype, case.pass_))
                samples = timed(calls, settings, benchmark, nbytes, started)
    except Exception as error:  # pytest's skip and fail are not Exceptions: they pass through
        skip_oom(error, settings.device)
    return finish(benchmark, record, samples, settings)
