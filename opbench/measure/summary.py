"""The end-of-run table: one row per timed case, its median and rates, the fastest backend starred."""

from __future__ import annotations

from opbench.measure.cases import Case
from opbench.ops import get_family
from opbench.ops.base import PASSES
from opbench.text import format_seconds, roles_cell, table_lines


def summary_lines(timed: list[tuple[Case, dict]], device: str) -> list[str]:
    best: dict[tuple, float] = {}
    for case, info in timed:
        best[case.key] = min(best.get(case.key, float("inf")), info["median_s"])
    rows = [("op", "shape", "dtype", "pass", "backend", "median", "TFLOP/s", "GB/s", "timer", "serves")]
    for case, info in sorted(timed, key=lambda t: (t[0].op, PASSES.index(t[0].pass_), t[0].dtype)):
        star = "*" if info["median_s"] <= best[case.key] else ""
        rows.append((case.op, get_family(case.op).id_of(case.shape), case.dtype, case.pass_, case.backend + star,
                     format_seconds(info["median_s"]), f"{info['tflops']:.3g}", f"{info['gbps']:.4g}",
                     f"{info['timer']}x{info['unroll']}", roles_cell(info["roles"])))
    return [f"medians per call on {device}; * fastest backend for that shape, dtype and pass; "
            "timer x calls per timed replay (cuda-graph) or round (cpu)", *table_lines(rows)]


_WHAT = {"prefill": "time to first token", "decode": "per output token", "train": "step", "finetune": "step"}


def composition_lines(result: dict) -> list[str]:
    """Per plan: the model step, its modules (time and share), the end-to-end figures; then the
    composed-versus-measured check of the units."""
    lines = []
    for b, e in zip(result["breakdowns"], result["estimates"]):
        src = ", ".join(f"{n} {k}" for k, n in b["sources"].items() if n)
        phase = b["plan"].split("/")[1].split(":")[0]
        lines.append(f"{b['plan']}: {_WHAT[phase]} {format_seconds(b['total_s'])} "
                     f"(layer {format_seconds(b['layer_s'])}; calls: {src})")
        modules = sorted(b["modules"].items(), key=lambda kv: -kv[1]["time_s"])
        lines.append("  " + " | ".join(f"{m} {format_seconds(v['time_s'])} {100 * v['share']:.1f}%"
                                       for m, v in modules))
        figures = [f"{e['tokens_per_s_per_gpu']:.4g} tokens/s per GPU",
                   f"{e['gpu_s_per_1k_tokens']:.3g} GPU-s per 1k tokens",
                   f"memory {e['memory']['weights_bytes'] / 2**30:.3g} GiB weights + "
                   f"{(e['memory']['kv_cache_bytes'] + e['memory']['activations_bytes']) / 2**30:.3g} GiB cache/activations"]
        if e["mfu"] is not None:
            figures.append(f"MFU {100 * e['mfu']:.1f}%")
        lines.append("  " + "; ".join(figures))
    for m in result["missing"]:
        lines.append(f"not composed: {m['plan']}{' ' + m['unit'] if 'unit' in m else ''}: {m['reason']}")
    if result["validation"]:
        lines.append("composed vs measured (units run torch's eager ops; no all-reduce, no optimizer step):")
        for v in result["validation"]:
            lines.append(f"  {v['plan']} {v['unit']}: measured {format_seconds(v['measured_s'])}, "
                         f"composed {format_seconds(v['composed_s'])}, error {v['error_pct']:+.1f}%")
    return lines
