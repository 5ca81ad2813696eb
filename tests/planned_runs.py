"""Runs made from plans: every call a plan may ask a time of (its fused kernels' included) as a timed
record of opbench.record, written in pytest-benchmark's schema, so that the commands read them as
they read a real run."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from opbench.analyze.alphabeta import Fit
from opbench.measure.cases import case_dtype
from opbench.ops import get_family
from opbench.ops.base import shape_dict
from opbench.ops.collective import COLLECTIVES, CollectiveShape, busbw_factor
from opbench.ops.dtypes import get_dtype
from opbench.record import CollectiveCase, OpCase, Record, UnitCase
from opbench.spec.plan import OpCall, Plan

CPU_MACHINE = {"machine": "x86_64", "system": "Linux", "cpu": {"brand_raw": "AMD EPYC"},
               "gpu": {"available": False}, "software": {"torch": "2.13.0"}}


def op_records(plans: Iterable[Plan], seconds: Callable[[OpCall], float] = lambda call: 1e-5,
               backend: str = "torch", leave_out: Iterable[str] = ()) -> list[OpCase]:
    """One timed case per distinct (op, shape, dtype, pass) of the plans, collectives and the ops in
    `leave_out` left out, each taking seconds(call)."""
    leave_out = set(leave_out) | set(COLLECTIVES)
    cases: dict[tuple, OpCase] = {}
    for p in plans:
        for c in p.all_calls:
            dtype = case_dtype(c.op, p.workload.dtype, p.workload.weights)
            key = (c.op, c.shape, dtype, c.pass_)
            if c.op in leave_out or key in cases:
                continue
            family = get_family(c.op)
            cases[key] = OpCase(op=c.op, backend=backend, dtype=dtype, pass_=c.pass_, shape=shape_dict(c.shape),
                                flops=family.flops(c.shape, c.pass_),
                                bytes=family.bytes(c.shape, get_dtype(dtype), c.pass_),
                                timer="cpu", median_s=seconds(c))
    return list(cases.values())


def collective_record(op: str, size_bytes: int, world: int, dtype: str, median_s: float) -> CollectiveCase:
    return CollectiveCase(op=op, backend="gloo", dtype=dtype, shape=shape_dict(CollectiveShape(size_bytes, world)),
                          bytes=size_bytes, world=world, busbw_factor=busbw_factor(op, world), timer="cpu",
                          median_s=median_s)


def fit_of(op: str, dtype: str, alpha_s: float, busbw_gbps: float, world: int = 2) -> Fit:
    return Fit(op=op, alpha_s=alpha_s, busbw_gbps=busbw_gbps, world=world,
               source=f"measured: gloo {dtype}, world of {world}", dtype=dtype, backend="gloo", points=6)


def write_run(path: Path, records: Iterable[Record], *, device: str = "cpu", plans: Iterable[Plan] = (),
              machine_info: dict | None = None, **section) -> Path:
    """A run file of these records, its opbench section holding the device, the plans and `section`."""
    benchmarks = []
    for i, r in enumerate(records):
        name = f"test_{r.kind}[{i}]"
        median = r.median_s
        benchmarks.append({"name": name, "fullname": f"bench/test_x.py::{name}", "param": str(i), "group": None,
                           "params": {}, "extra_info": r.to_info(), "options": {},
                           "stats": {"min": median, "max": median, "median": median, "mean": median, "q1": median,
                                     "q3": median, "rounds": 5, "stddev": 0.0, "iqr": 0.0}})
    data = {"machine_info": machine_info or CPU_MACHINE, "commit_info": {}, "benchmarks": benchmarks,
            "datetime": "2026-01-01T00:00:00", "version": "5.3.1",
            "opbench": {"device": device, "profile": "smoke", "plans": [p.to_dict() for p in plans], **section}}
    path.write_text(json.dumps(data))
    return path


def unit_record(plan: Plan, unit: str, median_s: float) -> UnitCase:
    return UnitCase(unit=unit, plan=plan.name, dtype=plan.workload.dtype, timer="cpu", median_s=median_s)
