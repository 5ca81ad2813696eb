"""`opbench report` from a real CPU run: peaks and roofline in the JSON, the page and its charts,
the module-wise breakdown by hand, and the page in a headless browser where one is installed."""

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter

import pytest

from opbench.analyze.compose import CallTime, Composer, run_breakdowns
from opbench.analyze.charts import dtype_colours, module_colours
from opbench.cli import main
from opbench.analyze.runs import load_run

from opbench.spec.models import ZOO
from opbench.spec.plan import plan
from opbench.spec.workload import Workload

from tests.helpers import run_pytest
from tests.synthetic_runs import bench, write_run
from tests.test_compose import measure_plan

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """Every op of one small prefill plan in fp32 and the peak cases, timed on this CPU."""
    out = tmp_path_factory.mktemp("run") / "run.json"
    proc = run_pytest("bench/", "--model", "tiny", "--workload", "prefill:b=1,s=64",
                      "--dtype", "fp32", f"--benchmark-json={out}", "-q", "-rs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "host-device copies need a CUDA GPU" in proc.stdout  # skipped peaks say why
    return out


@pytest.fixture(scope="module")
def report(cpu_run, tmp_path_factory):
    pytest.importorskip("matplotlib")
    page = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(cpu_run), str(cpu_run), "-o", str(page)]) == 0
    return page, page.read_text()


def test_the_json_holds_measured_peaks_and_every_case_its_roofline_share(cpu_run):
    data = json.loads(cpu_run.read_text())
    peaks = data["opbench"]["peaks"]
    assert peaks["device"] == "cpu" and peaks["label"].startswith("CPU")
    assert set(peaks["matmul_tflops"]) == {"fp32", "bf16"} and peaks["copy_gbps"] > 0 and peaks["launch_s"] > 0
    assert peaks["h2d_gbps"] is None
    gemms = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"].get("op") == "gemm"]
    assert gemms
    for info in gemms:
        roof = info["roofline"]
        assert roof["source"] == f"measured on {peaks['label']}" and roof["limit"] in ("compute", "memory")
        compute_s = info["flops"] / (peaks["matmul_tflops"]["fp32"] * 1e12)
        memory_s = info["bytes"] / (peaks["copy_gbps"] * 1e9)
        assert roof["share"] == pytest.approx(max(compute_s, memory_s) / info["median_s"])
        assert info["gpu"] is None and info["host_s"] is None  # the card's state and host time: CUDA only
        assert info["host"]["load_per_core"] >= 0 and info["l2"] == "warm"


def _svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(s) for s in re.findall(r"<svg.*?</svg>", page, re.S)]


def _by_id(svg: ET.Element, prefix: str) -> list[ET.Element]:
    return [e for e in svg.iter() if (e.get("id") or "").startswith(prefix)]


def test_the_report_is_one_self_contained_page_with_well_formed_charts(report, cpu_run):
    _, page = report
    assert not re.search(r"<script|<link|<img|\bsrc=|href=\"(?!#)", page)  # nothing fetched from elsewhere
    ids = re.findall(r'\bid="?([\w.-]+)', page)
    assert not [i for i, n in Counter(ids).items() if n > 1]  # two charts never share an id
    roofline, breakdown, *others = _svgs(page)  # every chart parses as XML (the frontier's after these two)
    run = load_run(cpu_run)
    computing = [m for m in run.of_kind("op") if m.flops]
    points = sum(len(list(g.iter(f"{SVG}use"))) for g in _by_id(roofline, "roofline-points-"))
    assert points == len(computing) > 0  # every case with FLOPs is a point
    assert {e.get("id") for e in _by_id(roofline, "roofline-ceiling-")} == {
        "roofline-ceiling-memory", "roofline-ceiling-fp32", "roofline-ceiling-bf16"}
    texts = " ".join(t.text or "" for t in roofline.iter(f"{SVG}text"))
    assert "ceilings measured on CPU" in texts and "GFLOP/s" in texts
    # the prefill plan's modules: one bar segment each
    assert {re.sub(r"-\d+$", "", e.get("id")) for e in _by_id(breakdown, "breakdown-module-")} == {
        "breakdown-module-attention", "breakdown-module-mlp", "breakdown-module-norms-residuals",
        "breakdown-module-embedding-head"}


