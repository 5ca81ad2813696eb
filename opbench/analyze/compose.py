"""Composition: the time of every op call of a plan, from a run's measured cases, summed into modules,
a layer and a model step.

Each call's time has a source:
  measured      a case of the same (op, shape, dtype, pass) was timed;
  interpolated  cases of the same op, dtype, pass and backend that differ from the call in one shape
                field (a sweep of tokens or context length) bracket it: linear interpolation;
  modeled       a roofline t = max(flops / F, bytes / B) whose F and B are fitted to the run's
                measured cases of the same op family; for collectives, the alpha-beta model of a
                measured sweep (a collectives run's fit of the call's dtype, else of another dtype,
                labelled so) or else of a named fabric profile.
A collective is measured when a collectives run timed its very size, dtype and world.

With `fused`, a plan's fusions (opbench.spec.plan.Fusion) whose fused calls were all measured replace
the calls they fuse, and the breakdown names them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opbench.measure.cases import case_dtype
from opbench.measure.selection import measure_command
from opbench.analyze.alphabeta import AlphaBeta, Fit, get_profile, predict
from opbench.ops.backends import GROUPS, describe_patterns, unknown_patterns
from opbench.ops.backends import backend_filter as patterns_filter
from opbench.ops.dtypes import get_dtype
from opbench.ops import FAMILIES, get_family
from opbench.ops.base import shape_dict
from opbench.ops.collective import UNEVEN, is_collective
from opbench.record import OpCase
from opbench.spec.plan import OpCall, Plan

SOURCES = ("measured", "interpolated", "modeled")
EXECUTION_MODES = ("graph", "eager")  # CUDA graphs (device time) or eager launches (at least host_s per call)

# Module of a call, by the first part of its role (LoRA adapters count with the layer they adapt).
# Two-part prefixes are looked up before the first part alone: MoE routing and permutation ("moe.route.*")
# form a module of their own beside the experts' GEMMs.
MODULE_ORDER = ("attention", "mlp", "moe routing", "norms+residuals", "communication", "embedding+head", "optimizer",
                "other")
MODULES = {"attn": "attention", "mlp": "mlp", "moe": "mlp", "moe.route": "moe routing", "norm": "norms+residuals",
           "residual": "norms+residuals", "tp": "communication", "dp": "communication", "ep": "communication",
           "embed": "embedding+head", "lm_head": "embedding+head", "loss": "embedding+head", "optim": "optimizer"}


class MissingMeasurement(LookupError):
    """A plan needs ops that the run measured in no form."""

    def __init__(self, message: str, ops: tuple[str, ...] = ()):
        super().__init__(message)
        self.ops = ops  # the families missing


class PolicyError(ValueError):
    """A backend policy that names no group and matches no backend."""


def shape_key(shape) -> tuple[tuple[str, int], ...]:
    """A hashable, order-free form of a shape record or a shape dict."""
    items = shape.items() if isinstance(shape, dict) else shape_dict(shape).items()
    return tuple(sorted((k, int(v)) for k, v in items))


def _energy_j(m: OpCase) -> float | None:
    return m.energy.j_per_call if m.energy else None


# Backend policies: which backends a composition may pick from (the fastest of those wins each call):
# all, one of the groups that selection knows too, or any backend pattern (a name, a glob).
POLICIES: dict[str, Callable[[str], bool]] = {"fastest": lambda backend: True, **GROUPS}


def backend_filter(policy: str) -> Callable[[str], bool]:
    """A named policy, or a backend pattern (opbench.ops.backends)."""
    if policy not in POLICIES and unknown_patterns([policy]):
        raise PolicyError(f"unknown policy {policy!r}: a policy is {', '.join(POLICIES)}, or a backend pattern: "
                          f"{describe_patterns()}")
    return POLICIES.get(policy) or patterns_filter([policy])


@dataclass(frozen=True)
class CallTime:
    role: str
    op: str
    pass_: str
    count: int
    scope: str  # layer | model
    time_s: float  # one call
    source: str  # measured | interpolated | modeled
    backend: str | None
    energy_j: float | None = None  # one call
    layers: int = 1  # the layers the call repeats in (scope "model": 1)
    kind: str = ""  # its kind of layer ("" for scope "model")

    @property
    def module(self) -> str:
        parts = self.role.split(".")[1:] if self.role.startswith("lora.") else self.role.split(".")
        return MODULES.get(".".join(parts[:2]), MODULES.get(parts[0], "other"))

    @property
    def step_s(self) -> float:
        """The call's time over one model step: count x layers x one call."""
        return self.count * self.time_s * self.layers


