"""Collective cases: which messages a run measures, and how one case is measured on every rank at once.

Every rank runs the same cases in the same order with the same rounds and iterations, since a rank
that skips, fails or calibrates on its own leaves the others waiting in a collective it never issues:
skips and verdicts are agreed, the rounds come from the slowest rank's estimate, and the time of a
round is the slowest rank's.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace

import pytest
import torch

from opbench.analyze.alphabeta import Fit
from opbench.dist.world import World, first_line
from opbench.measure.cases import Case
from opbench.measure.gate import check
from opbench.measure.runner import finish, is_oom
from opbench.measure.selection import Selection
from opbench.measure.timing import (
    MAX_ROUNDS,
    RunSettings,
    Samples,
    calls_for,
    event_round,
    graph_replay,
    host_launch_s,
    measure_stream,
    spinner,
    torch_cuda,
)
from opbench.ops import get_family
from opbench.ops.base import shape_dict
from opbench.ops.collective import (
    COLLECTIVES,
    UNEVEN,
    AllToAllVShape,
    CollectiveShape,
    busbw_factor,
    message_bytes,
)
from opbench.ops.dtypes import get_dtype
from opbench.record import CollectiveCase, Gate
from opbench.spec.plan import Plan
from opbench.text import format_seconds, roles_cell, table_lines

SWEEP_MIN_BYTES = 2**10
GRADIENT_BUCKET_BYTES = 25 * 2**20  # torch DistributedDataParallel's default bucket_cap_mb
# Messages up to this size are also timed as CUDA-graph replays: below it a few microseconds of
# dispatch per call are a visible share of the collective (16 MiB all-reduce on 8 NVLink GPUs: ~100 us).
GRAPH_MAX_BYTES = 2**24
NCCL_GRAPH_MIN = (2, 9, 6)  # the first NCCL whose collectives a CUDA graph can capture (torch >= 1.10)


def sweep_sizes(max_bytes: int) -> list[int]:
    """1 KiB, 2 KiB, 4 KiB, ... up to max_bytes."""
    sizes, size = [], SWEEP_MIN_BYTES
    while size <= max_bytes:
        sizes.append(size)
        size *= 2
    return sizes


def plan_messages(plan: Plan, world: int) -> list[tuple[str, int, str]]:
    """(op, size_bytes, role) of the collectives a plan pays in a world of `world` ranks:
    - its tensor-parallel all-reduces, when its tensor-parallel degree is the world (the messages of
      other degrees run among other numbers of ranks; they come from the fit or a fabric profile);
    - in training without tensor parallelism, data parallelism over the whole world: DDP's all-reduce of
      one gradient bucket (25 MiB, or all the gradients when fewer), and ZeRO-3 / FSDP's reduce-scatter
      of one layer's gradients and all-gather of its parameters, in the workload's dtype.
    """
    w = plan.workload
    out = [(c.op, c.shape.size_bytes, c.role) for c in plan.calls
           if isinstance(c.shape, CollectiveShape) and c.shape.world == world]
    if w.training and w.tp == 1 and world > 1:
        grad_bytes = get_dtype(get_family("allreduce").case_dtype(w.dtype)).bytes  # fp8 training reduces bf16
        layer = max(c.shape.params for c in plan.calls if c.op == "adamw" and c.scope == "layer")  # the largest kind
        everything = sum(c.shape.params * c.layers for c in plan.calls if c.op == "adamw")
        out += [("allreduce", min(GRADIENT_BUCKET_BYTES, everything * grad_bytes), "dp.allreduce.bucket"),
                ("reducescatter", layer * grad_bytes, "zero.reducescatter.layer"),
                ("allgather", layer * grad_bytes, "zero.allgather.layer")]
    return out


def plan_uneven_messages(plan: Plan, world: int) -> list[tuple[AllToAllVShape, str]]:
    """(shape, role) of the expert-parallel dispatch and combine all-to-alls a plan pays among `world`
    ranks: its ep degree's, when that is the world."""
    return [(c.shape, c.role) for c in plan.calls if c.op in UNEVEN and c.shape.world == world]


