"""`opbench report RUN.json [BASE.json] -o report.html`: one self-contained HTML page of a run.

The page holds, in order: the comparison with BASE when given, the trends of the run's card over a
history of runs when --history is given (a chart per flagged case and per op family, the versions of
every run), the roofline (each case a point, its op family a marker and its dtype a colour, under the
run's measured ceilings or its GPU's datasheet), the module-wise breakdown per workload, the trade-off
frontier of its inference models, per-op tables with the backends side by side, the measured peaks,
and the environment. Charts are inline SVG, so the file needs nothing beside it.
"""

from __future__ import annotations

import html
import re
from collections import defaultdict

from opbench import __version__
from opbench.analyze import history as hist
from opbench.analyze.charts import Point, TrendStep, breakdown_svg, module_colours, roofline_svg, trend_svg
from opbench.analyze.compare import (DEFAULT_THRESHOLD_PCT, SECTIONS, Comparison, change_rows, compare_runs, share_pct,
                                     threshold_pct, units_line)
from opbench.measure.peaks import comparison_rows, datasheet_for, measured_peaks, run_peaks
from opbench.analyze.roofline import Ceilings, bound, run_ceilings
from opbench.analyze.compose import Breakdown, run_breakdowns
from opbench.analyze.runs import Run, device_label, environment, label, load_run, resolve_run, shape_id, used_gpu
from opbench.measure.summary import quantization_rows
from opbench.record import OpCase
from opbench.text import format_flops, format_seconds, roles_cell, write_file

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
.trends { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 0 1.5em; }
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
    if c.base.units or c.new.units:
        parts.append(f"<p class=note>{_e(units_line(c))}.</p>")
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


def _tradeoff_html(run: Run, model_names: list[str] | None) -> str:
    """The latency-cost frontier of deployment configurations (opbench.analyze.tradeoff) for the run's
    inference models, or the models asked for."""
    from opbench.analyze.charts import FrontierPoint, frontier_svg
    from opbench.analyze.compose import Composer, MissingMeasurement
    from opbench.analyze.tradeoff import (gpu_memory, inference_assumptions, inference_rows, inference_tradeoff,
                                          provenance_kind, provenance_lines)
    from opbench.spec.models import ConfigError, get_model
    from opbench.spec.workload import PlanError

    if model_names is None:  # the models the run planned inference for
        model_names = list(dict.fromkeys(p["model"]["name"] for p in run.section.get("plans") or ()
                                         if p["workload"]["phase"] in ("prefill", "decode")))
    if not model_names:
        return "<p class=note>The run planned no inference workload; give --tradeoff-model.</p>"
    composer = Composer(run.measurements)
    parts = []
    for name in model_names:
        try:
            model = get_model(name)
            prompt, output = 1024, 256  # halved together until they fit the model's context
            while prompt + output > model.max_seq_len and output > 1:
                prompt, output = prompt // 2, output // 2
            t = inference_tradeoff(composer, model, prompt, output, gpu_memory(run, None))
        except (MissingMeasurement, PlanError, ConfigError) as error:
            parts.append(f"<h3>{_e(name)}</h3><p class=note>No trade-off: {_e(error)}</p>")
            continue
        front = set(map(id, t.frontier))
        points = [FrontierPoint(f"tp={p.config.tp} b={p.config.batch}" + ("" if p.config.mode == "graph" else " eager"),
                                p.e2e_s, p.gpu_s_per_1k_tokens, p.config.dtype, id(p) in front) for p in t.fitting]
        provenance = provenance_lines(run, composer, t.sources())
        kind = provenance_kind(t.sources())
        title = f"{model.name}, prompt {prompt}, output {output}: " + (
            "measured" if kind == "measured" else f"{kind.upper()} from this run's cases")
        chart = frontier_svg(points, latency_label="end-to-end latency per request, TTFT + (O - 1) x TPOT (s)",
                             cost_label="GPU-seconds per 1,000 output tokens", title=title,
                             name="frontier-" + re.sub(r"[^a-z0-9]+", "-", model.name.lower()))
        header, *rows = inference_rows(t.frontier)
        notes = "".join(f"<li>{_e(line)}</li>" for line in provenance[1:] + inference_assumptions(t))
        parts.append(f"<h3>{_e(model.name)}: prompt {prompt}, output {output} tokens</h3><figure>{chart}</figure>"
                     f"<ul class=note>{notes}</ul>" + _table(header, rows))
    return ("<p class=note>Deployment configurations (tensor-parallel degree, batch, dtype, execution mode) "
            "composed from the run; grey: configurations that fit but are dominated; dark: the Pareto frontier "
            "of latency against cost. `opbench tradeoff RUN --model M --slo ttft=..,tpot=..` names the "
            "cheapest that meets an SLO.</p>" + "".join(parts))