@dataclass(frozen=True)
class Breakdown:
    plan: Plan
    calls: tuple[CallTime, ...]
    mode: str = "graph"  # the execution mode composed: graph (device times) or eager (host launch floor)
    fused: tuple[str, ...] = ()  # the fusions applied (Fusion.label): which calls a fused kernel replaced

    def kinds(self) -> dict[str, tuple[int, float]]:
        """Each kind of layer: (its layers, the time of one such layer)."""
        out: dict[str, tuple[int, float]] = {}
        for c in self.calls:
            if c.scope == "layer":
                layers, s = out.get(c.kind, (c.layers, 0.0))
                out[c.kind] = (layers, s + c.count * c.time_s)
        return out

    @property
    def layer_s(self) -> float:
        """One decoder layer; the mean over the layers where their kinds differ."""
        kinds = self.kinds()
        if len(kinds) == 1:
            return next(iter(kinds.values()))[1]
        return sum(n * s for n, s in kinds.values()) / self.plan.model.layers if kinds else 0.0

    @property
    def total_s(self) -> float:
        """One model step: every layer of every kind plus the model-scope calls."""
        return (sum(n * s for n, s in self.kinds().values())
                + sum(c.count * c.time_s for c in self.calls if c.scope == "model"))

    @property
    def energy_j(self) -> float | None:
        if any(c.energy_j is None for c in self.calls):
            return None
        return sum(c.count * c.energy_j * c.layers for c in self.calls)

    def modules_s(self) -> dict[str, float]:
        """Time per module over one model step."""
        out: dict[str, float] = defaultdict(float)
        for c in self.calls:
            out[c.module] += c.step_s
        return dict(out)

    @property
    def not_measured(self) -> int:
        return sum(1 for c in self.calls if c.source != "measured")

    def sources(self) -> dict[str, int]:
        counts = dict.fromkeys(SOURCES, 0)
        for c in self.calls:
            counts[c.source] += 1
        return counts

    def to_dict(self) -> dict:
        total = self.total_s
        return {
            "plan": self.plan.name,
            "mode": self.mode,
            "layer_s": self.layer_s,
            "kinds": {k: {"layers": n, "time_s": s} for k, (n, s) in self.kinds().items()},
            "total_s": total,
            "energy_j": self.energy_j,
            "modules": {m: {"time_s": t, "share": t / total if total else 0.0} for m, t in self.modules_s().items()},
            "sources": self.sources(),
            "fused": list(self.fused),
            "calls": [{"role": c.role, "op": c.op, "pass": c.pass_, "count": c.count, "scope": c.scope,
                       "time_s": c.time_s, "source": c.source, "backend": c.backend, "energy_j": c.energy_j,
                       "layers": c.layers, "kind": c.kind}
                      for c in self.calls],
        }

    @classmethod
    def from_dict(cls, d: dict, plan: Plan) -> Breakdown:
        """A breakdown as the JSON's opbench.breakdowns holds it, for its plan."""
        # the plan's calls give the layers and kinds of breakdowns written before layer kinds
        where = {(p.role, p.op, p.pass_): (p.layers, p.kind) for p in plan.calls}
        calls = tuple(CallTime(c["role"], c["op"], c["pass"], c["count"], c["scope"], c["time_s"], c["source"],
                               c["backend"], c.get("energy_j"),
                               *((c["layers"], c["kind"]) if "layers" in c else
                                 where.get((c["role"], c["op"], c["pass"]), (1, ""))))
                      for c in d["calls"])
        return cls(plan, calls, d.get("mode", "graph"), tuple(d.get("fused", ())))


def run_breakdowns(section: dict) -> list[Breakdown]:
    """The breakdowns a run composed (its opbench section), read back with their plans."""
    plans = {p.name: p for p in map(Plan.from_dict, section.get("plans") or ())}
    return [Breakdown.from_dict(b, plans[b["plan"]]) for b in section.get("breakdowns") or () if b["plan"] in plans]


