"""The end-of-run table: one row per timed case, its median and rates, the fastest backend starred."""

from __future__ import annotations

from opbench.record import OpCase
from opbench.ops import get_family
from opbench.ops.base import PASSES
from opbench.text import format_seconds, roles_cell, table_lines


def summary_lines(timed: list[OpCase], device: str) -> list[str]:
    best: dict[tuple, float] = {}
    for r in timed:
        key = r.key[:3] + r.key[4:]  # identity without the backend
        best[key] = min(best.get(key, float("inf")), r.median_s)
    rows = [("op", "shape", "dtype", "pass", "backend", "median", "TFLOP/s", "GB/s", "CI", "timer", "serves")]
    unstable = 0
    for r in sorted(timed, key=lambda r: (r.op, PASSES.index(r.pass_), r.dtype)):
        star = "*" if r.median_s <= best[r.key[:3] + r.key[4:]] else ""
        stable = r.stability.stable if r.stability else True
        unstable += not stable
        shape = get_family(r.op).id_of(get_family(r.op).shape_type(**r.shape))
        rows.append((r.op, shape, r.dtype, r.pass_, r.backend + star, format_seconds(r.median_s),
                     f"{r.tflops:.3g}", f"{r.gbps:.4g}", _ci_cell(r), f"{r.timer}x{r.unroll}", roles_cell(r.roles)))
    return [f"medians per call on {device}; * fastest backend for that shape, dtype and pass; CI: the median's "
            "95% confidence half-width, ! marks an unstable case; timer x calls per timed replay (cuda-graph) or "
            "round (cpu)", *table_lines(rows),
            f"{len(timed)} cases timed, {unstable} unstable" + (" (their medians moved too much between rounds to be "
                                                                 "trusted to the stability limit)" if unstable else "")]


def _ci_cell(r) -> str:
    if r.stability is None:
        return "-"
    ci = r.stability.ci_rel
    text = f"{100 * ci:.1f}%" if ci != float("inf") else "n/a"
    return text + ("" if r.stability.stable else "!")


_WHAT = {"prefill": "time to first token", "decode": "per output token", "train": "step", "finetune": "step"}


def composition_lines(result: dict) -> list[str]:
    """Per plan: the model step, its modules (time and share), the end-to-end figures; then the
    composed-versus-measured check of the units."""
    lines = []
    for b, e in zip(result["breakdowns"], result["estimates"]):
        src = ", ".join(f"{n} {k}" for k, n in b["sources"].items() if n)
        phase = b["plan"].split("/")[1].split(":")[0]
        kinds = b.get("kinds") or {}
        layers = (", ".join(f"{k['layers']} {name} {format_seconds(k['time_s'])}" for name, k in kinds.items())
                  if len(kinds) > 1 else f"layer {format_seconds(b['layer_s'])}")
        lines.append(f"{b['plan']}: {_WHAT[phase]} {format_seconds(b['total_s'])} ({layers}; calls: {src})")
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
            flag = "" if v.get("stable", True) else " (unit unstable)"
            lines.append(f"  {v['plan']} {v['unit']}: measured {format_seconds(v['measured_s'])}, "
                         f"composed {format_seconds(v['composed_s'])}, error {v['error_pct']:+.1f}%{flag}")
    return lines