def _rate(m: OpCase) -> str:
    """The compute rate for cases that compute, GB/s for those that only move data."""
    return format_flops(m.tflops * 1e12) if m.flops else f"{m.gbps or 0:.4g} GB/s"


def _cell(m: OpCase, ceil: Ceilings | None, best: bool) -> str:
    case_bound = bound(m, ceil)
    roof = f" · {share_pct(case_bound.share)} of roof" if case_bound else ""
    reasons = m.gpu.throttled if m.gpu else ()
    throttled = f"<br><span class=throttled>throttled: {_e(', '.join(reasons))}</span>" if reasons else ""
    return (f"<td class='num{' best' if best else ''}'>{_e(format_seconds(m.median_s))}"
            f"<br><span class=sub>{_e(_rate(m))}{_e(roof)}</span>{throttled}</td>")


def _quantization_html(section: dict) -> str:
    """Each weight format of a model side by side: memory, decode step per batch, prefill."""
    rows = quantization_rows(section.get("quantization") or [])
    if not rows:
        return "<p>No weight format measured (workloads with w=int8, w=int4, w=fp8-row, ... add one).</p>"
    return (_table(rows[0], rows[1:], numeric_from=2)
            + "<p>Composed from the run's cases: decode batches it did not measure are interpolated or modeled; "
              "'measured calls' says how many of the calls were timed as such.</p>")