def collective_cases(selection: Selection, world: int, backend: str) -> list[Case]:
    """The plans' messages at this world size plus the profile's sweep, per collective and dtype,
    ordered by op, dtype and size (every rank builds the same list)."""
    if selection.backends is not None and backend not in selection.backends:
        return []
    wanted: dict[tuple[str, str, int], list[str]] = {}
    for p in selection.plans:
        for op, size, role in plan_messages(p, world):
            dtype = get_family(op).case_dtype(p.workload.dtype)
            roles = wanted.setdefault((op, dtype, size), [])
            label = f"{p.model.name}/{p.workload.phase}/{role}"
            if label not in roles:
                roles.append(label)
    for op in COLLECTIVES:
        family = get_family(op)
        for dtype in dict.fromkeys(filter(None, map(family.case_dtype, selection.dtypes))):
            for size in sweep_sizes(selection.profile.collective_max_bytes):
                wanted.setdefault((op, dtype, size), [])
    cases: dict[tuple, Case] = {}
    for p in selection.plans:
        for shape, role in plan_uneven_messages(p, world):
            dtype = get_family("alltoallv").case_dtype(p.workload.dtype)
            label = f"{p.model.name}/{p.workload.phase}/{role}"
            known = cases[("alltoallv", dtype, shape)].roles if ("alltoallv", dtype, shape) in cases else ()
            cases[("alltoallv", dtype, shape)] = Case("alltoallv", shape, dtype, "fwd", backend,
                                                      known + ((label,) if label not in known else ()))
    for (op, dtype, size), roles in wanted.items():
        shape = CollectiveShape(message_bytes(op, size, world, get_dtype(dtype).bytes), world)
        if shape.size_bytes == 0:
            continue
        known = cases[(op, dtype, shape)].roles if (op, dtype, shape) in cases else ()  # sizes that round alike
        cases[(op, dtype, shape)] = Case(op, shape, dtype, "fwd", backend,
                                         known + tuple(r for r in roles if r not in known))
    order = {op: i for i, op in enumerate(COLLECTIVES + tuple(UNEVEN))}
    return sorted(cases.values(), key=lambda c: (order[c.op], c.dtype, get_family(c.op).bytes(
        c.shape, get_dtype(c.dtype), c.pass_), shape_dict(c.shape)))


def nccl_version() -> tuple[int, ...] | None:
    """The NCCL torch was built with, or None (a CPU build)."""
    try:
        return tuple(torch.cuda.nccl.version()) if torch.version.cuda else None
    except (AttributeError, RuntimeError):
        return None


def graph_unsupported(backend: str, size_bytes: int, nccl: tuple[int, ...] | None) -> str | None:
    """Why a collective case has no CUDA-graph twin, or None where it has one."""
    if backend != "nccl":
        return f"{backend} collectives cannot be captured in a CUDA graph"
    if nccl is None or tuple(nccl) < NCCL_GRAPH_MIN:
        return (f"NCCL {'.'.join(map(str, nccl)) if nccl else '(none)'} cannot be captured in a CUDA graph "
                f"(needs {'.'.join(map(str, NCCL_GRAPH_MIN))} or newer)")
    if size_bytes > GRAPH_MAX_BYTES:
        return f"{size_bytes} B is past {GRAPH_MAX_BYTES} B, where dispatch is a negligible share of the call"
    return None


@dataclass(frozen=True)
class CollectiveRun:
    """One timed collective: its case launched call by call, or (graph) its CUDA-graph twin."""
    case: Case
    graph: bool = False

    @property
    def id(self) -> str:
        return f"{self.case.op}-{self.case.id}" + ("-graph" if self.graph else "")


