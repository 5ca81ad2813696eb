"""The report's charts, drawn with matplotlib (the optional `report` extra) as inline SVG strings."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from opbench.analyze.compose import Breakdown
from opbench.analyze.compose import MODULE_ORDER
from opbench.analyze.roofline import Ceilings
from opbench.ops import FAMILIES
from opbench.ops.dtypes import DTYPES
from opbench.text import format_seconds

# Colour-blind-safe sets, one for dtypes on the roofline (Okabe-Ito) and another for modules (Paul Tol's
# bright, in MODULE_ORDER), so that a colour never means both a dtype and a module on one page.
DTYPE_PALETTE = ("#E69F00", "#009E73", "#0072B2", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000")
MODULE_PALETTE = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#994F00", "#555555", "#BBBBBB")
# On the roofline a family is a marker, filled, then the same markers hollow: 30 shapes, one per family
# in FAMILIES order (so a family keeps its marker from report to report), and a dtype is a colour.
FAMILY_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", "p", "h", "*", ">", "d", "H", "8", "$\\star$", "$\\diamond$",
                  "$\\bowtie$", "$\\clubsuit$", "$\\spadesuit$")
LEGEND_GREY = "#555555"  # the family entries of the legend: their marker alone tells them apart
MAX_BARS = 60  # a breakdown chart taller than this many workloads is no longer read


class ReportError(RuntimeError):
    """The report cannot be drawn here (its optional dependency is missing)."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("the report's charts need matplotlib: pip install 'opbench[report]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


@dataclass(frozen=True)
class Point:
    """One case on the roofline."""
    op: str
    dtype: str
    intensity: float  # FLOP per byte
    tflops: float


def _svg(fig, name: str) -> str:
    """The figure as an <svg> element whose ids (and the references to them) carry the chart's name:
    matplotlib numbers ids per figure, and two charts on one page must not share one."""
    plt = _pyplot()
    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none"}):  # text stays text: smaller, sharp, searchable
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r'\bid="', f'id="{name}-', text)
    return text.replace("url(#", f"url(#{name}-").replace('href="#', f'href="#{name}-')


@dataclass(frozen=True)
class Marker:
    shape: str  # a matplotlib marker
    filled: bool


