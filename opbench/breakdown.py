"""The module-wise breakdown a report draws: time per model step by module, for each plan of a run.

Each plan call costs count x the median of the fastest backend measured for its (op, shape, dtype,
pass), times the model's layers for per-layer calls; calls are grouped by the prefix of their role.
Calls with no measurement in the run are counted, not guessed. Where the run's opbench section
holds composed "breakdowns" (a list of {"plan": NAME, "modules": {MODULE: seconds | {"time_s": s}}}),
those are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from opbench.ops import get_family
from opbench.runs import Run
from opbench.workload import Workload

# module -> role prefixes, in the order the bars stack
GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("attn.",),
    "MLP": ("mlp.", "moe."),
    "norms": ("norm.",),
    "residual": ("residual.",),
    "communication": ("tp.",),
    "embedding / LM head / loss": ("embed", "lm_head", "loss"),
    "LoRA adapters": ("lora.",),
    "optimizer": ("optim.",),
}
OTHER = "other"


def group_of(role: str) -> str:
    return next((g for g, prefixes in GROUPS.items() if role.startswith(prefixes)), OTHER)


@dataclass(frozen=True)
class Breakdown:
    plan: str  # model/workload/dtype
    modules_s: dict[str, float]  # module -> seconds per model step
    calls: int  # distinct plan calls
    unmeasured_calls: int  # of them, without a measurement in the run

    @property
    def total_s(self) -> float:
        return sum(self.modules_s.values())


def _fastest(run: Run) -> dict[tuple, float]:
    """(op, shape items, dtype, pass) -> the smallest median over backends."""
    best: dict[tuple, float] = {}
    for m in run.measurements:
        key = (m.op, tuple(sorted(m.shape.items())), m.dtype, m.pass_)
        best[key] = min(best.get(key, float("inf")), m.median_s)
    return best


def _case_dtype(op: str, workload_dtype: str) -> str | None:
    try:
        return get_family(op).case_dtype(workload_dtype)
    except KeyError:  # a family this installation does not measure: its cases carry the workload's dtype
        return workload_dtype


def _from_plan(plan: dict, fastest: dict[tuple, float]) -> Breakdown:
    workload, model = Workload(**plan["workload"]), plan["model"]
    modules: dict[str, float] = {}
    unmeasured = 0
    for call in plan["calls"]:
        key = (call["op"], tuple(sorted(call["shape"].items())), _case_dtype(call["op"], workload.dtype), call["pass"])
        if key not in fastest:
            unmeasured += 1
            continue
        repeats = model["layers"] if call["scope"] == "layer" else 1
        group = group_of(call["role"])
        modules[group] = modules.get(group, 0.0) + fastest[key] * call["count"] * repeats
    return Breakdown(f"{model['name']}/{workload.label}/{workload.dtype}", modules, len(plan["calls"]), unmeasured)


def _from_section(entry: dict) -> Breakdown:
    modules = {name: v["time_s"] if isinstance(v, dict) else v for name, v in entry["modules"].items()}
    return Breakdown(entry.get("plan") or entry.get("name", "?"), modules, len(modules), 0)


def breakdowns(run: Run) -> list[Breakdown]:
    if run.section.get("breakdowns"):
        return [_from_section(entry) for entry in run.section["breakdowns"]]
    fastest = _fastest(run)
    return [_from_plan(plan, fastest) for plan in run.section.get("plans", [])]
