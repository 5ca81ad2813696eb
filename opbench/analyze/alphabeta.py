"""The alpha-beta model of a collective, fitted to a measured sweep or taken from a fabric profile.

    t(S, n) = alpha + f(op, n) x S / beta

S is the nccl-tests buffer size, f the busbw factor (opbench.ops.collective.busbw_factor) and beta the
bus bandwidth: the busbw nccl-tests reports at large sizes, where t is linear in S (nccl-tests'
doc/PERFORMANCE.md: "roughly equal to overhead + size / bw"). Written against the bus bandwidth, beta
does not depend on the number of ranks for ring algorithms, so a fit or a profile can be asked about
another world size; alpha is the latency of the world it was measured or quoted for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from opbench.ops.collective import COLLECTIVES, UNEVEN, busbw_factor


@dataclass(frozen=True)
class AlphaBeta:
    op: str
    alpha_s: float  # latency of one call
    busbw_gbps: float | None  # beta; None where the sweep shows no size dependence (a world of one)
    world: int  # the world it was measured or quoted for
    source: str  # "measured: ..." or "profile NAME"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Fit(AlphaBeta):
    """A least-squares fit to one op's measured sweep, with its residual."""
    dtype: str = ""
    backend: str = ""
    points: int = 0
    min_bytes: int = 0
    max_bytes: int = 0
    max_rel_residual: float = 0.0  # the worst |model - measured| / measured over the points
    graph: bool = False  # fitted to CUDA-graph replays: NCCL's latency without the dispatch of a call


def predict(op: str, size_bytes: int, world: int, model: AlphaBeta | FabricProfile) -> float:
    """Seconds for one call of `op` on a buffer of size_bytes among `world` ranks."""
    ab = model.alpha_beta(op) if isinstance(model, FabricProfile) else model
    if ab.op != op:
        raise ValueError(f"a model of {ab.op} cannot predict {op}")
    factor = busbw_factor(op, world)
    if factor == 0 or size_bytes == 0:
        return ab.alpha_s
    if ab.busbw_gbps is None:
        raise ValueError(f"{ab.source}: no bandwidth was measured for {op} (world of {ab.world}), "
                         f"so it cannot predict a world of {world}")
    return ab.alpha_s + factor * size_bytes / (ab.busbw_gbps * 1e9)


def fit(op: str, points: Iterable[tuple[int, float]], world: int, dtype: str, backend: str,
        graph: bool = False) -> Fit:
    """alpha and beta from (size_bytes, time_s) points of one op at one world size.

    Least squares on relative residuals ((model - t) / t), so that small messages, whose times are
    microseconds, weigh as much as large ones and set alpha while large ones set beta. alpha is kept
    at or above zero, and beta positive; where the times do not grow with size, beta is None.
    """
    pts = sorted((int(s), float(t)) for s, t in points)
    if not pts or any(t <= 0 for _, t in pts):
        raise ValueError(f"{op}: a fit needs positive times, got {pts}")
    factor = busbw_factor(op, world)
    xs = [factor * s for s, _ in pts]  # bus bytes
    ts = [t for _, t in pts]
    ws = [1 / t**2 for t in ts]
    sw = sum(ws)
    swx = sum(w * x for w, x in zip(ws, xs))
    swxx = sum(w * x * x for w, x in zip(ws, xs))
    swt = sum(w * t for w, t in zip(ws, ts))
    swxt = sum(w * x * t for w, x, t in zip(ws, xs, ts))
    det = sw * swxx - swx * swx
    alpha, slope = swt / sw, 0.0  # no size dependence: alpha alone
    if det > 1e-12 * sw * swxx:  # at least two distinct sizes with a nonzero factor
        alpha, slope = (swxx * swt - swx * swxt) / det, (sw * swxt - swx * swt) / det
        if alpha < 0:  # latency below zero means the line misses the small sizes: pin it at zero
            alpha, slope = 0.0, swxt / swxx
        if slope <= 0:
            alpha, slope = swt / sw, 0.0
    worst = max(abs(alpha + slope * x - t) / t for x, t in zip(xs, ts))
    return Fit(op=op, alpha_s=alpha, busbw_gbps=1 / slope / 1e9 if slope > 0 else None, world=world,
               source=f"measured: {backend} {dtype}{', CUDA graph' if graph else ''}, world of {world}",
               dtype=dtype, backend=backend, points=len(pts), min_bytes=pts[0][0], max_bytes=pts[-1][0],
               max_rel_residual=worst, graph=graph)