def _op_tables_html(run: Run, ceil: Ceilings | None) -> str:
    by_op: dict[str, dict[tuple, dict[str, OpCase]]] = defaultdict(lambda: defaultdict(dict))
    for m in run.measurements:
        if m.kind != "peak":  # peak cases have their own section
            by_op[m.op][(shape_id(m), m.dtype, m.pass_)][m.backend] = m
    parts = []
    for op in sorted(by_op):
        cases = by_op[op]
        backends = sorted({b for per_backend in cases.values() for b in per_backend})
        head = "".join(f"<th>{_e(h)}</th>" for h in ("shape", "dtype", "pass", *backends, "serves"))
        rows = []
        for (shape, dtype, pass_), per_backend in cases.items():
            fastest = min(m.median_s for m in per_backend.values())
            cells = "".join(_cell(per_backend[b], ceil, per_backend[b].median_s == fastest) if b in per_backend
                            else "<td class=num>-</td>" for b in backends)
            roles = next(iter(per_backend.values())).roles
            serves = roles_cell(roles)
            rows.append(f"<tr><td>{_e(shape)}</td><td>{_e(dtype)}</td><td>{_e(pass_)}</td>{cells}"
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


MAX_TREND_CHARTS = 24  # flagged cases charted; the table lists them all


def _trend_steps(h: hist.History, steps) -> list[TrendStep]:
    return [TrendStep(s.run + 1, hist.change_text(s.environment), s.verdict) for s in steps if s.verdict != "same"]


def _trends_html(h: hist.History) -> str:
    clock = (f"times normalised to the reference SM clock of {h.reference_clock_mhz:.0f} MHz" if h.reference_clock_mhz
             else "raw medians (no SM clocks recorded)")
    parts = [f"<p>{len(h.runs)} runs of {_e(h.card)} ordered by {_e(h.by)}; {clock}. A step is a new level of the "
             f"piecewise-constant fit whose penalty per step is {hist.STEP_BETA:g} times the series' noise; it counts "
             f"beyond {_e(h.thresholds.describe())}, in stable records of an unthrottled card. The newest run is also "
             f"held against the {h.lookback} before it (|z| &gt; {h.z:g}).</p>"]
    flagged = h.flagged
    if flagged:
        rows = [(c.label, h.run_name(s.run), f"{s.change:+.1%}", s.verdict, hist.change_text(s.environment))
                for c, s in flagged]
        parts.append(_table(("case", "at run", "change", "verdict", "environment change"), rows, numeric_from=2))
    else:
        parts.append("<p>No case moved beyond its threshold.</p>")
    charted = [c for c in h.cases if c.flagged or c.verdict in hist.FLAGGED][:MAX_TREND_CHARTS]
    figures = []
    for i, c in enumerate(charted):
        pts = c.points
        svg = trend_svg(f"trend-case-{i}", c.label, [p.run + 1 for p in pts], [p.normalised_s for p in pts],
                        list(c.levels_s), _trend_steps(h, c.steps), band=[(p.q1_s, p.q3_s) for p in pts],
                        trusted=[p.trusted for p in pts])
        figures.append(f"<figure>{svg}</figure>")
    parts.append(f"<div class=trends>{''.join(figures)}</div>")
    parts.append("<h3>Op families in aggregate</h3><p class=note>Per run, the geometric mean of the family's cases, "
                 "each over its own usual (median) time; records not trusted (unstable, busy host) left out.</p>")
    figures = []
    for i, f in enumerate(h.families):
        runs = [r + 1 for r, _ in f.index]
        steps = _trend_steps(h, f.steps)
        # where some of its cases stepped and the family as a whole did not: marked too, with how many
        members: dict[int, list] = {}
        for c, s in h.flagged:
            if c.case.op == f.op:
                members.setdefault(s.run, []).append(s)
        for run, flagged in sorted(members.items()):
            if all(t.run != run + 1 for t in steps):
                steps.append(TrendStep(run + 1, f"{len(flagged)} of {f.cases} cases; "
                                       f"{hist.change_text(flagged[0].environment)}", flagged[0].verdict))
        svg = trend_svg(f"trend-family-{i}", f"{f.op} ({f.cases} cases)", runs, [v for _, v in f.index],
                        list(f.levels), sorted(steps, key=lambda t: t.run), seconds=False)
        figures.append(f"<figure>{svg}</figure>")
    parts.append(f"<div class=trends>{''.join(figures)}</div>")
    header, *rows = hist.version_rows(h)
    parts.append("<h3>Versions of every run</h3>" + _table(header, rows, numeric_from=len(header)))
    return "".join(parts)


def build_report(run: Run, base: Run | None = None, ceilings_run: Run | None = None,
                 threshold: float = DEFAULT_THRESHOLD_PCT / 100, history: hist.History | None = None,
                 tradeoff_models: list[str] | None = None) -> str:
    """The page as one HTML string; ceilings from `ceilings_run` when given, else from `run`; the trends of
    `history` (the run's card's history, opbench/analyze/history.py) when given; the trade-off frontier of
    `tradeoff_models` (default: the run's inference models)."""
    ceil = run_ceilings(ceilings_run or run)
    section = run.section
    sections = []
    if base is not None:
        sections.append(("comparison", "Comparison", lambda: _comparison_html(compare_runs(base, run, threshold))))
    if history is not None:
        sections.append(("trends", "Trends", lambda: _trends_html(history)))
    sections += [("roofline", "Roofline", lambda: _roofline_html(run, ceil)),
                 ("breakdown", "Module-wise breakdown", lambda: _breakdown_html(run_breakdowns(run.section))),
                 ("quantization", "Weight formats", lambda: _quantization_html(run.section)),
                 ("tradeoff", "Trade-off frontier", lambda: _tradeoff_html(run, tradeoff_models)),
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
    hist.add_report_options(p)
    p.add_argument("--tradeoff-model", action="append", metavar="MODEL",
                   help="the trade-off frontier of this model (repeatable; default: the run's inference models)")
    p.set_defaults(func=_command)


def _command(args) -> int:
    run = load_run(resolve_run(args.run, args.storage))
    base = load_run(resolve_run(args.base, args.storage)) if args.base else None
    ceilings_run = load_run(args.peaks) if args.peaks else None
    if ceilings_run is not None:
        run_peaks(ceilings_run)  # --peaks names a run for its peaks: one without is a mistake, not a fallback
    page = build_report(run, base, ceilings_run, args.threshold / 100, hist.report_history(run, args),
                        args.tradeoff_model)
    write_file(args.output, page)
    print(f"opbench report: wrote {args.output} ({len(page) // 1024} KiB)")
    return 0
