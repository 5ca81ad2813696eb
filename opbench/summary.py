"""The end-of-run table: one row per timed case, its median and rates, the fastest backend starred."""

from __future__ import annotations

from opbench.cases import Case
from opbench.ops import get_family


def format_seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.4g} {unit}"
    return f"{s / 1e-9:.4g} ns"


def summary_lines(timed: list[tuple[Case, dict]], device: str) -> list[str]:
    best: dict[tuple, float] = {}
    for case, info in timed:
        best[case.key] = min(best.get(case.key, float("inf")), info["median_s"])
    rows = [("op", "shape", "dtype", "pass", "backend", "median", "TFLOP/s", "GB/s", "timer", "serves")]
    for case, info in sorted(timed, key=lambda t: (t[0].op, t[0].pass_, t[0].dtype)):
        star = "*" if info["median_s"] <= best[case.key] else ""
        roles = info["roles"]
        rows.append((case.op, get_family(case.op).id_of(case.shape), case.dtype, case.pass_, case.backend + star,
                     format_seconds(info["median_s"]), f"{info['tflops']:.3g}", f"{info['gbps']:.4g}",
                     f"{info['timer']}x{info['unroll']}",
                     roles[0] + (f" (+{len(roles) - 1})" if len(roles) > 1 else "") if roles else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"medians per call on {device}; * fastest backend for that shape, dtype and pass; "
             "timer x calls per timed replay (cuda-graph) or round (cpu)"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return lines
