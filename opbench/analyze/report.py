"""`opbench report RUN.json [BASE.json] -o report.html`: one self-contained HTML page of a run.

The page holds, in order: the comparison with BASE when given, the roofline (each case a point,
coloured by op family, under the run's measured ceilings or its GPU's datasheet), the module-wise
breakdown per workload, per-op tables with the backends side by side, the measured peaks, and the
environment. Charts are inline SVG, so the file needs nothing beside it.
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

from opbench import __version__
from opbench.analyze.charts import Point, breakdown_svg, module_colours, roofline_svg
from opbench.analyze.compare import (DEFAULT_THRESHOLD_PCT, SECTIONS, Comparison, change_rows, compare_runs, share_pct,
                             threshold_pct)
from opbench.measure.peaks import comparison_rows, datasheet_for, measured_peaks
from opbench.analyze.roofline import Ceilings, bound, run_ceilings
from opbench.analyze.compose import Breakdown, run_breakdowns
from opbench.analyze.runs import Run, device_label, environment, label, load_run, resolve_run, shape_label, used_gpu
from opbench.record import OpCase
from opbench.text import format_seconds, roles_cell

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1180px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.meta, .note { color: #555; } nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
th, td { padding: 3px 9px; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.best { font-weight: 600; } .sub { color: #666; font-size: 12px; font-weight: normal; }
.regression { color: #b00020; } .improvement { color: #00693e; } .throttled { color: #a15c00; }
figure { margin: 1em 0; } figure svg { width: 100%; height: auto; }
"""


def _e(value) -> str:
    return html.escape("-" if value is None else str(value))


