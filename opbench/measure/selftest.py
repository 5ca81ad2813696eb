"""`opbench selftest`: does the suite measure the truth on this machine? The first thing to run on a new card.

Five checks, each ending in a verdict (PASS, WARN, FAIL, or NEEDS GPU where it has nothing to check
on a CPU). Each check is a measurement that gathers figures and a pure verdict function that judges
them, so the judgement of the GPU checks is tested on a CPU with figures handed in.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from opbench.measure.hardware import (cpu_count, energy_meter, energy_unavailable, gpu_info, gpu_watch,
                                      software_versions, torch_gpu_name)
from opbench.measure.peaks import Datasheet, datasheet_for
from opbench.measure.timing import RunSettings, Samples, copies_for, l2_bytes, measure
from opbench.text import format_seconds

PASS, WARN, FAIL, NEEDS_GPU = "PASS", "WARN", "FAIL", "NEEDS GPU"
VERDICTS = (PASS, WARN, FAIL, NEEDS_GPU)

CLOCK_TOL = 0.03  # the suite's clock and the profiler's kernel time agree within 3%...
CLOCK_FLOOR_S = 10e-6  # ...for kernels of 10 us and more (below, launch gaps are a visible share)
CLOCK_TARGETS_S = (12e-6, 100e-6, 1e-3, 10e-3)  # the smallest aims above the floor: sizing is within 10%
SIZING_TOL, SIZING_TRIES = 0.1, 5
SIZING_SPIN_CYCLES = 2_000_000  # ~1 ms at 2 GHz: time for the host to queue the sizing calls behind it
REPEAT_LIMIT = {"cuda": 0.01, "cpu": 0.05}  # run-to-run CV of a case's median that passes
REPEAT_FAIL_CUDA = 0.025  # half compare's 5% threshold: above it a run's own noise reads as a change
REPEAT_PASSES = 3
PEAK_SHARE = {"matmul": 0.60, "copy": 0.70}  # measured / datasheet below which a card is suspect
FLUSH_SLACK = 0.9  # flush is at least as cold as rotate: it may read a little faster, not 10%


@dataclass(frozen=True)
class Verdict:
    verdict: str  # one of VERDICTS
    summary: str  # the line a person reads


@dataclass(frozen=True)
class Result:
    number: int
    name: str
    verdict: str
    summary: str
    figures: dict = field(default_factory=dict)
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class Env:
    """Where the checks run and how they talk while they do."""
    device: str  # "cuda" or "cpu"
    say: Callable[[str], None] = print
    budget_s: float = 0.3  # timing budget of each measurement

    def settings(self, l2: str = "warm") -> RunSettings:
        return RunSettings(device=self.device, budget_s=self.budget_s,
                           min_rounds=10 if self.device == "cuda" else 5, l2=l2)


def median_s(samples: Samples) -> float:
    return statistics.median(samples.per_call_s)


def no_gpu_reason() -> str:
    """Why the GPU checks cannot run here, in NVML's words where it has some."""
    info = gpu_info()
    if not info.get("available"):
        return f"no CUDA GPU ({info.get('reason')})"
    return f"torch {torch.__version__} was built without CUDA; NVML sees a GPU"


def needs_gpu() -> tuple[Verdict, dict]:
    reason = no_gpu_reason()
    return Verdict(NEEDS_GPU, reason), {"reason": reason}


# 1. The suite's clock against the profiler's kernel times ------------------------------------------------

def clock_verdict(rows: Sequence[dict], tol: float = CLOCK_TOL, floor_s: float = CLOCK_FLOOR_S) -> Verdict:
    """rows: {"kernel", "clock_s", "kineto_s"}. Kernels the profiler times at floor_s or more are
    judged; the worst relative difference decides."""
    judged = [r for r in rows if r["kineto_s"] >= floor_s]
    if not judged:
        return Verdict(WARN, f"no kernel of {format_seconds(floor_s)} or more to judge")
    worst = max(judged, key=lambda r: abs(r["clock_s"] / r["kineto_s"] - 1))
    diff = worst["clock_s"] / worst["kineto_s"] - 1
    detail = ", ".join(f"{format_seconds(r['kineto_s'])} {r['clock_s'] / r['kineto_s'] - 1:+.1%}" for r in rows)
    if abs(diff) > tol:
        return Verdict(FAIL, f"{worst['kernel']}: the clock reads {diff:+.1%} against the profiler "
                             f"(limit {tol:.0%}); all: {detail}")
    return Verdict(PASS, f"within {tol:.0%} of the profiler on {len(judged)} kernels; {detail}")