@dataclass(frozen=True)
class FabricProfile:
    """Published figures for a fabric the machine at hand may not have."""
    name: str
    about: str
    world: int  # the world its figures describe
    alpha_s: float
    busbw_gbps: dict[str, float]  # per op

    def alpha_beta(self, op: str) -> AlphaBeta:
        """The profile's figures for op; an uneven all-to-all runs on the same links as the even one."""
        figure = op if op in self.busbw_gbps else UNEVEN.get(op)
        if figure not in self.busbw_gbps:
            raise KeyError(f"profile {self.name} has no figure for {op} (it has: {', '.join(self.busbw_gbps)})")
        return AlphaBeta(op, self.alpha_s, self.busbw_gbps[figure], self.world, f"profile {self.name}")


def _same_for_all(busbw: float, **overrides: float) -> dict[str, float]:
    return {op: overrides.get(op, busbw) for op in COLLECTIVES}


# Sources. Bus bandwidths: nccl-tests all_reduce_perf at large messages (hundreds of MiB and up) as
# NVIDIA and cloud providers publish them for their DGX/HGX systems: 8x H100 SXM on NVLink 4 / NVSwitch
# about 370 GB/s with the ring algorithm and about 480 GB/s with NVLink SHARP (NVLS: the NVSwitches
# reduce in the fabric; NCCL 2.17 and later, see its release notes); 8x A100 SXM on NVLink 3 about
# 232 GB/s; between
# nodes, one 400 Gb/s NDR InfiniBand NIC per GPU (ConnectX-7) carries about 46-48 GB/s of busbw,
# against 50 GB/s line rate. The other ops are given the ring all-reduce's bus bandwidth: a ring
# all-reduce is a reduce-scatter then an all-gather over the same links, and all-to-all on a switched
# fabric runs at about the same per-link rate; NVLS accelerates all-reduce only. Latencies: nccl-tests
# times for small messages (8 B to a few KiB), about 10 us within an NVLink node and 25-30 us across
# InfiniBand; they are orders of magnitude, which only matter for messages below about a MiB.
PROFILES: dict[str, FabricProfile] = {p.name: p for p in (
    FabricProfile("h100-nvlink-ring", "8x H100 SXM, NVLink 4 + NVSwitch, NCCL ring", 8, 10e-6, _same_for_all(370.0)),
    FabricProfile("h100-nvlink-nvls", "8x H100 SXM, NVLink 4 + NVSwitch, NCCL NVLink SHARP (all-reduce)", 8, 12e-6,
                  _same_for_all(370.0, allreduce=480.0)),
    FabricProfile("a100-nvlink", "8x A100 SXM, NVLink 3 + NVSwitch, NCCL ring", 8, 12e-6, _same_for_all(232.0)),
    FabricProfile("ib-ndr-400g", "nodes of 8 GPUs, one 400 Gb/s NDR InfiniBand NIC per GPU", 16, 30e-6,
                  _same_for_all(47.0)),
)}


def get_profile(name: str) -> FabricProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown fabric profile {name!r} (known: {', '.join(PROFILES)})") from None


def fit_all(results: Iterable[tuple]) -> list[Fit]:
    """One fit per (op, dtype, backend, world, graph) from (op, dtype, backend, world, size_bytes,
    time_s[, graph]) rows: CUDA-graph timings are fitted apart from calls launched one by one."""
    groups: dict[tuple[str, str, str, int, bool], list[tuple[int, float]]] = {}
    for op, dtype, backend, world, size, time_s, *graph in results:
        if time_s > 0 and math.isfinite(time_s):
            groups.setdefault((op, dtype, backend, world, bool(graph and graph[0])), []).append((size, time_s))
    return [fit(op, pts, world, dtype=dtype, backend=backend, graph=graph)
            for (op, dtype, backend, world, graph), pts in groups.items()]