def test_the_report_holds_every_section(report, cpu_run):
    _, page = report
    for section in ("comparison", "roofline", "breakdown", "ops", "peaks", "environment"):
        assert f"<section id={section}>" in page
    assert "regression: 0" in page  # the run compared with itself
    assert "<td>64x192x192</td>" in page and "of roof" in page  # attn.o, a per-op row with its roofline share
    assert "host-device" not in page and "per-op overhead (torch dispatch on CPU)" in page


def test_breakdowns_are_read_from_the_runs_composition(tmp_path):
    decode, prefill = (plan(ZOO["tiny"], Workload(phase, 3, 77, dtype="fp32")) for phase in ("decode", "prefill"))
    composed = Composer(measure_plan(decode, lambda c: 3e-6 if c.op == "gemm" else 1e-6)).compose(decode)
    section = {"device": "cuda", "plans": [decode.to_dict(), prefill.to_dict()],
               "breakdowns": [composed.to_dict(), {**composed.to_dict(), "plan": "gone/decode:b=1,s=1,tp=1/fp32"}]}
    run = load_run(write_run(tmp_path / "composed.json", [bench(8, 24, 8, 3e-6)], section=section))
    (b,) = run_breakdowns(run.section)  # a breakdown of a plan the run does not hold is passed over
    assert b.plan == decode and b.calls == composed.calls
    assert b.total_s == pytest.approx(composed.total_s) and b.modules_s() == pytest.approx(composed.modules_s())
    assert b.not_measured == 0 and b.sources()["measured"] == len(decode.calls)
    assert run_breakdowns(load_run(write_run(tmp_path / "none.json", [bench(8, 24, 8, 3e-6)])).section) == []


@pytest.mark.parametrize("role, module", [
    ("attn.qkv", "attention"), ("mlp.gate_up", "mlp"), ("moe.router", "mlp"), ("norm.final", "norms+residuals"),
    ("residual.mlp", "norms+residuals"), ("tp.allreduce.attn", "communication"), ("embed", "embedding+head"),
    ("lm_head", "embedding+head"), ("loss", "embedding+head"), ("lora.attn.qkv.a", "attention"),
    ("lora.mlp.down.b", "mlp"), ("optim.adamw", "optimizer"), ("kv_cache.append", "other"),
])
def test_roles_group_by_prefix(role, module):
    assert CallTime(role, "gemm", "fwd", 1, "layer", 1e-6, "measured", "torch").module == module


def test_without_matplotlib_the_report_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run.json", [bench(64, 64, 64, 1e-6)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as stop:
        main(["report", str(run), "-o", str(tmp_path / "r.html")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'opbench[report]'" in err[0]
    assert not (tmp_path / "r.html").exists()


def _browser() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium or Chrome installed")
def test_the_page_renders_its_charts_in_a_headless_browser(report, cpu_run, tmp_path):
    page, _ = report
    flags = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,2600"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") >= 2 and "Roofline: ceilings measured on CPU" in dom  # parsed as SVG, text kept
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image  # comes with matplotlib

    pixels = Image.open(shot).convert("RGB").getcolors(maxcolors=2**24)  # [(count, (r, g, b)), ...]

    def painted(hex_colour: str) -> int:
        rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        return sum(n for n, colour in pixels if all(abs(a - b) <= 8 for a, b in zip(colour, rgb)))

    # The roofline's points wear their dtype's colour; the breakdown's one bar spans the full width
    # whatever the measured shares, in the colours of its modules.
    bar_colours = {module_colours()[m] for m in ("attention", "mlp", "norms+residuals", "embedding+head")}
    dtypes = sorted({m.dtype for m in load_run(cpu_run).of_kind("op") if m.flops})
    assert painted(dtype_colours(dtypes)[dtypes[0]]) > 100
    assert sum(map(painted, bar_colours)) > 10_000