def profiled_time_per_call(fn: Callable[[], Any], calls: int, device: str, name: str | None = None) -> float:
    """Time per call of `fn` by the torch profiler (Kineto): the summed durations of the events the
    device ran, over the calls. On CUDA every device event is a kernel, copy or set, and they do not
    nest; on a CPU ops nest, so `name` picks one op."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()  # device events end only once the kernels have run
    durations = device_event_durations_s(prof.events(), device, name)
    if not durations:
        raise RuntimeError(f"the profiler recorded no {device} event" + (f" named {name}" if name else ""))
    return sum(durations) / calls


# Kineto's activity types of the work a device does: the GPU's kernels, copies and sets (not CUPTI's own
# overhead records, which a CUDA trace also holds), the CPU's ops
DEVICE_WORK = {"cuda": ("kernel", "gpu_memcpy", "gpu_memset"), "cpu": ("cpu_op",)}


def device_event_durations_s(events, device: str, name: str | None = None) -> list[float]:
    """Durations (s) of the work the profiler's events show `device` doing, the events named `name` if given."""
    return [e.time_range.elapsed_us() * 1e-6 for e in events
            if _is_work(e, device) and (name is None or e.name == name)]


def _is_work(event, device: str) -> bool:
    kind = getattr(event, "activity_type", None)
    if kind is not None:
        return kind in DEVICE_WORK[device]
    from torch.autograd import DeviceType  # a torch whose events carry no activity type: their device

    return event.device_type == (DeviceType.CUDA if device == "cuda" else DeviceType.CPU)