def collective_runs(cases: list[Case], backend: str, nccl: tuple[int, ...] | None) -> list[CollectiveRun]:
    """Every case launched call by call, as a framework issues it, dispatch included; followed, where
    NCCL can be captured and the message is small, by its CUDA-graph twin, which times NCCL alone.
    Their two alpha-beta fits put the collective's latency beside what dispatch adds to it."""
    runs = []
    for case in cases:
        runs.append(CollectiveRun(case))
        size = get_family(case.op).bytes(case.shape, get_dtype(case.dtype), case.pass_)  # the nccl-tests buffer
        if graph_unsupported(backend, size, nccl) is None:
            runs.append(CollectiveRun(case, graph=True))
    return runs


def run_collective_case(benchmark, case: Case, settings: RunSettings, world: World,
                        graph: bool = False) -> CollectiveCase:
    started = time.perf_counter()
    family = get_family(case.op)
    backend = family.backends[case.backend]
    dtype = get_dtype(case.dtype)
    shape = case.shape  # CollectiveShape, or AllToAllVShape for the uneven all-to-all
    record = CollectiveCase(op=case.op, backend=case.backend, dtype=case.dtype, pass_=case.pass_,
                            shape=shape_dict(shape), roles=tuple(case.roles),
                            bytes=family.bytes(shape, dtype, case.pass_), impl=backend.impl, world=world.size,
                            busbw_factor=busbw_factor(case.op, shape.world), graph=graph)
    with world.guard(f"{case.op} {family.id_of(shape)} {case.dtype}"):
        _skip_on_all_ranks(world, backend.requires(shape, dtype, settings.device))
        inputs, reason = None, None
        try:
            inputs = family.inputs(shape, dtype, case.pass_, settings.device)
        except Exception as error:
            if not is_oom(error):
                raise
            reason = f"out of memory: {first_line(error)}"
        _skip_on_all_ranks(world, reason)
        fn = backend.prepare(inputs, dtype, case.pass_)
        expected = family.reference(inputs, dtype, case.pass_)
        out = None
        try:  # backends refuse a dtype before sending anything (gloo: "Invalid scalar type")
            out = fn()
        except RuntimeError as error:
            reason = f"{case.backend} does not support {case.dtype} {case.op} here: {first_line(error)}"
        _skip_on_all_ranks(world, reason)
        verdict = _agreed_check(world, check(out, expected, dtype.tol))
        del out, expected
        record = replace(record, correct=verdict)
        if not verdict.passed:
            pytest.fail(f"wrong result on rank {verdict.worst_rank}: relative error {verdict.rel_err:.3g} > "
                        f"tolerance {dtype.tol:g}", pytrace=False)
        samples = _time(fn, settings, world, graph, started) if benchmark.enabled else None
    if samples is not None:
        mine, slowest = samples
        record = replace(record, rank_median_s=tuple(world.gather(statistics.median(mine.per_call_s))))
        samples = replace(mine, per_call_s=slowest)
    return finish(benchmark, record, samples, settings)


def _skip_on_all_ranks(world: World, reason: str | None) -> None:
    reason = world.agree(reason)
    if reason:
        pytest.skip(reason)


def _agreed_check(world: World, verdict: Gate) -> Gate:
    """The worst rank's verdict, on every rank, so that all fail together or none does."""
    err = verdict.rel_err if verdict.rel_err == verdict.rel_err else math.inf  # NaN: as wrong as can be
    worst_err, = world.max(err)
    worst_rank = int(world.max(world.rank if err >= worst_err else -1)[0])
    return Gate(worst_err, verdict.tol, verdict.worst_output, worst_rank)


def _time(fn, settings: RunSettings, world: World, graph: bool, started: float) -> tuple[Samples, list[float]]:
    """Fixed rounds and iterations, the same on every rank (from the slowest rank's estimate), each
    round after a barrier so that no rank's time includes waiting for another to arrive. Returns this
    rank's samples and, round by round, the slowest rank's."""
    on_gpu = world.device.type == "cuda"
    iterations, rounds = _calibrate(fn, settings, world, on_gpu)
    with measure_stream("cuda" if on_gpu else "cpu"):  # a side stream: the legacy one cannot be captured
        if graph:
            one_round, timer = _graph_round(fn, iterations, world), "cuda-graph"
        elif on_gpu:
            one_round, timer = event_round(lambda: _repeat(fn, iterations), iterations, world.barrier), "cuda-event"
        else:
            one_round, timer = _cpu_round(fn, iterations, world), "cpu"
        one_round()  # warm-up
        rounds_start = time.perf_counter()
        mine = [one_round() for _ in range(rounds)]
    slowest = world.max(*mine)  # round by round: every rank ran the same rounds in lockstep
    return (Samples(mine, timer, iterations, "warm", setup_s=rounds_start - started,
                    timing_s=time.perf_counter() - rounds_start), slowest)