def family_markers(ops) -> dict[str, Marker]:
    """Each op family's marker: by its place in FAMILIES (ops outside it after them), filled first."""
    wanted, n = set(ops), len(FAMILY_MARKERS)
    order = list(FAMILIES) + sorted(wanted - set(FAMILIES))
    return {op: Marker(FAMILY_MARKERS[i % n], (i // n) % 2 == 0) for i, op in enumerate(order) if op in wanted}


def dtype_colours(dtypes) -> dict[str, str]:
    """Each dtype's colour: by its place in DTYPES (dtypes outside it after them)."""
    wanted = set(dtypes)
    order = list(DTYPES) + sorted(wanted - set(DTYPES))
    return {d: DTYPE_PALETTE[i % len(DTYPE_PALETTE)] for i, d in enumerate(order) if d in wanted}


def _scatter_style(marker: Marker, colour: str) -> dict:
    """A filled marker in its colour with a white rim, or a hollow one drawn in its colour."""
    if marker.filled:
        return {"marker": marker.shape, "c": colour, "edgecolors": "white", "linewidths": 0.5}
    return {"marker": marker.shape, "facecolors": "none", "edgecolors": colour, "linewidths": 1.2}


def _legend_handles(markers: dict[str, Marker], colours: dict[str, str]) -> tuple[list, list[str]]:
    """One legend in two parts, each titled: the families by marker (in grey), the dtypes by colour."""
    from matplotlib.lines import Line2D

    def entry(marker: Marker, colour: str) -> Line2D:
        return Line2D([], [], linestyle="none", marker=marker.shape, markersize=7,
                      markeredgewidth=0.5 if marker.filled else 1.2,
                      markerfacecolor=colour if marker.filled else "none",
                      markeredgecolor="white" if marker.filled else colour)

    title = Line2D([], [], linestyle="none", marker="")
    handles = [title, *(entry(m, LEGEND_GREY) for m in markers.values()),
               title, *(entry(Marker("s", True), c) for c in colours.values())]
    return handles, ["op family", *markers, "dtype", *colours]


def roofline_svg(points: list[Point], ceil: Ceilings | None) -> str:
    return _svg(roofline_figure(points, ceil), "roofline")


def roofline_figure(points: list[Point], ceil: Ceilings | None):
    """Each case a point (its family a marker, its dtype a colour) under the ceilings."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    xs = [p.intensity for p in points]
    peak = max(ceil.matmul_tflops.values(), default=0) if ceil else 0
    # TFLOP/s on GPUs; GFLOP/s where every rate is below one TFLOP/s (CPUs), so tick labels stay readable
    scale, unit = (1.0, "TFLOP/s") if max([p.tflops for p in points] + [peak]) >= 1 else (1e3, "GFLOP/s")
    markers, colours = family_markers({p.op for p in points}), dtype_colours({p.dtype for p in points})
    for op, marker in markers.items():
        for dtype in (d for d in colours if any(p.op == op and p.dtype == d for p in points)):
            mine = [p for p in points if p.op == op and p.dtype == dtype]
            ax.scatter([p.intensity for p in mine], [p.tflops * scale for p in mine], s=36,
                       gid=f"points-{op}-{dtype}", zorder=3, **_scatter_style(marker, colours[dtype]))
    lo, hi = min(xs + [1.0]) / 2, max(xs + [1e3]) * 2
    memory_gbps = ceil.memory_gbps if ceil else None
    if memory_gbps:
        bw = memory_gbps * 1e9 / 1e12 * scale  # rate per FLOP/byte of intensity
        ridge = min(max(peak / memory_gbps * 1e3 if peak else hi, lo), hi)
        ax.plot([lo, ridge], [lo * bw, ridge * bw], color="#444", lw=1.5, gid="ceiling-memory")
        middle = (lo * ridge) ** 0.5  # halfway along the slope on a log axis, left of it
        ax.annotate(f"memory copy {memory_gbps:.4g} GB/s", (middle, middle * bw * 1.4), fontsize=8, color="#444",
                    ha="right", va="bottom")
    roofs: dict[float, list[str]] = {}  # dtypes with the same ceiling (bf16, fp16) share one roof
    for dtype, tflops in (ceil.matmul_tflops.items() if ceil else ()):
        roofs.setdefault(tflops, []).append(dtype)
    for tflops, dtypes in sorted(roofs.items()):
        start = tflops / memory_gbps * 1e3 if memory_gbps else lo  # each roof begins at its ridge point
        ax.plot([start, hi], [tflops * scale] * 2, color="#444", lw=1, ls="--", gid=f"ceiling-{'-'.join(dtypes)}")
        ax.annotate(f"{'/'.join(dtypes)} {tflops * scale:.4g}", (hi, tflops * scale), fontsize=8, color="#444",
                    ha="right", va="bottom")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel(f"achieved {unit}")
    ax.set_title(f"Roofline: ceilings {ceil.source}" if ceil else
                 "Roofline: no ceilings (no peak cases in the run, no datasheet for its device)", fontsize=10)
    ax.grid(True, which="major", color="#ddd", lw=0.5)
    if points:  # outside the axes, on the right: it never covers a point nor runs below the chart
        handles, labels = _legend_handles(markers, colours)
        legend = ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                           borderaxespad=0.0, frameon=False, ncols=1 + len(labels) // 26)
        for title in (0, len(markers) + 1):
            legend.get_texts()[title].set_fontweight("bold")
    return fig


def module_colours() -> dict[str, str]:
    return {g: MODULE_PALETTE[i % len(MODULE_PALETTE)] for i, g in enumerate(MODULE_ORDER)}


def breakdown_svg(rows: list[Breakdown]) -> str:
    """100% stacked bars, one per workload, the step time printed beside each: prefill and decode
    differ by orders of magnitude, so shares are drawn and absolute times written."""
    plt = _pyplot()
    from matplotlib.ticker import PercentFormatter  # matplotlib is imported lazily: an optional extra
    measured = [b for b in rows if b.total_s > 0]
    rows = measured[:MAX_BARS]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.38 * max(len(rows), 1)))
    colours = module_colours()
    labels = [b.plan.name for b in rows]
    left = [0.0] * len(rows)
    for module, colour in colours.items():
        shares = [b.modules_s().get(module, 0.0) / b.total_s for b in rows]
        if any(shares):
            bars = ax.barh(labels, shares, left=left, color=colour, label=module, height=0.7)
            for y, bar in enumerate(bars):  # ids are unique on the page: module and row
                bar.set_gid(f"module-{re.sub(r'[^a-z]+', '-', module.lower())}-{y}")
            left = [a + s for a, s in zip(left, shares)]
    for y, b in enumerate(rows):
        note = f" ({b.not_measured} calls interpolated or modeled)" if b.not_measured else ""
        ax.text(1.01, y, format_seconds(b.total_s) + note, va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.invert_yaxis()
    ax.set_xlabel("share of the measured time per model step")
    ax.tick_params(axis="y", labelsize=8)
    if len(measured) > MAX_BARS:
        ax.set_title(f"the first {MAX_BARS} of {len(measured)} workloads; the table lists all", fontsize=9, pad=28)
    ax.legend(fontsize=8, ncols=4, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    return _svg(fig, "breakdown")


# Verdict colours of the trend charts, as the report's text colours them (.regression, .improvement, ...)
VERDICT_COLOURS = {"regression": "#b00020", "improvement": "#00693e", "throttled": "#a15c00", "clock": "#6a6a6a",
                   "ambiguous": "#6a6a6a", "same": "#bbbbbb"}


@dataclass(frozen=True)
class TrendStep:
    """A step drawn on a trend chart: a line where the new level starts, labelled with what changed."""
    run: int  # the run's number in the history, from 1
    label: str
    verdict: str


def _time_scale(values: list[float]) -> tuple[float, str]:
    top = max(values, default=1.0)
    return next(((1 / s, u) for s, u in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")) if top >= s), (1e9, "ns"))


def trend_svg(name: str, title: str, runs: list[int], values: list[float], levels: list[float],
              steps: list[TrendStep], *, seconds: bool = True, band: list[tuple[float, float]] | None = None,
              trusted: list[bool] | None = None) -> str:
    """A small line chart of one series over the runs of a history: the values (hollow where the
    record was not trusted), the rounds' interquartile band, the fitted levels dashed, and each step a
    vertical line in its verdict's colour, labelled with the environment change at that run. `seconds`:
    values are times (scaled to a readable unit); else a dimensionless index."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 2.3))
    scale, unit = _time_scale(values) if seconds else (1.0, "x usual")
    ys = [v * scale for v in values]
    if band:
        ax.fill_between(runs, [lo * scale for lo, _ in band], [hi * scale for _, hi in band], color="#0072B2",
                        alpha=0.15, lw=0, gid=f"{name}-band")
    ax.plot(runs, ys, color="#0072B2", lw=1.2, gid=f"{name}-line")
    trusted = trusted or [True] * len(runs)
    for ok in (True, False):
        xs = [r for r, t in zip(runs, trusted) if t is ok]
        if xs:
            ax.scatter(xs, [y for y, t in zip(ys, trusted) if t is ok], s=14, zorder=3,
                       facecolors="#0072B2" if ok else "white", edgecolors="#0072B2", linewidths=1,
                       gid=f"{name}-{'trusted' if ok else 'untrusted'}")
    # a level holds from one run to the next; "mid" puts its change halfway between them, where the step line is
    ax.step(runs, [v * scale for v in levels], where="mid", color="#444", lw=1, ls="--", gid=f"{name}-levels")
    right = (min(runs) + 0.6 * (max(runs) - min(runs))) if runs else 0
    for i, s in enumerate(steps):
        colour = VERDICT_COLOURS.get(s.verdict, "#6a6a6a")
        ax.axvline(s.run - 0.5, color=colour, lw=1.4, gid=f"{name}-step-{i}")
        text = s.label if len(s.label) <= 48 else s.label[:47] + "…"
        on_right = s.run > right  # a label near the right edge reads leftwards from its line
        ax.annotate(f"#{s.run} {s.verdict}: {text}", (s.run - 0.5, 1.0), xycoords=("data", "axes fraction"),
                    fontsize=7, color=colour, va="top",
                    ha="right" if on_right else "left", xytext=(-3 if on_right else 3, -2 - 9 * i),
                    textcoords="offset points", gid=f"{name}-step-label-{i}")
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_xlabel("run", fontsize=8)
    ax.set_ylabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)
    if runs:
        ax.set_xlim(min(runs) - 0.6, max(runs) + 0.6)
        ax.xaxis.get_major_locator().set_params(integer=True)
    lo, hi = min(ys + [v * scale for v in levels], default=0), max(ys, default=1)
    pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 1
    ax.set_ylim(lo - pad, hi + pad * (1 + 1.2 * len(steps)))  # room above the line for the step labels
    ax.grid(True, color="#eee", lw=0.5)
    return _svg(fig, name)


@dataclass(frozen=True)
class FrontierPoint:
    """One configuration on the latency-cost plane."""
    label: str
    latency_s: float
    cost: float
    dtype: str
    on_frontier: bool


def frontier_svg(points: list[FrontierPoint], *, latency_label: str, cost_label: str, title: str,
                 name: str = "frontier") -> str:
    """Every configuration that fits as a grey point, the Pareto frontier as a staircase of points
    labelled with their configuration, coloured by dtype as on the roofline. Log axes: latency and cost
    span orders of magnitude between batch 1 and a full batch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    colours = dtype_colours(p.dtype for p in points)
    for dtype, colour in colours.items():
        rest = [p for p in points if p.dtype == dtype and not p.on_frontier]
        front = [p for p in points if p.dtype == dtype and p.on_frontier]
        if rest:
            ax.scatter([p.latency_s for p in rest], [p.cost for p in rest], c="#BBBBBB", marker="o", s=22,
                       label=f"{dtype}, dominated", gid=f"dominated-{dtype}", zorder=2)
        if front:
            ax.scatter([p.latency_s for p in front], [p.cost for p in front], c=colour, marker="o", s=40,
                       edgecolors="#222222", label=f"{dtype}, on the frontier", gid=f"frontier-{dtype}", zorder=4)
    front = sorted((p for p in points if p.on_frontier), key=lambda p: p.latency_s)
    if front:
        xs, ys = [front[0].latency_s], [front[0].cost]
        for p in front[1:]:  # the staircase: cost holds until the next, slower and cheaper, point
            xs += [p.latency_s, p.latency_s]
            ys += [ys[-1], p.cost]
        ax.plot(xs, ys, color="#222222", lw=1, gid="frontier-line", zorder=3)
        for i, p in enumerate(front):  # labels alternate above and below the staircase so neighbours do not collide
            ax.annotate(p.label, (p.latency_s, p.cost), xytext=(4, 6 if i % 2 == 0 else -12),
                        textcoords="offset points", fontsize=7, color="#222222")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(latency_label)
    ax.set_ylabel(cost_label)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", color="#ddd", lw=0.5)
    if points:
        ax.legend(fontsize=8, loc="upper right", frameon=False)
    return _svg(fig, name)  # one name per chart: a page may hold several frontiers