def _event_time_s(fn: Callable[[], Any], calls: int = 10) -> float:
    """Device time per call of eager calls, for sizing kernels: the GPU spins while the host queues
    them, so a short kernel is not timed at the host's launch rate."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(SIZING_SPIN_CYCLES)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / calls


def _scale(n: int) -> Callable[[], Any]:
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    return lambda: torch.mul(x, 2.0, out=y)


def _matmul(n: int) -> Callable[[], Any]:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return lambda: torch.matmul(a, b)


def sized(make: Callable[[int], Callable], target_s: float, n: int, power: float, step: int,
          limits: tuple[int, int]) -> tuple[Callable, int, float]:
    """A call from make(n) whose time is near target_s: n rescaled by (target / time) ** power a few
    times (time goes as n ** (1 / power)), rounded to `step`. Returns (call, n, its time)."""
    for attempt in range(SIZING_TRIES):
        fn = make(n)
        t = _event_time_s(fn)
        rescaled = min(max(round(n * (target_s / t) ** power / step) * step, limits[0]), limits[1])
        if abs(t / target_s - 1) < SIZING_TOL or rescaled == n or attempt == SIZING_TRIES - 1:
            return fn, n, t
        del fn  # its buffers go before the next size's are made
        n = rescaled
    raise AssertionError("unreachable")


def _clock_kernels(env: Env) -> list[tuple[str, Callable]]:
    """Elementwise kernels at the short targets, matmuls at the long ones, sized on this card."""
    kernels = []
    for target in CLOCK_TARGETS_S:
        if target < 1e-3:
            fn, n, t = sized(_scale, target, 2**22, 1.0, 2**16, (2**16, 2**31))
            label = f"mul bf16 {n} elements"
        else:
            fn, n, t = sized(_matmul, target, 4096, 1 / 3, 256, (256, 32768))
            label = f"matmul bf16 {n}x{n}x{n}"
        env.say(f"  sized {label} for ~{format_seconds(target)}: {format_seconds(t)}")
        kernels.append((label, fn))
    return kernels


def check_clock(env: Env) -> tuple[Verdict, dict]:
    if env.device != "cuda":
        return needs_gpu()
    rows = []
    for label, fn in _clock_kernels(env):
        clock = measure([fn], env.settings("warm"))
        calls = min(200, max(5, math.ceil(0.05 / median_s(clock))))
        kineto = profiled_time_per_call(fn, calls, "cuda")
        rows.append({"kernel": label, "clock_s": median_s(clock), "timer": clock.timer, "unroll": clock.unroll,
                     "kineto_s": kineto, "profiled_calls": calls, "diff": median_s(clock) / kineto - 1,
                     "gap_s": median_s(clock) - kineto})  # what the clock adds per call: launch gaps in the graph
        env.say(f"  {label}: clock {format_seconds(rows[-1]['clock_s'])} ({clock.timer} x{clock.unroll}), "
                f"profiler {format_seconds(kineto)}")
    return clock_verdict(rows), {"kernels": rows, "tol": CLOCK_TOL, "floor_s": CLOCK_FLOOR_S}


# 2. L2 modes on a decode GEMM ---------------------------------------------------------------------------

def l2_verdict(warm_s: float, rotate_s: float, flush_s: float, nbytes: int, roof_gbps: float | None) -> Verdict:
    """Cold modes (rotate, flush) must read no faster than HBM; warm may, from the L2."""
    gbps = {mode: nbytes / t / 1e9 for mode, t in (("warm", warm_s), ("rotate", rotate_s), ("flush", flush_s))}
    figures = ", ".join(f"{m} {format_seconds(t)} ({gbps[m]:.0f} GB/s)"
                        for m, t in (("warm", warm_s), ("rotate", rotate_s), ("flush", flush_s)))
    roof = f"HBM roof {roof_gbps:.0f} GB/s" if roof_gbps else "no datasheet roof"
    if roof_gbps and gbps["rotate"] > roof_gbps:
        return Verdict(FAIL, f"rotate reads {gbps['rotate']:.0f} GB/s, above the {roof}: the rotation leaves "
                             f"the weights in the L2; {figures}")
    if roof_gbps and gbps["flush"] > roof_gbps:
        return Verdict(FAIL, f"flush reads {gbps['flush']:.0f} GB/s, above the {roof}: the flush does not "
                             f"evict; {figures}")
    if not warm_s < rotate_s:
        return Verdict(WARN, f"warm is not faster than rotate: the L2 serves nothing warm; {figures}")
    if flush_s < FLUSH_SLACK * rotate_s:
        return Verdict(WARN, f"flush is {1 - flush_s / rotate_s:.0%} faster than rotate: one of the cold modes "
                             f"is not cold; {figures}")
    if roof_gbps and gbps["warm"] > roof_gbps:
        return Verdict(WARN, f"warm reads above the {roof} (the L2 serves it: expected, and why decode GEMMs "
                             f"are timed cold); {figures}")
    if not roof_gbps:
        return Verdict(WARN, f"modes in order, {roof} to check them against; {figures}")
    return Verdict(PASS, f"warm < rotate <= flush, cold modes under the {roof}; {figures}")


def _decode_gemm():
    """The Llama-3-8B decode o-projection, from the plan the suite measures."""
    from opbench.spec.models import get_model
    from opbench.spec.plan import plan
    from opbench.spec.workload import parse_workload

    p = plan(get_model("llama-3-8b"), parse_workload("decode:b=1,s=2048", "bf16"))
    return next(c.shape for c in p.calls if c.role == "attn.o")


def case_calls(op: str, shape, dtype: str, backend: str, device: str, l2: str) -> tuple[list[Callable], int]:
    """A case's calls as the runner builds them: one per input copy the L2 mode cycles through; and the
    bytes of one call."""
    from opbench.measure.runner import cache_bytes
    from opbench.ops import get_family
    from opbench.ops.dtypes import get_dtype

    family, dt = get_family(op), get_dtype(dtype)
    nbytes = family.bytes(shape, dt, "fwd")
    prepare = family.backends[backend].prepare
    with dt.math_mode():
        calls = [prepare(family.inputs(shape, dt, "fwd", device), dt, "fwd")
                 for _ in range(copies_for(nbytes, cache_bytes(device), l2))]
    return calls, nbytes


def check_l2(env: Env) -> tuple[Verdict, dict]:
    if env.device != "cuda":
        return needs_gpu()
    shape = _decode_gemm()
    times = {}
    for mode in ("warm", "rotate", "flush"):
        calls, nbytes = case_calls("gemm", shape, "bf16", "torch", "cuda", mode)
        samples = measure(calls, env.settings(mode), footprint_bytes=nbytes)
        times[mode] = median_s(samples)
        env.say(f"  {mode}: {format_seconds(times[mode])} over {len(calls)} input copies ({samples.timer})")
        del calls
    sheet = datasheet_for(torch_gpu_name())
    roof = sheet.memory_gbps if sheet else None
    figures = {"shape": asdict(shape), "dtype": "bf16", "bytes": nbytes, "l2_bytes": l2_bytes(),
               "datasheet": sheet.name if sheet else None, "roof_gbps": roof,
               **{f"{m}_s": t for m, t in times.items()}, **{f"{m}_gbps": nbytes / t / 1e9 for m, t in times.items()}}
    return l2_verdict(times["warm"], times["rotate"], times["flush"], nbytes, roof), figures


# 3. Repeatability ------------------------------------------------------------------------------------------

def repeat_verdict(cvs: dict[str, float], device: str, busy: bool = False) -> Verdict:
    """cvs: case -> run-to-run CV of its median over the passes; busy: HostWatch flagged the host. On a
    CPU noise is the host's, never a failure of the suite: it warns. A busy host warns even when the
    medians repeat, since what repeats may be the other processes' share of the cores."""
    limit = REPEAT_LIMIT[device]
    worst = max(cvs, key=cvs.get)
    detail = ", ".join(f"{case} {cv:.2%}" for case, cv in cvs.items())
    host = " (the host was busy)" if busy else ""
    if cvs[worst] <= limit and busy and device == "cpu":
        return Verdict(WARN, f"medians repeat within {limit:.0%}, but the host was busy (HostWatch): the "
                             f"figures carry other processes' load: {detail}")
    if cvs[worst] <= limit:
        return Verdict(PASS, f"medians repeat within {limit:.0%}{host}: {detail}")
    if device == "cuda" and cvs[worst] > REPEAT_FAIL_CUDA:
        return Verdict(FAIL, f"{worst} varies {cvs[worst]:.1%} run to run (limit {limit:.0%}, fails above "
                             f"{REPEAT_FAIL_CUDA:.1%}){host}: {detail}")
    return Verdict(WARN, f"{worst} varies {cvs[worst]:.1%} run to run (limit {limit:.0%}){host}: {detail}")