def _repeat(fn, iterations: int) -> None:
    for _ in range(iterations):
        fn()


def _calibrate(fn, settings: RunSettings, world: World, on_gpu: bool) -> tuple[int, int]:
    """(iterations per round, rounds), from the slowest rank's time per call, agreed by every rank."""
    sync = torch_cuda().synchronize if on_gpu else (lambda: None)
    _repeat(fn, 2)
    sync()
    start = time.perf_counter()
    _repeat(fn, 3)
    sync()
    call_s, = world.max((time.perf_counter() - start) / 3)
    iterations = calls_for(call_s)
    rounds = max(settings.min_rounds, min(MAX_ROUNDS, int(settings.budget_s / max(call_s * iterations, 1e-9))))
    return iterations, int(world.max(rounds)[0])


def _cpu_round(fn, iterations: int, world: World):
    def one_round() -> float:
        world.barrier()
        t0 = time.perf_counter()
        _repeat(fn, iterations)
        return (time.perf_counter() - t0) / iterations
    return one_round


def _graph_round(fn, iterations: int, world: World):
    """The collective captured `iterations` times in one CUDA graph; a round is the barrier, a spin
    of the same length on every rank, then the replay between events: NCCL's time with no dispatch.
    A capture that fails on any rank skips the case on all. The capture is thread-local, so the
    process group's watchdog querying its events from another thread cannot break it."""
    launch, reason = None, None
    try:
        launch = graph_replay([fn], iterations, capture_error_mode="thread_local")
    except RuntimeError as error:
        reason = f"NCCL could not be captured in a CUDA graph here: {first_line(error)}"
    _skip_on_all_ranks(world, reason)
    spin = spinner(world.max(host_launch_s(launch))[0])  # the same spin everywhere keeps ranks together

    def before() -> None:
        world.barrier()
        spin()
    return event_round(launch, iterations, before)


def summary_lines(timed: list[CollectiveCase], fits: list[Fit], world: str) -> list[str]:
    """The end-of-run table of collectives (the slowest rank's medians), then the alpha-beta fits."""
    rows = [("op", "size", "dtype", "median", "algbw GB/s", "busbw GB/s", "rank spread", "serves")]
    for r in timed:
        spread = r.rank_spread
        family = get_family(r.op)
        rows.append((r.op + (" (graph)" if r.graph else ""), family.id_of(family.shape_type(**r.shape)), r.dtype,
                     format_seconds(r.median_s),
                     f"{r.algbw_gbps:.4g}", f"{r.busbw_gbps:.4g}", f"{spread:.1%}" if spread is not None else "-",
                     roles_cell(r.roles, none="sweep")))
    about = (f"{world}; medians per call of the slowest rank, bandwidths as nccl-tests defines them; "
             "(graph): CUDA-graph replays, NCCL's time without dispatch")
    lines = [about, *table_lines(rows)]
    lines.append("alpha-beta fits, t = alpha + busbw_factor x size / busbw:")
    for f in fits:
        busbw = f"busbw {f.busbw_gbps:.4g} GB/s" if f.busbw_gbps else "no bandwidth term"
        how = f"{f.backend} graph" if f.graph else f.backend
        lines.append(f"  {f.op} {f.dtype} {how} n={f.world}: alpha {format_seconds(f.alpha_s)}, {busbw}, "
                     f"{f.points} sizes {f.min_bytes}-{f.max_bytes} B, worst residual {f.max_rel_residual:.0%}")
    return lines
