"""The end-of-run table: one row per timed case, its median and rates, the fastest backend starred."""

from __future__ import annotations

from opbench.record import OpCase
from opbench.ops import get_family
from opbench.ops.base import PASSES
from opbench.text import device_noun, format_flops, format_seconds, roles_cell, table_lines


def summary_lines(timed: list[OpCase], device: str) -> list[str]:
    best: dict[tuple, float] = {}
    for r in timed:
        key = r.key[:3] + r.key[4:]  # identity without the backend
        best[key] = min(best.get(key, float("inf")), r.median_s)
    rows = [("op", "shape", "dtype", "pass", "backend", "median", "compute", "GB/s", "CI", "timer", "serves")]
    unstable = 0
    for r in sorted(timed, key=lambda r: (r.op, PASSES.index(r.pass_), r.dtype)):
        star = "*" if r.median_s <= best[r.key[:3] + r.key[4:]] else ""
        stable = r.stability.stable if r.stability else True
        unstable += not stable
        shape = get_family(r.op).id_of(get_family(r.op).shape_type(**r.shape))
        rows.append((r.op, shape, r.dtype, r.pass_, r.backend + star, format_seconds(r.median_s),
                     format_flops(r.tflops * 1e12) if r.flops else "-", f"{r.gbps:.4g}", _ci_cell(r),
                     f"{r.timer}x{r.unroll}", roles_cell(r.roles)))
    return [f"medians per call on {device}; * fastest backend for that shape, dtype and pass; CI: the median's "
            "95% confidence half-width, ! marks an unstable case; timer x calls per timed replay (cuda-graph) or "
            "round (cpu)", *table_lines(rows),
            f"{len(timed)} cases timed, {unstable} unstable" + (" (their medians moved too much between rounds to be "
                                                                 "trusted to the stability limit)" if unstable else "")]


def _ci_cell(r) -> str:
    if r.stability is None:
        return "-"
    ci = r.stability.ci_rel
    text = f"{100 * ci:.1f}%" if ci is not None else "n/a"
    return text + ("" if r.stability.stable else "!")


_WHAT = {"prefill": "time to first token", "decode": "per output token", "train": "step", "finetune": "step"}


def composition_lines(result: dict, device: str = "cuda") -> list[str]:
    """Per plan: the model step, its modules (time and share), the fusions applied, the end-to-end
    figures per device of the run; then what could not be composed, once, with the command that
    measures it; then the composed-versus-measured check of the units."""
    noun = device_noun(device)
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
        if b.get("fused"):
            lines.append(f"  fused: {'; '.join(b['fused'])}")
        figures = [f"{e['tokens_per_s_per_gpu']:.4g} tokens/s per {noun}",
                   f"{e['gpu_s_per_1k_tokens']:.3g} {noun}-s per 1k tokens",
                   f"memory {e['memory']['weights_bytes'] / 2**30:.3g} GiB weights + "
                   f"{(e['memory']['kv_cache_bytes'] + e['memory']['activations_bytes']) / 2**30:.3g} "
                   "GiB cache/activations"]
        if e["mfu"] is not None:
            figures.append(f"MFU {100 * e['mfu']:.1f}%")
        lines.append("  " + "; ".join(figures))
    for what, entries in (("plans", [m for m in result["missing"] if "unit" not in m]),
                          ("units", [m for m in result["missing"] if "unit" in m])):
        if not entries:
            continue
        ops = ", ".join(dict.fromkeys(op for m in entries for op in m.get("ops", ())))
        names = [m["plan"] + (f" {m['unit']}" if "unit" in m else "") for m in entries]
        lines.append(f"not composed: {len(entries)} {what if len(entries) > 1 else what[:-1]} "
                     f"({roles_cell(names)}) lack measurements of {ops}"
                     + (" (units compose from eager backends)" if what == "units" else ""))
        if result.get(f"measure_{what}"):
            lines.append(f"  measure them with: {result[f'measure_{what}']}")
    lines += quantization_lines(result.get("quantization") or [])
    if result["validation"]:
        lines.append("composed vs measured (units run torch's eager ops; no all-reduce, no optimizer step):")
        for v in result["validation"]:
            flag = "" if v.get("stable", True) else " (unit unstable)"
            lines.append(f"  {v['plan']} {v['unit']}: measured {format_seconds(v['measured_s'])}, "
                         f"composed {format_seconds(v['composed_s'])}, error {v['error_pct']:+.1f}%{flag}")
    return lines


def quantization_rows(rows: list[dict]) -> list[tuple]:
    """The quantization view as table rows (header first): per model and weight format, memory, decode
    step per batch, prefill, and the decode speed-up over the model's unquantized weights at batch 1."""
    if not rows:
        return []
    batches = list(rows[0]["decode_s"])
    table = [("model", "weights", "memory", "weights GiB", *(f"decode b={b}" for b in batches), "prefill",
              "b=1 speed-up", "measured calls")]
    plain = {r["model"]: r for r in rows if not r["weights"]}
    for r in rows:
        base = plain.get(r["model"])
        speedup = base["decode_s"][batches[0]] / r["decode_s"][batches[0]] if base else None
        table.append((r["model"], r["weights"] or r["dtype"], f"{r['memory_bytes'] / 2**30:.4g} GiB",
                      f"{r['weights_bytes'] / 2**30:.4g}", *(format_seconds(r["decode_s"][b]) for b in batches),
                      format_seconds(r["prefill_s"]) if r["prefill_s"] is not None else "-",
                      f"{speedup:.2f}x" if speedup else "-", f"{r['measured_calls']}/{r['calls']}"))
    return table


def quantization_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    where = "; ".join(dict.fromkeys(f"{r['model']}: decode at context {r['context']}, prefill of "
                                    f"{r['prompt_tokens']} tokens" for r in rows))
    return [f"quantization view ({where}; memory per device at decode batch 1, weights and KV cache):",
            *table_lines(quantization_rows(rows), indent="  ")]