def _table(header: tuple, rows: list[tuple], numeric_from: int = 1) -> str:
    """Cells are escaped text; columns from `numeric_from` on are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i >= numeric_from else ''}>{_e(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _comparison_html(c: Comparison) -> str:
    parts = [f"<p>Base <b>{_e(c.base.path)}</b> ({_e(c.base.datetime)}) against this run. A regression is a "
             f"median more than {c.threshold:.0%} slower whose interquartile range (q1..q3 of the rounds) does not "
             "overlap the base's; a case throttled in either run is not counted.</p>"]
    if c.environment:
        parts.append("<h3>Environment differences</h3>"
                     + _table(("fact", "base", "this run"), c.environment, numeric_from=3))
    else:
        parts.append("<p>No difference in driver, CUDA, software, GPU, clocks or host.</p>")
    counts = ", ".join(f"<span class={kind}>{kind}: {len(c.of(kind))}</span>" for kind, _ in SECTIONS)
    parts.append(f"<p>{len(c.changes)} cases matched: {counts}; {len(c.only_base)} only in base, "
                 f"{len(c.only_new)} only in this run.</p>")
    for kind, title in SECTIONS:
        changes = c.of(kind)
        if changes:
            header, *rows = change_rows(c, changes)
            table = _table(header, rows)
            summary = f"<span class={kind}>{_e(title)} ({len(changes)})</span>"
            parts.append(f"<details{' open' if kind in ('regression', 'throttled') else ''}>"
                         f"<summary>{summary}</summary>{table}</details>")
    for title, cases in (("only in base", c.only_base), ("only in this run", c.only_new)):
        if cases:
            parts.append(f"<p>{_e(title)}: " + ", ".join(_e(label(m)) for m in cases) + "</p>")
    return "".join(parts)


def _points(run: Run) -> list[Point]:
    return [Point(m.op, m.dtype, m.flops / m.bytes, m.tflops) for m in run.of_kind("op") if m.flops and m.bytes]


def _roofline_html(run: Run, ceil: Ceilings | None) -> str:
    points = _points(run)
    note = (f"{len(points)} cases with FLOPs; ceilings {_e(ceil.source)}." if ceil else
            f"{len(points)} cases with FLOPs; no ceilings: run bench/test_peaks.py in the same session, "
            "or give --peaks.")
    over = sum(1 for m in run.measurements if (b := bound(m, ceil)) and b.share > 1)
    if over:
        note += (f" {over} of them exceed their ceiling (share over 100%): their data fit in a cache that the copy "
                 "bandwidth does not see, or the peak search fell short (a busy machine, shapes it did not try).")
    return f"<figure>{roofline_svg(points, ceil)}<figcaption class=note>{note}</figcaption></figure>"


def _breakdown_html(rows: list[Breakdown]) -> str:
    if not rows:
        return "<p class=note>The run holds no composed plans (see the run's opbench.missing).</p>"
    colours = module_colours()
    modules = [m for m in colours if any(m in b.modules_s() for b in rows)]
    header = ("workload", "step time", *modules, "calls")
    table_rows = [(b.plan.name, format_seconds(b.total_s) if b.total_s else "-",
                   *(format_seconds(b.modules_s()[m]) if m in b.modules_s() else "-" for m in modules),
                   ", ".join(f"{n} {source}" for source, n in b.sources().items() if n)) for b in rows]
    chart = breakdown_svg(rows) if any(b.total_s for b in rows) else "<p class=note>No plan was composed.</p>"
    return (f"<figure>{chart}</figure>"
            "<p class=note>Per model step, as composed from the run (opbench/compose.py): each call's time measured, "
            "interpolated along a measured sweep, or modeled, times its count, times the layers for per-layer "
            "calls.</p>" + _table(header, table_rows))


def _rate(m: OpCase) -> str:
    """TFLOP/s (GFLOP/s below one) for cases that compute, GB/s for those that only move data."""
    if not m.flops:
        return f"{m.gbps or 0:.4g} GB/s"
    tflops = m.tflops
    return f"{tflops:.3g} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.3g} GFLOP/s"


def _cell(m: OpCase, ceil: Ceilings | None, best: bool) -> str:
    case_bound = bound(m, ceil)
    roof = f" · {share_pct(case_bound.share)} of roof" if case_bound else ""
    reasons = m.gpu.throttled if m.gpu else ()
    throttled = f"<br><span class=throttled>throttled: {_e(', '.join(reasons))}</span>" if reasons else ""
    return (f"<td class='num{' best' if best else ''}'>{_e(format_seconds(m.median_s))}"
            f"<br><span class=sub>{_e(_rate(m))}{_e(roof)}</span>{throttled}</td>")


def _op_tables_html(run: Run, ceil: Ceilings | None) -> str:
    by_op: dict[str, dict[tuple, dict[str, OpCase]]] = defaultdict(lambda: defaultdict(dict))
    for m in run.measurements:
        if m.kind != "peak":  # peak cases have their own section
            by_op[m.op][(shape_label(m), m.dtype, m.pass_)][m.backend] = m
    parts = []
    for op in sorted(by_op):
        cases = by_op[op]
        backends = sorted({b for per_backend in cases.values() for b in per_backend})
        head = "".join(f"<th>{_e(h)}</th>" for h in ("shape", "dtype", "pass", *backends, "serves"))
        rows = []
        for (shape_id, dtype, pass_), per_backend in cases.items():
            fastest = min(m.median_s for m in per_backend.values())
            cells = "".join(_cell(per_backend[b], ceil, per_backend[b].median_s == fastest) if b in per_backend
                            else "<td class=num>-</td>" for b in backends)
            roles = next(iter(per_backend.values())).roles
            serves = roles_cell(roles)
            rows.append(f"<tr><td>{_e(shape_id)}</td><td>{_e(dtype)}</td><td>{_e(pass_)}</td>{cells}"
                        f"<td>{_e(serves)}</td></tr>")
        parts.append(f"<h3>{_e(op)}</h3><table><tr>{head}</tr>{''.join(rows)}</table>")
    return ("<p class=note>Median per call; bold: the fastest backend for that shape, dtype and pass; "
            "below it the rate and the share of the roofline.</p>" + "".join(parts))


def _peaks_html(run: Run) -> str:
    peaks = measured_peaks(run.of_kind("peak"), run.device, device_label(run.machine_info, run.device))
    sheet = datasheet_for((used_gpu(run.machine_info) or {}).get("name"))
    if peaks is None:
        return ("<p class=note>No peak cases in this run (pytest bench/test_peaks.py).</p>"
                + (f"<p>Datasheet ({_e(sheet.source)}): " + ", ".join(
                    f"{_e(d)} {v:g} TFLOP/s" for d, v in sheet.matmul_tflops.items())
                   + f", memory {sheet.memory_gbps:g} GB/s.</p>" if sheet else ""))
    title = f"Measured on {_e(peaks.label)}" + (f"; datasheet: {_e(sheet.source)}" if sheet else "")
    search = [(label(m), format_seconds(m.median_s), "-" if m.metric == "launch_s" else _rate(m))
              for m in run.of_kind("peak")]
    return (f"<p>{title}</p>"
            + _table(("metric", "measured", "datasheet", "of datasheet"), comparison_rows(peaks, sheet))
            + "<details><summary>every peak case</summary>" + _table(("case", "median", "rate"), search) + "</details>")


def _environment_html(run: Run, base: Run | None) -> str:
    env = environment(run.machine_info)
    if base is None:
        return _table(("fact", "value"), [(k, v) for k, v in env.items() if v is not None], numeric_from=2)
    old = environment(base.machine_info)
    return _table(("fact", "this run", "base"), [(k, v, old[k]) for k, v in env.items()
                                                 if v is not None or old[k] is not None], numeric_from=3)


def build_report(run: Run, base: Run | None = None, ceilings_run: Run | None = None,
                 threshold: float = DEFAULT_THRESHOLD_PCT / 100) -> str:
    """The page as one HTML string; ceilings from `ceilings_run` when given, else from `run`."""
    ceil = run_ceilings(ceilings_run or run)
    section = run.section
    sections = []
    if base is not None:
        sections.append(("comparison", "Comparison", lambda: _comparison_html(compare_runs(base, run, threshold))))
    sections += [("roofline", "Roofline", lambda: _roofline_html(run, ceil)),
                 ("breakdown", "Module-wise breakdown", lambda: _breakdown_html(run_breakdowns(run.section))),
                 ("ops", "Per-op results", lambda: _op_tables_html(run, ceil)),
                 ("peaks", "Measured peaks", lambda: _peaks_html(run)),
                 ("environment", "Environment", lambda: _environment_html(run, base))]
    nav = "".join(f"<a href='#{key}'>{_e(title)}</a>" for key, title, _ in sections)
    body = "".join(f"<section id={key}><h2>{_e(title)}</h2>{render()}</section>" for key, title, render in sections)
    meta = (f"{_e(run.path.name)} · {_e(run.datetime)} · {_e(device_label(run.machine_info, run.device))} · "
            f"profile {_e(section.get('profile'))} · {len(run.measurements)} timed cases · opbench {__version__}")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>opbench report: {_e(run.path.name)}"
            f"</title><style>{CSS}</style></head><body><h1>opbench report</h1><p class=meta>{meta}</p>"
            f"<nav>{nav}</nav>{body}</body></html>\n")


def add_command(sub) -> None:
    p = sub.add_parser("report", help="write one self-contained HTML page of a run (and its comparison with a base)",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("run", help="the run: a JSON file, or a run id with --storage")
    p.add_argument("base", nargs="?", help="a base run to compare with")
    p.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default report.html)")
    p.add_argument("--peaks", metavar="RUN", help="take the ceilings from this run's peak cases")
    p.add_argument("--threshold", type=threshold_pct, default=DEFAULT_THRESHOLD_PCT, metavar="PCT",
                   help=f"regression threshold of the comparison (default {DEFAULT_THRESHOLD_PCT:g}%%)")
    p.add_argument("--storage", metavar="DIR", help="a pytest-benchmark storage folder in which RUN and BASE are ids")
    p.set_defaults(func=_command)


def _command(args) -> int:
    run = load_run(resolve_run(args.run, args.storage))
    base = load_run(resolve_run(args.base, args.storage)) if args.base else None
    ceilings_run = load_run(args.peaks) if args.peaks else None
    page = build_report(run, base, ceilings_run, args.threshold / 100)
    Path(args.output).write_text(page)
    print(f"opbench report: wrote {args.output} ({len(page) // 1024} KiB)")
    return 0