class Composer:
    """Looks up, interpolates or models the time of op calls from one run's measurements."""

    def __init__(self, measurements: Iterable[OpCase], policy: str = "fastest",
                 fits: Iterable[Fit] = (), fabric: str = "h100-nvlink-ring", mode: str = "graph",
                 fused: bool = False):
        """measurements: op cases (of the policy's backends) and collective cases (a collectives run's).
        fits: alpha-beta fits of a collectives run, used before the fabric profile. mode: the execution
        mode composed, "graph" (CUDA graphs: a call costs its device time) or "eager" (a call costs at
        least its host launch time, the record's host_s). fused: apply the plans' fusions whose fused
        calls were measured."""
        if mode not in EXECUTION_MODES:
            raise ValueError(f"unknown execution mode {mode!r} (known: {', '.join(EXECUTION_MODES)})")
        self.mode = mode
        # A graph fit (NCCL alone) stands in only where no fit of calls launched one by one exists:
        # those include the dispatch a framework pays per collective.
        fits = sorted(fits, key=lambda f: getattr(f, "graph", False))
        allowed = backend_filter(policy)
        self.policy, self.fused = policy, fused
        self.fits: dict[tuple[str, str], Fit] = {}
        for f in fits:
            self.fits.setdefault((f.op, getattr(f, "dtype", "")), f)  # a bare AlphaBeta stands for every dtype
        self.fabric = get_profile(fabric)
        measurements = [m for m in measurements if m.timed]
        self.measurements = [m for m in measurements if m.kind == "op" and allowed(m.backend)]
        self._exact: dict[tuple, OpCase] = {}
        for m in self.measurements + [m for m in measurements if m.kind == "collective"]:
            key = (m.op, shape_key(m.shape), m.dtype, m.pass_)
            if key not in self._exact or m.median_s < self._exact[key].median_s:
                self._exact[key] = m
        self._fits: dict[tuple, tuple[float, float]] = {}

    def time(self, op: str, shape, dtype: str, pass_: str, role: str = "",
             weights: str = "") -> tuple[float, str, str | None, float | None]:
        """(seconds per call, source, backend, joules per call) for one call of a workload of `dtype`
        and weight format `weights`."""
        dtype = case_dtype(op, dtype, weights)
        key = shape_key(shape)
        exact = self._exact.get((op, key, dtype, pass_))
        if exact is not None:
            return self._call_s(exact), "measured", exact.backend, _energy_j(exact)
        if is_collective(op):
            family = get_family(op)
            shape = family.shape_type(**dict(key))
            size = family.bytes(shape, get_dtype(dtype), pass_)  # the nccl-tests buffer S
            return self.collective(op, size, shape.world, dtype) + (None,)
        interpolated = self._interpolate(op, key, dtype, pass_)
        if interpolated is not None:
            return interpolated + (None,)
        return self._model(op, key, dtype, pass_, role), "modeled", None, None

    def _call_s(self, m: OpCase) -> float:
        """A measured call's time in the composed execution mode."""
        if self.mode == "eager" and m.host_s is not None:
            return max(m.median_s, m.host_s)
        return m.median_s

    def collective(self, op: str, size_bytes: int, world: int, dtype: str) -> tuple[float, str, str]:
        """(seconds, "modeled", what modeled it) for one collective call: the alpha-beta fit of the op
        and dtype, else the op's fit of another dtype (labelled so); for the uneven all-to-all, whose
        own fit has no bandwidth (the plans' few sizes), the even all-to-all's; else the fabric profile."""
        fit, label = self._fit_of(op, dtype)
        if op in UNEVEN and (fit is None or fit.busbw_gbps is None):
            stand_in, stand_label = self._fit_of(UNEVEN[op], dtype)
            if stand_in is not None and stand_in.busbw_gbps is not None:
                fit = AlphaBeta(op, stand_in.alpha_s, stand_in.busbw_gbps, stand_in.world, stand_in.source)
                label = f"{stand_label} ({stand_in.op} standing in)"
        if fit is None or (fit.busbw_gbps is None and world != fit.world):  # a latency alone cannot scale
            fit, label = self.fabric, f"profile {self.fabric.name}"
        return predict(op, size_bytes, world, fit), "modeled", label

    def _fit_of(self, op: str, dtype: str) -> tuple[Fit | None, str]:
        fit = self.fits.get((op, dtype))
        if fit is not None:
            return fit, fit.source
        fit = next((f for (o, _), f in self.fits.items() if o == op), None)
        if fit is None or not getattr(fit, "dtype", ""):
            return fit, fit.source if fit else ""
        return fit, f"{fit.source}; its {fit.dtype} fit stands for {dtype}"

    def collective_s(self, op: str, size_bytes: int, world: int, dtype: str = "bf16") -> float:
        """One collective call by the alpha-beta model (gradients are reduced in bf16 unless told)."""
        return self.collective(op, size_bytes, world, dtype)[0]

    def _interpolate(self, op, key, dtype, pass_) -> tuple[float, str, str] | None:
        target = dict(key)
        best = None
        for backend in {m.backend for m in self.measurements if m.op == op}:
            sweeps: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for m in self.measurements:
                if (m.op, m.dtype, m.pass_, m.backend) != (op, dtype, pass_, backend):
                    continue
                fields = m.shape
                if fields.keys() != target.keys():
                    continue
                differ = [k for k in target if fields[k] != target[k]]
                if len(differ) == 1:
                    sweeps[differ[0]].append((fields[differ[0]], self._call_s(m)))
            for name, points in sweeps.items():
                t = _interpolate_linear(sorted(points), target[name])
                if t is not None and (best is None or t < best[0]):
                    best = (t, "interpolated", backend)
        return best

    def _model(self, op, key, dtype, pass_, role) -> float:
        fit = self._fit(op, dtype) or self._fit(op, None)
        if fit is None:
            raise MissingMeasurement(f"the run has no measurement of op '{op}'{f' (role {role})' if role else ''}",
                                     ops=(op,))
        family = get_family(op)
        shape = family.shape_type(**dict(key))
        flops, nbytes = family.flops(shape, pass_), family.bytes(shape, get_dtype(dtype), pass_)
        peak_flops, peak_bytes = fit
        return max(flops / peak_flops if peak_flops else 0.0, nbytes / peak_bytes if peak_bytes else 0.0)

    def _fit(self, op: str, dtype: str | None) -> tuple[float, float] | None:
        key = (op, dtype)
        if key not in self._fits:
            # the fastest backend of each measured case, as composition itself picks
            cases = [m for m in self._exact.values() if m.op == op and (dtype is None or m.dtype == dtype)]
            self._fits[key] = fit_roofline([(m.flops, m.bytes, m.median_s) for m in cases]) if cases else None
        return self._fits[key]

    def measured(self, call: OpCall, dtype: str, weights: str = "") -> bool:
        """Whether the call's very case was measured (not interpolated, not modeled)."""
        return (call.op, shape_key(call.shape), case_dtype(call.op, dtype, weights), call.pass_) in self._exact

    def compose(self, plan: Plan) -> Breakdown:
        fusions = ()
        if self.fused:
            fusions = tuple(f for f in plan.fusions if all(self.measured(c, plan.workload.dtype, plan.workload.weights)
                                                         for c in f.calls))
            plan = plan.fuse(fusions)
        calls, missing = [], {}
        for c in plan.calls:
            try:
                t, source, backend, energy = self.time(c.op, c.shape, plan.workload.dtype, c.pass_, c.role,
                                                           plan.workload.weights)
            except MissingMeasurement:
                missing.setdefault(c.op, []).append(c.role)
                continue
            calls.append(CallTime(c.role, c.op, c.pass_, c.count, c.scope, t, source, backend, energy, c.layers,
                                  c.kind))
        if missing:
            what = "; ".join(f"{op} ({', '.join(dict.fromkeys(roles))})" for op, roles in missing.items())
            unmeasurable = [op for op in missing if op not in FAMILIES]
            raise MissingMeasurement(f"the run has no measurement of {what}; measure "
                                     f"{'it' if len(missing) == 1 else 'them'} with: "
                                     f"{measure_command([plan], list(missing))}"
                                     + (f" (no bench module measures {', '.join(unmeasurable)} yet)"
                                        if unmeasurable else ""), tuple(missing))
        return Breakdown(plan, tuple(calls), self.mode, tuple(f.label for f in fusions))