# (model, workload, dtype) and the roles whose cases repeat: small shapes on a CPU, real ones on a GPU
REPEAT_PLAN = {"cpu": ("tiny", "decode:b=4,s=200", "fp32"), "cuda": ("llama-3-8b", "decode:b=32,s=2048", "bf16")}
REPEAT_ROLES = (("mlp.gate_up", "torch"), ("norm.input", "torch"), ("attn.core", None))
ATTENTION_BACKENDS = ("sdpa-flash", "sdpa-efficient", "sdpa-math")  # the first this machine runs


def _repeat_cases(device: str) -> list[tuple[str, Any, str, str]]:
    """(op, shape, dtype, backend) of each repeated case."""
    from opbench.ops import get_family
    from opbench.ops.dtypes import get_dtype
    from opbench.spec.models import get_model
    from opbench.spec.plan import plan
    from opbench.spec.workload import parse_workload

    model, workload, dtype = REPEAT_PLAN[device]
    calls = {c.role: c for c in plan(get_model(model), parse_workload(workload, dtype)).calls}
    cases = []
    for role, backend in REPEAT_ROLES:
        call = calls[role]
        family = get_family(call.op)
        if backend is None:
            backend = next((b for b in ATTENTION_BACKENDS
                            if not family.backends[b].requires(call.shape, get_dtype(dtype), device)), None)
            if backend is None:
                raise RuntimeError(f"none of {', '.join(ATTENTION_BACKENDS)} runs {call.shape} here")
        cases.append((call.op, call.shape, dtype, backend))
    return cases


