"""Composition: the time of every op call of a plan, from a run's measured cases, summed into modules,
a layer and a model step.

Each call's time has a source:
  measured      a case of the same (op, shape, dtype, pass) was timed;
  interpolated  cases of the same op, dtype, pass and backend that differ from the call in one shape
                field (a sweep of tokens or context length) bracket it: linear interpolation;
  modeled       a roofline t = max(flops / F, bytes / B) whose F and B are fitted to the run's
                measured cases of the same op family; for collectives, the alpha-beta model of a
                measured sweep (a collectives run's fits) or else of a named fabric profile.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opbench.measure.cases import case_dtype
from opbench.analyze.alphabeta import AlphaBeta, get_profile, predict
from opbench.ops.dtypes import get_dtype
from opbench.ops import FAMILIES, get_family
from opbench.ops.base import shape_dict
from opbench.ops.collective import UNEVEN, is_collective
from opbench.record import OpCase
from opbench.spec.plan import Plan

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
    """A plan needs an op that the run measured in no form."""


def shape_key(shape) -> tuple[tuple[str, int], ...]:
    """A hashable, order-free form of a shape record or a shape dict."""
    items = shape.items() if isinstance(shape, dict) else shape_dict(shape).items()
    return tuple(sorted((k, int(v)) for k, v in items))


def _energy_j(m: OpCase) -> float | None:
    return m.energy.j_per_call if m.energy else None


# Backend policies: which backends a composition may pick from.
POLICIES: dict[str, Callable[[str], bool]] = {
    "fastest": lambda backend: True,
    # torch's eager ops (torch, torch-fused, torch-foreach, sdpa-*): what reference_layer calls
    "eager": lambda backend: backend.startswith(("torch", "sdpa")),
    "vendor": lambda backend: not backend.startswith("triton"),
    "triton": lambda backend: backend.startswith("triton"),
}


def backend_filter(policy: str) -> Callable[[str], bool]:
    """A named policy, or the name of one backend."""
    return POLICIES.get(policy, lambda backend: backend == policy)


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
        return cls(plan, tuple(CallTime(c["role"], c["op"], c["pass"], c["count"], c["scope"], c["time_s"], c["source"],
                                        c["backend"], c.get("energy_j"),
                                        *((c["layers"], c["kind"]) if "layers" in c else
                                          where.get((c["role"], c["op"], c["pass"]), (1, ""))))
                                for c in d["calls"]), d.get("mode", "graph"))


def run_breakdowns(section: dict) -> list[Breakdown]:
    """The breakdowns a run composed (its opbench section), read back with their plans."""
    plans = {p.name: p for p in map(Plan.from_dict, section.get("plans") or ())}
    return [Breakdown.from_dict(b, plans[b["plan"]]) for b in section.get("breakdowns") or () if b["plan"] in plans]


class Composer:
    """Looks up, interpolates or models the time of op calls from one run's measurements."""

    def __init__(self, measurements: Iterable[OpCase], policy: str = "fastest",
                 fits: Iterable[AlphaBeta] = (), fabric: str = "h100-nvlink-ring", mode: str = "graph"):
        """fits: alpha-beta fits of a collectives run, used before the fabric profile. mode: the execution
        mode composed, "graph" (CUDA graphs: a call costs its device time) or "eager" (a call costs at
        least its host launch time, the record's host_s)."""
        if mode not in EXECUTION_MODES:
            raise ValueError(f"unknown execution mode {mode!r} (known: {', '.join(EXECUTION_MODES)})")
        self.policy, self.mode = policy, mode
        self.fits = {f.op: f for f in fits}
        self.fabric = get_profile(fabric)
        allowed = backend_filter(policy)
        self.measurements = [m for m in measurements if m.kind == "op" and m.timed and allowed(m.backend)]
        self._exact: dict[tuple, OpCase] = {}
        for m in self.measurements:
            key = (m.op, shape_key(m.shape), m.dtype, m.pass_)
            if key not in self._exact or m.median_s < self._exact[key].median_s:
                self._exact[key] = m
        self._fits: dict[tuple, tuple[float, float]] = {}

    def time(self, op: str, shape, dtype: str, pass_: str, role: str = "") -> tuple[float, str, str | None, float | None]:
        """(seconds per call, source, backend, joules per call) for one call."""
        dtype = case_dtype(op, dtype)
        key = shape_key(shape)
        exact = self._exact.get((op, key, dtype, pass_))
        if exact is not None:
            return self._call_s(exact), "measured", exact.backend, _energy_j(exact)
        interpolated = self._interpolate(op, key, dtype, pass_)
        if interpolated is not None:
            return interpolated + (None,)
        if is_collective(op):
            family = get_family(op)
            shape = family.shape_type(**dict(key))
            size = family.bytes(shape, get_dtype(dtype), pass_)  # the nccl-tests buffer S
            return self.collective_s(op, size, shape.world), "modeled", _name(self._collective_model(op)), None
        return self._model(op, key, dtype, pass_, role), "modeled", None, None

    def _call_s(self, m: OpCase) -> float:
        """A measured call's time in the composed execution mode."""
        if self.mode == "eager" and m.host_s is not None:
            return max(m.median_s, m.host_s)
        return m.median_s

    def collective_s(self, op: str, size_bytes: int, world: int) -> float:
        """One collective call by the alpha-beta model: a measured fit of the op, else the fabric profile."""
        return predict(op, size_bytes, world, self._collective_model(op))

    def _collective_model(self, op: str):
        """The op's own fit; for the uneven all-to-all, where its fit has no bandwidth (the plans' few
        sizes), the even all-to-all's sweep if it has one; else the fabric profile."""
        own = self.fits.get(op)
        if own is not None and (own.busbw_gbps is not None or op not in UNEVEN):
            return own
        stand_in = self.fits.get(UNEVEN.get(op, ""))
        if stand_in is not None and stand_in.busbw_gbps is not None:
            return AlphaBeta(op, stand_in.alpha_s, stand_in.busbw_gbps, stand_in.world,
                             f"{stand_in.source} ({stand_in.op} standing in)")
        return self.fabric

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
            raise MissingMeasurement(f"the run has no measurement of op '{op}'{f' (role {role})' if role else ''}")
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

    def compose(self, plan: Plan) -> Breakdown:
        calls = []
        for c in plan.calls:
            try:
                t, source, backend, energy = self.time(c.op, c.shape, plan.workload.dtype, c.pass_, c.role)
            except MissingMeasurement as missing:
                w = plan.workload
                how = (f"measure it with: pytest bench/ --model {plan.model.name} --workload {w.label} "
                       f"--dtype {w.dtype} -k {c.op}" if c.op in FAMILIES else "no bench module measures this op yet")
                raise MissingMeasurement(f"{missing}; {how}") from None
            calls.append(CallTime(c.role, c.op, c.pass_, c.count, c.scope, t, source, backend, energy, c.layers, c.kind))
        return Breakdown(plan, tuple(calls), self.mode)


def _name(model) -> str:
    return model.source if isinstance(model, AlphaBeta) else f"profile {model.name}"


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
