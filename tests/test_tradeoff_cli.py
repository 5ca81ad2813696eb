"""The trade-off commands on a run of the suite: tradeoff (inference and training), simulate, idealized, and
the report's frontier chart. One small CPU run serves them all."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opbench.cli import main

ROOT = Path(__file__).resolve().parent.parent
# what the trade-offs compose: every op of an inference and a training plan, in one dtype
OPS = "gemm or attention or rmsnorm or swiglu or embedding or add or rotary or kv_write or adamw or cross_entropy"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "small.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--model", "tiny", "--dtype", "bf16", "-q",
                           "-p", "no:cacheprovider", "-k", OPS, f"--benchmark-json={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def run_cli(capsys, *argv):
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_tradeoff_prints_the_frontier_and_a_choice_saying_it_is_modeled(small_run, capsys):
    out = run_cli(capsys, "tradeoff", small_run, "--model", "llama-3-8b", "--prompt", 1024, "--output", 256,
                  "--slo", "ttft=2s,tpot=100ms")
    assert "MODELED: of" in out and "not a measurement" in out
    assert "Pareto frontier" in out and re.search(r"^  tp=\d b=\d+ bf16 graph", out, re.M)
    assert "SLO ttft <= 2 s, tpot <= 100 ms:" in out and "  choice: " in out
    data = json.loads(run_cli(capsys, "tradeoff", small_run, "--model", "llama-3-8b", "--prompt", 1024, "--output",
                              256, "--slo", "ttft=2s,tpot=100ms", "--json"))
    assert data["sources"]["measured"] == 0 and data["frontier"]
    fitting = {c["label"] for c in data["configurations"] if c["fits"]}
    assert set(data["frontier"]) <= fitting
    assert data["slo"]["slo_s"] == {"ttft": 2.0, "tpot": 0.1}
    # a generous SLO is met; the choice is the cheapest configuration that meets it
    data = json.loads(run_cli(capsys, "tradeoff", small_run, "--model", "llama-3-8b", "--slo", "ttft=1000h,tpot=1000h",
                              "--json"))
    cheapest = min((c for c in data["configurations"] if c["fits"]), key=lambda c: c["gpu_s_per_1k_tokens"])
    assert data["slo"]["choice"]["label"] == cheapest["label"]


def test_simulate_prints_percentiles_within_ten_seconds(small_run, capsys):
    start = time.perf_counter()
    out = run_cli(capsys, "simulate", small_run, "--model", "llama-3-8b", "--rate", 2, "--requests", 500, "--seed", 1)
    assert time.perf_counter() - start < 10
    assert re.search(r"^  TTFT +\S", out, re.M) and re.search(r"^  TPOT", out, re.M) and "end-to-end" in out
    assert "p50" in out and "p99" in out and "Little's law" in out and "assumed: continuous batching" in out
    again = run_cli(capsys, "simulate", small_run, "--model", "llama-3-8b", "--rate", 2, "--requests", 500, "--seed", 1)
    assert again.split("wall time")[0] == out.split("wall time")[0]  # deterministic for a seed


def test_training_tradeoff_lists_zero_stages_with_memory(small_run, capsys):
    out = run_cli(capsys, "tradeoff", small_run, "--model", "llama-2-7b", "--train", "--global-batch", 1024, "--seq",
                  4096, "--max-gpus", 64)
    for stage in ("zero-0", "zero-1", "zero-2", "zero-3", "zero-2 offload"):
        assert re.search(rf"^  {stage} ", out, re.M), stage
    assert "GiB" in out and "Pareto frontier, step time" in out
    data = json.loads(run_cli(capsys, "tradeoff", small_run, "--model", "llama-2-7b", "--train", "--global-batch", 64,
                              "--seq", 2048, "--max-gpus", 16, "--step-time", "1000h", "--json"))
    assert max(c["gpus"] for c in data["configurations"]) <= 16
    assert data["slo"]["choice"]["fits"]


def test_idealized_writes_helms_file(small_run, capsys, tmp_path):
    out = tmp_path / "helm.json"
    run_cli(capsys, "idealized", small_run, "--model", "llama-3-8b", "-o", out)
    data = json.loads(out.read_text())
    assert list(data) == ["meta/llama-3-8b"]
    assert set(data["meta/llama-3-8b"]) == {"runtime_per_output_token", "runtime_for_prompt_tokens"}
    table = run_cli(capsys, "idealized", small_run, "--model", "llama-3-8b", "--frontier", "--gpu-hour-usd", 2.5)
    assert "per output token" in table and "$/1k requests" in table


def test_report_has_the_frontier_chart(small_run, tmp_path, capsys):
    page = tmp_path / "report.html"
    run_cli(capsys, "report", small_run, "-o", page, "--tradeoff-model", "llama-3-8b")
    html = page.read_text()
    assert "<section id=tradeoff>" in html
    svg = re.search(r"<section id=tradeoff>.*?(<svg.*?</svg>)", html, re.S).group(1)
    assert 'id="frontier-llama-3-8b-frontier-line"' in svg and 'id="frontier-llama-3-8b-frontier-bf16"' in svg
    assert "MODELED from this run" in svg and "GPU-seconds per 1,000 output tokens" in svg


def _browser():
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium or Chrome installed")
def test_the_frontier_chart_renders_in_a_headless_browser(small_run, tmp_path, capsys):
    page = tmp_path / "report.html"
    run_cli(capsys, "report", small_run, "-o", page, "--tradeoff-model", "llama-3-8b")
    html = page.read_text()  # the trade-off section alone, so that the screenshot holds its chart
    head, section = html[:html.index("<body>") + 6], re.search(r"<section id=tradeoff>.*?</section>", html, re.S)
    alone = tmp_path / "tradeoff.html"
    alone.write_text(head + section.group(0) + "</body></html>")
    flags = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,1400"]
    dom = subprocess.run([*flags, "--dump-dom", alone.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") == 1 and "end-to-end latency per request" in dom
    shot = tmp_path / "frontier.png"
    subprocess.run([*flags, f"--screenshot={shot}", alone.as_uri()], capture_output=True, timeout=120)
    from PIL import Image  # comes with matplotlib

    pixels = Image.open(shot).convert("RGB").getcolors(maxcolors=2**24)

    def painted(rgb) -> int:
        return sum(n for n, colour in pixels if all(abs(a - b) <= 6 for a, b in zip(colour, rgb)))

    assert painted((0x22, 0x22, 0x22)) > 300  # the frontier's points, staircase and labels
    assert painted((0xBB, 0xBB, 0xBB)) > 300  # the dominated configurations