def check_repeat(env: Env) -> tuple[Verdict, dict]:
    from opbench.ops import get_family

    l2 = "rotate" if env.device == "cuda" else "warm"  # the suite's default on each device
    cases = [(f"{op} {get_family(op).id_of(shape)} {dtype} {backend}",
              case_calls(op, shape, dtype, backend, env.device, l2))
             for op, shape, dtype, backend in _repeat_cases(env.device)]
    medians: dict[str, list[float]] = {label: [] for label, _ in cases}
    loads = []
    for n in range(REPEAT_PASSES):  # passes go round the cases, so each pass meets the others' leftovers
        for label, (calls, nbytes) in cases:
            samples = measure(calls, env.settings(l2), footprint_bytes=nbytes)
            medians[label].append(median_s(samples))
            loads += [samples.host] if samples.host else []
        env.say(f"  pass {n + 1}/{REPEAT_PASSES}: " + ", ".join(f"{label.split()[0]} {format_seconds(m[-1])}"
                                                                for label, m in medians.items()))
    cvs = {label: statistics.stdev(m) / statistics.fmean(m) for label, m in medians.items()}
    busy = any(load.busy for load in loads)
    figures = {"l2": l2, "passes": REPEAT_PASSES, "limit_cv": REPEAT_LIMIT[env.device], "host_busy": busy,
               "host_load_per_core": max((load.load_per_core for load in loads), default=None),
               "host_steal": max((load.steal for load in loads), default=None),
               "cases": [{"case": label, "medians_s": medians[label], "cv": cvs[label]} for label in medians]}
    return repeat_verdict(cvs, env.device, busy), figures


# 4. Measured peaks against the datasheet ---------------------------------------------------------------

PEAK_MATMUL = {"cuda": ((4096, 8192), ("bf16",)), "cpu": ((512,), ("fp32", "bf16"))}  # sizes, dtypes


def peaks_verdict(device: str, matmul_tflops: dict[str, float], copy_gbps: float, sheet: Datasheet | None,
                  device_name: str | None = None) -> Verdict:
    """Shares of the datasheet on a GPU; on a CPU the figures alone (no datasheet to hold them to)."""
    figures = ", ".join([f"matmul {d} {t:.3g} TFLOP/s" for d, t in matmul_tflops.items()]
                        + [f"copy {copy_gbps:.4g} GB/s"])
    if device != "cuda":
        return Verdict(PASS, f"CPU {figures}; no datasheet for a CPU")
    if sheet is None:
        return Verdict(WARN, f"{figures}; no datasheet for {device_name} to hold them to")
    shares = {f"matmul {d}": (t / sheet.matmul_tflops[d], PEAK_SHARE["matmul"])
              for d, t in matmul_tflops.items() if d in sheet.matmul_tflops}
    shares["copy"] = (copy_gbps / sheet.memory_gbps, PEAK_SHARE["copy"])
    detail = ", ".join(f"{k} {s:.0%}" for k, (s, _) in shares.items())
    low = [f"{k} {s:.0%} < {lim:.0%}" for k, (s, lim) in shares.items() if s < lim]
    if low:
        return Verdict(WARN, f"below the expected share of the {sheet.name} datasheet: {', '.join(low)}; {figures}")
    return Verdict(PASS, f"of the {sheet.name} datasheet: {detail}; {figures}")


def _peak(env: Env, case) -> Samples:
    from opbench.measure.peak_cases import prepare
    from opbench.ops.dtypes import get_dtype

    dtype = get_dtype(case.dtype)
    with dtype.math_mode():
        fn = prepare(case, env.device)[0]
        return measure([fn], env.settings("warm"))  # a ceiling is the best the card does: warm


def check_peaks(env: Env) -> tuple[Verdict, dict]:
    from opbench.measure.peak_cases import PeakCase, SizeShape, copy_size, work
    from opbench.ops.gemm import GemmShape

    sizes, dtypes = PEAK_MATMUL[env.device]
    matmul: dict[str, float] = {}
    for dtype in dtypes:
        for n in sizes:
            case = PeakCase("matmul", dtype, GemmShape(n, n, n))
            tflops = work(case)[0] / median_s(_peak(env, case)) / 1e12
            env.say(f"  matmul {dtype} {n}^3: {tflops:.3g} TFLOP/s")
            matmul[dtype] = max(matmul.get(dtype, 0.0), tflops)
    case = PeakCase("copy", "fp32", SizeShape(copy_size(env.device)))
    copy_gbps = work(case)[1] / median_s(_peak(env, case)) / 1e9
    env.say(f"  copy {case.shape.size_bytes // 2**20} MiB: {copy_gbps:.4g} GB/s")
    name = torch_gpu_name()
    sheet = datasheet_for(name) if env.device == "cuda" else None
    figures = {"matmul_tflops": matmul, "copy_gbps": copy_gbps, "copy_bytes": case.shape.size_bytes,
               "datasheet": asdict(sheet) if sheet else None, "min_share": PEAK_SHARE}
    if sheet:
        figures["share"] = {**{f"matmul_{d}": t / sheet.matmul_tflops[d] for d, t in matmul.items()
                               if d in sheet.matmul_tflops}, "copy": copy_gbps / sheet.memory_gbps}
    return peaks_verdict(env.device, matmul, copy_gbps, sheet, name), figures


