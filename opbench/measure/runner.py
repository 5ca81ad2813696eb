"""The shared harness every bench module calls: availability, correctness gate, timing, extra_info."""

from __future__ import annotations

import zlib

import pytest
import torch

from opbench.measure.cases import Case
from opbench.ops.dtypes import get_dtype
from opbench.measure.hardware import watch_clocks
from opbench.ops import get_family
from opbench.ops.base import shape_dict
from opbench.measure.timing import RunSettings, check, measure


def is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text


def run_case(benchmark, case: Case, settings: RunSettings) -> None:
    family = get_family(case.op)
    backend = family.backends[case.backend]
    dtype = get_dtype(case.dtype)
    flops = family.flops(case.shape, case.pass_)
    nbytes = family.bytes(case.shape, dtype, case.pass_)
    info = benchmark.extra_info
    info.update({"op": case.op, "backend": case.backend, "dtype": case.dtype, "pass": case.pass_,
                 "shape": shape_dict(case.shape), "roles": list(case.roles), "flops": flops, "bytes": nbytes,
                 "impl": backend.impl})
    reason = backend.requires(case.shape, dtype, settings.device)
    if reason:
        pytest.skip(f"{case.backend}: {reason}")

    torch.manual_seed(zlib.crc32(case.id.encode()))
    try:
        with dtype.math_mode():
            inputs = family.inputs(case.shape, dtype, case.pass_, settings.device)
            fn = backend.prepare(inputs, dtype, case.pass_)
            out = fn()
        with get_dtype("fp32").math_mode():  # the reference never runs in tf32
            verdict = check(out, family.reference(inputs, dtype, case.pass_), dtype.tol)
        del out
        info["correct"] = verdict.as_dict()
        if not verdict.passed:
            pytest.fail(f"wrong result: relative error {verdict.rel_err:.3g} > tolerance {verdict.tol:g}"
                        f" (output {verdict.output})", pytrace=False)
        with dtype.math_mode(), watch_clocks(settings.device) as clocks:
            timing = measure(benchmark, fn, settings)
    except Exception as error:
        if not is_oom(error):
            raise
        if settings.device == "cuda":
            torch.cuda.empty_cache()
        pytest.skip(f"out of memory: {str(error).splitlines()[0][:200]}")

    info.update({"timer": timing.timer, "unroll": timing.unroll, **clocks})  # clocks: CUDA only
    if timing.energy_j is not None:
        info["energy_j"] = timing.energy_j
    if benchmark.stats is not None:
        median_s = benchmark.stats.stats.median
        info["median_s"] = median_s
        info["tflops"] = flops / median_s / 1e12 if median_s > 0 else None
        info["gbps"] = nbytes / median_s / 1e9 if median_s > 0 else None
