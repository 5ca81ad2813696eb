"""What a run adds up to: every plan's breakdown and estimate, and composition checked against the
units (layer, whole model) that were timed as one."""

from __future__ import annotations

from collections.abc import Iterable

from opbench.compose import Composer, MissingMeasurement, measurement
from opbench.estimate import estimate_from
from opbench.validation import composed_s
from opbench.workload import Plan


def compose_session(plans: Iterable[Plan], infos: Iterable[dict], policy: str = "fastest") -> dict:
    """infos: the extra_info of every timed case (op cases and units)."""
    infos = list(infos)
    measured = [m for m in map(measurement, infos) if m is not None]
    composer, eager = Composer(measured, policy), Composer(measured, "eager")
    out: dict = {"policy": policy, "breakdowns": [], "estimates": [], "validation": [], "missing": []}
    by_name = {}
    for p in plans:
        try:
            breakdown = composer.compose(p)
        except MissingMeasurement as missing:
            out["missing"].append({"plan": p.name, "reason": str(missing)})
            continue
        by_name[p.name] = p
        out["breakdowns"].append(breakdown.to_dict())
        out["estimates"].append(estimate_from(breakdown).to_dict())
    for info in infos:
        if info.get("op") not in ("layer", "model") or info.get("median_s") is None or info["plan"] not in by_name:
            continue
        try:  # the unit runs torch's eager ops, so it is composed from those backends' cases
            composed = composed_s(eager.compose(by_name[info["plan"]]), info["op"])
        except MissingMeasurement as missing:
            out["missing"].append({"plan": info["plan"], "unit": info["op"], "reason": str(missing)})
            continue
        measured_s = info["median_s"]
        out["validation"].append({"plan": info["plan"], "unit": info["op"], "measured_s": measured_s,
                                  "composed_s": composed, "error_pct": 100 * (composed - measured_s) / measured_s})
    return out