# 5. NVML telemetry -----------------------------------------------------------------------------------------

def nvml_verdict(info: dict, energy_reason: str | None, state: dict | None) -> Verdict:
    """info: gpu_info(); energy_reason: why the energy counter cannot be read (None: it can); state: the
    GpuState (as a dict) gpu_watch gave around some work, None if it gave none."""
    if not info.get("available"):
        return Verdict(FAIL, f"NVML is not available ({info.get('reason')}): no clocks, power, throttling or "
                             "energy in the records")
    if not state or not state.get("samples"):
        return Verdict(FAIL, "NVML cannot read the GPU torch runs on: no clock or throttling record")
    missing = [what for what, ok in (
        ("SM clock", state.get("sm_clock_mhz") is not None),
        ("power", state.get("power_w") is not None),
        ("power violation counter", state.get("power_violation_s") is not None),
        ("thermal violation counter", state.get("thermal_violation_s") is not None),
        (f"energy counter ({energy_reason})", energy_reason is None)) if not ok]
    seen = (f"{state['samples']} samples, SM {state['sm_clock_mhz'] or 0:.0f} MHz, {state['power_w'] or 0:.0f} W, "
            f"{state.get('temperature_c')} C, slowdowns {list(state.get('throttled') or []) or 'none'}")
    if missing:
        return Verdict(WARN, f"NVML does not give: {', '.join(missing)}; {seen}")
    return Verdict(PASS, f"clocks, power, violation and energy counters readable; {seen}")


def check_nvml(env: Env) -> tuple[Verdict, dict]:
    if env.device != "cuda":
        return needs_gpu()
    info = gpu_info()
    fn = _matmul(4096)
    meter = energy_meter()
    start_j = meter() if meter else None
    with gpu_watch() as watch:
        stop = time.perf_counter() + 0.3  # long enough for dozens of samples
        while time.perf_counter() < stop:
            fn()
            torch.cuda.synchronize()
    state = asdict(watch.state) if watch.state else None
    figures = {"gpu_info": info, "energy_reason": energy_unavailable(), "state": state,
               "energy_j": meter() - start_j if meter else None}
    env.say(f"  NVML: {len(info.get('devices', []))} GPUs, {state['samples'] if state else 0} samples")
    return nvml_verdict(info, energy_unavailable(), state), figures


# The command ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    number: int
    name: str
    about: str  # for --help
    run: Callable[[Env], tuple[Verdict, dict]]


CHECKS = (
    Check(1, "clock vs profiler",
          "the suite's clock (CUDA-graph replays between events) against the torch profiler's (Kineto) kernel "
          f"times, on kernels sized for ~10 us to ~10 ms: FAIL beyond {CLOCK_TOL:.0%} for kernels of "
          f"{format_seconds(CLOCK_FLOOR_S)} and more", check_clock),
    Check(2, "L2 modes",
          "warm, rotate and flush on the Llama-3-8B decode o-projection (1x4096x4096 bf16): warm < rotate <= flush; "
          "FAIL when a cold mode reads above the datasheet's HBM bandwidth, WARN when warm does (the L2 serves it)",
          check_l2),
    Check(3, "repeatability",
          f"a GEMM, an RMSNorm and a decode attention measured in {REPEAT_PASSES} passes: the run-to-run CV of each "
          f"median; PASS within {REPEAT_LIMIT['cuda']:.0%} on a GPU (FAIL above {REPEAT_FAIL_CUDA:.1%}), within "
          f"{REPEAT_LIMIT['cpu']:.0%} on a CPU (WARN above: CPUs are noisy, a busy host is flagged)", check_repeat),
    Check(4, "measured peaks",
          f"dense matmul and device copy against the datasheet: WARN below {PEAK_SHARE['matmul']:.0%} (matmul) or "
          f"{PEAK_SHARE['copy']:.0%} (copy); on a CPU the figures alone", check_peaks),
    Check(5, "NVML telemetry",
          "NVML present, clocks, power and violation counters sampled around work, energy counter readable: the "
          "GPU state and energy the records carry", check_nvml),
)