def _interpolate_linear(points: list[tuple[int, float]], x: int) -> float | None:
    """Linear interpolation between the two measured points that bracket x; None outside the sweep."""
    for (x0, t0), (x1, t1) in zip(points, points[1:]):
        if x0 <= x <= x1 and x1 > x0:
            return t0 + (t1 - t0) * (x - x0) / (x1 - x0)
    return None


def fit_roofline(cases: list[tuple[int, int, float]]) -> tuple[float, float]:
    """F (FLOP/s) and B (B/s) of t = max(flops / F, bytes / B) that best fit (flops, bytes, seconds)
    in log error. Candidates are the achieved rates of the cases themselves: the fitted ceilings are
    rates the run reached, never a datasheet's."""
    flop_rates = _spread(sorted({f / t for f, _, t in cases if f > 0 and t > 0})) or [0.0]
    byte_rates = _spread(sorted({b / t for _, b, t in cases if b > 0 and t > 0})) or [0.0]

    def error(peak_f: float, peak_b: float) -> float:
        total = 0.0
        for f, b, t in cases:
            model = max(f / peak_f if peak_f else 0.0, b / peak_b if peak_b else 0.0)
            total += math.log(model / t) ** 2 if model > 0 and t > 0 else math.inf
        return total

    return min(((f, b) for f in flop_rates for b in byte_rates), key=lambda fb: error(*fb))


def _spread(values: list[float], most: int = 32) -> list[float]:
    """At most `most` values spread evenly over a sorted list, its ends included."""
    if len(values) <= most:
        return values
    return [values[round(i * (len(values) - 1) / (most - 1))] for i in range(most)]