def run_check(check: Check, env: Env) -> Result:
    """One check; one that breaks fails with its error, and the others still run."""
    env.say(f"[{check.number}/{len(CHECKS)}] {check.name} ...")
    start = time.perf_counter()
    try:
        verdict, figures = check.run(env)
    except Exception as error:  # noqa: BLE001 - a broken measurement is the selftest's finding
        verdict, figures = Verdict(FAIL, f"the check broke: {type(error).__name__}: {error}"), {}
    finally:
        if env.device == "cuda":
            torch.cuda.empty_cache()
    result = Result(check.number, check.name, verdict.verdict, verdict.summary, figures, time.perf_counter() - start)
    env.say(f"{result.verdict:<9} {check.number} {check.name}: {result.summary}")
    return result


def machine(device: str) -> dict:
    return {"device": device, "gpu": torch_gpu_name(), "cpu_cores": cpu_count(), "host": platform.node(),
            "software": software_versions()}


def run(numbers: Sequence[int] | None = None, env: Env | None = None) -> tuple[list[Result], dict]:
    env = env or Env("cuda" if torch.cuda.is_available() else "cpu")
    env.say(f"opbench selftest on {torch_gpu_name() or 'a CPU (no CUDA GPU)'}, torch {torch.__version__}, "
            f"{cpu_count()} CPU cores")
    start = time.perf_counter()
    results = [run_check(c, env) for c in CHECKS if not numbers or c.number in numbers]
    return results, {"machine": machine(env.device), "elapsed_s": time.perf_counter() - start}


def exit_code(results: Sequence[Result]) -> int:
    """1 if any check failed; NEEDS GPU is not a failure."""
    return 1 if any(r.verdict == FAIL for r in results) else 0


def summary_line(results: Sequence[Result], elapsed_s: float) -> str:
    counts = {v: [r.number for r in results if r.verdict == v] for v in VERDICTS}
    gpu = counts[NEEDS_GPU]
    return (f"selftest: {len(counts[PASS])} passed, {len(counts[WARN])} warned, {len(counts[FAIL])} failed"
            + (f", checks {', '.join(map(str, gpu))} need a GPU" if gpu else "")
            + f" ({elapsed_s:.1f} s); exit {exit_code(results)}")


def to_json(results: Sequence[Result], context: dict) -> dict:
    return {"opbench_selftest": 1, **context, "exit": exit_code(results), "checks": [asdict(r) for r in results]}


def add_command(sub) -> None:
    p = sub.add_parser("selftest", help="check that the suite measures the truth on this machine (run it first "
                                        "on a new card); exit 1 when a check fails",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Checks, each ending PASS, WARN, FAIL or NEEDS GPU (a GPU check on a CPU; not a "
                                   "failure):\n\n" + "\n".join(f"  {c.number}. {c.name}: {c.about}" for c in CHECKS)
                                   + "\n\nExit 0 when no check fails, 1 otherwise. On a CPU checks 3 and 4 run "
                                     "(seconds); on a GPU all five (a few minutes).")
    p.add_argument("-o", "--json", metavar="FILE", help="write every check's verdict and figures as JSON")
    p.add_argument("--check", type=int, action="append", choices=[c.number for c in CHECKS], metavar="N",
                   help="run only check N (repeatable)")
    p.set_defaults(func=_command)


def _command(args) -> int:
    results, context = run(args.check, Env("cuda" if torch.cuda.is_available() else "cpu",
                                           say=lambda line: print(line, flush=True)))
    print(summary_line(results, context["elapsed_s"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(results, context), f, indent=1, default=str)
            f.write("\n")
    return exit_code(results)
