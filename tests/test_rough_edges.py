"""The commands and the plugin say what is wrong in one line, show one step in text and JSON alike,
label figures by the run's device, and the pytest run reads well (summary last, tables optional)."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from opbench.analyze import charts, report
from opbench.analyze.alphabeta import predict
from opbench.analyze.compose import POLICIES, Composer
from opbench.analyze.estimate import fewest_gpus, memory
from opbench.analyze.runs import load_run
from opbench.analyze.session import compose_session
from opbench.cli import SIGPIPE_STATUS, main
from opbench.measure import plugin
from opbench.measure.cases import build_cases
from opbench.measure.selection import select
from opbench.measure.summary import composition_lines, summary_lines
from opbench.ops import FAMILIES, get_family
from opbench.ops.backends import GROUPS
from opbench.ops.collective import COLLECTIVES
from opbench.ops.dtypes import DTYPES
from opbench.record import OpCase
from opbench.spec.models import ZOO
from opbench.spec.plan import plan
from opbench.spec.workload import WORKLOAD_SYNTAX, PlanError, Workload, parse_workload
from opbench.text import format_flops, format_seconds

from tests.helpers import ROOT, run_pytest
from tests.planned_runs import collective_record, fit_of, op_records, unit_record, write_run

TINY_TRAIN = ["--model", "tiny", "--phase", "train", "--batch", "2", "--context", "96", "--dtype", "fp32"]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `opbench argv`."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code
    out = capsys.readouterr()
    return status, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opbench: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def train_run(tmp_path):
    p = plan(ZOO["tiny"], Workload("train", 2, 96, dtype="fp32"))
    return write_run(tmp_path / "train.json", op_records([p], lambda c: 1e-5 if c.pass_ == "fwd" else 2e-5), plans=[p])


# `opbench estimate`: the text is the JSON's step ---------------------------------------------------------

def test_estimate_text_and_json_show_the_same_step(train_run, capsys):
    options = [*TINY_TRAIN, "--recompute", "--dp", "4", "--no-overlap"]
    _, text, _ = _cli(capsys, "estimate", train_run, *options)
    _, out, _ = _cli(capsys, "estimate", train_run, *options, "--json")
    data = json.loads(out)
    breakdown, est = data["breakdown"], data["estimate"]
    assert breakdown["total_s"] == pytest.approx(est["time_s"])
    assert any(c["role"] == "dp.allreduce.grads" for c in breakdown["calls"])
    assert any(c["role"].endswith(".recompute") for c in breakdown["calls"])
    assert f": step {format_seconds(est['time_s'])} " in text
    modules = sorted(breakdown["modules"].items(), key=lambda kv: -kv[1]["time_s"])
    assert "  " + " | ".join(f"{m} {format_seconds(v['time_s'])} {100 * v['share']:.1f}%" for m, v in modules) in text
    assert "communication" in breakdown["modules"] and f"{est['tokens_per_s_per_gpu']:.4g} tokens/s" in text


def test_recompute_keeps_each_layers_input_only():
    m, w = ZOO["llama-2-70b"], Workload("train", 1, 4096)
    sbh = 4096 * 1 * 8192
    assert memory(m, w).activations_bytes == 80 * int(sbh * 34)
    assert memory(m, w, recompute=True).activations_bytes == 80 * 2 * sbh + int(sbh * 34)
    # at tp=16 the state (69 GB) and the inputs of the layers fit in 90% of 80 GiB; all activations do not
    assert fewest_gpus(m, w, 80 * 2**30) == 32 and fewest_gpus(m, w, 80 * 2**30, recompute=True) == 16


def test_estimate_recompute_changes_memory_and_fewest_gpus(tmp_path, capsys):
    p = plan(ZOO["llama-2-70b"], Workload("train", 1, 4096))
    run = write_run(tmp_path / "70b.json", op_records([p]), plans=[p])
    options = ["--model", "llama-2-70b", "--phase", "train", "--context", "4096", "--gpu-memory-gib", "80", "--json"]
    plain = json.loads(_cli(capsys, "estimate", run, *options)[1])
    recompute = json.loads(_cli(capsys, "estimate", run, *options, "--recompute")[1])
    assert (plain["fewest_gpus"], recompute["fewest_gpus"]) == (32, 16)
    assert recompute["estimate"]["memory"]["activations_bytes"] < plain["estimate"]["memory"]["activations_bytes"]


# One line, never a traceback --------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--dp", "0"], "argument --dp: must be a positive integer, got '0'"),
    (["--gpu-memory-gib", "-5"], "argument --gpu-memory-gib: must be a positive number, got '-5'"),
    (["--policy", "bogus"], "unknown policy 'bogus': a policy is fastest, eager, vendor, triton"),
])
def test_estimate_usage_errors_are_one_line(train_run, capsys, extra, message):
    status, _, err = _cli(capsys, "estimate", train_run, *TINY_TRAIN, *extra)
    assert status == 2 and message in _one_error_line(err)


def test_output_files_in_missing_folders_are_one_line_errors(tmp_path, capsys):
    plans = [plan(ZOO["tiny"], Workload(phase, 1, n, dtype="fp32")) for phase, n in (("prefill", 96), ("decode", 512))]
    run = write_run(tmp_path / "inference.json", op_records(plans), plans=plans)
    for argv in (["report", run, "-o", tmp_path / "missing" / "r.html"],
                 ["idealized", run, "--model", "tiny", "--name", "test/tiny", "--dtype", "fp32", "-o", tmp_path / "missing" / "x.json"]):
        status, _, err = _cli(capsys, *argv)
        assert status == 2 and f"cannot write {tmp_path / 'missing'}" in _one_error_line(err)


def test_a_closed_pipe_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # `| head` that has read all it wanted
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "opbench", "models"], stdout=write, stderr=subprocess.PIPE,
                              cwd=ROOT, env=env, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == SIGPIPE_STATUS and proc.stderr == b""


# Say what is wrong ------------------------------------------------------------------------------------

def test_a_collectives_run_given_for_an_op_run_says_so(tmp_path, capsys):
    coll = write_run(tmp_path / "coll.json", [collective_record("allreduce", 2**20, 2, "fp32", 1e-4)],
                     collectives={"fits": [fit_of("allreduce", "fp32", 1e-5, 1.0).to_dict()]})
    status, _, err = _cli(capsys, "estimate", coll, *TINY_TRAIN)
    line = _one_error_line(err)
    assert status == 2 and "is a collectives run" in line and "--collectives" in line and "embedding" not in line


def test_report_peaks_from_a_run_without_peaks_is_an_error(train_run, tmp_path, capsys):
    status, _, err = _cli(capsys, "report", train_run, "--peaks", train_run, "-o", tmp_path / "r.html")
    assert status == 2 and "has no peak cases" in _one_error_line(err)
    assert not (tmp_path / "r.html").exists()


def test_cpu_runs_say_cpu(train_run, capsys):
    _, text, _ = _cli(capsys, "estimate", train_run, *TINY_TRAIN)
    assert "tokens/s per CPU" in text and "CPU-s per 1k tokens" in text and "memory per CPU" in text
    assert "GPU" not in text


def test_cpu_rates_read_in_gflops():
    assert format_flops(6.44e8) == "0.644 GFLOP/s" and format_flops(795e12) == "795 TFLOP/s"
    case = OpCase(op="gemm", backend="torch", dtype="fp32", shape={"m": 8, "n": 8, "k": 8}, flops=644,
                  bytes=768, timer="cpu", median_s=1e-6)
    table = "\n".join(summary_lines([case], "cpu"))
    assert "0.644 GFLOP/s" in table and "0.000644" not in table
    assert report._rate(case) == "0.644 GFLOP/s"


def test_units_are_counted_not_silently_dropped_by_compare(tmp_path, capsys):
    p = plan(ZOO["tiny"], Workload("prefill", 2, 96, dtype="fp32"))
    records = op_records([p])
    base = write_run(tmp_path / "a.json", [*records, unit_record(p, "layer", 1e-3), unit_record(p, "model", 3e-3)])
    new = write_run(tmp_path / "b.json", [*records, unit_record(p, "layer", 1e-3)])
    status, out, _ = _cli(capsys, "compare", base, new)
    assert status == 0
    assert ("units (a decoder layer or a small model timed whole): 2 in base, 1 in new; validation figures of "
            "the composition (opbench estimates), not compared") in out


def test_one_workload_syntax_everywhere(capsys):
    assert "smin=" in WORKLOAD_SYNTAX
    _, out, _ = _cli(capsys, "plan", "--help")
    assert WORKLOAD_SYNTAX in "".join(out.split())  # argparse may wrap the long syntax anywhere
    with pytest.raises(PlanError, match=re.escape(WORKLOAD_SYNTAX)):
        parse_workload("decode b=1")
    options = {}

    class Group:
        def addoption(self, name, **kwargs):
            options[name] = kwargs

    class Parser:
        def getgroup(self, *args):
            return Group()
    plugin.pytest_addoption(Parser())
    assert options["--workload"]["metavar"] == WORKLOAD_SYNTAX


def test_parametrize_takes_lists_not_iterators():
    if not hasattr(pytest, "PytestRemovedIn10Warning"):
        pytest.skip(f"pytest {pytest.__version__} does not warn of what pytest 10 removes")
    proc = run_pytest("tests/test_tokenwise_kernels.py", "--collect-only", "-q", "-W",
                      "error::pytest.PytestRemovedIn10Warning", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]


# "not composed": every missing op once, one command ---------------------------------------------------

def test_missing_ops_are_listed_once_with_one_command():
    plans = [plan(ZOO["tiny"], parse_workload(w, d)) for w in ("prefill:b=2,s=96", "decode:b=4,s=200,smin=40")
             for d in ("fp32", "bf16")]
    result = compose_session(plans, op_records(plans, leave_out=("embedding", "gemm")))
    lines = composition_lines(result, "cpu")
    missing = [line for line in lines if line.startswith("not composed")]
    assert missing == [f"not composed: 4 plans ({plans[0].name} (+3)) lack measurements of embedding, gemm"]
    command = next(line for line in lines if "measure them with" in line).split("with: ", 1)[1]
    words = shlex.split(command)
    assert words[:3] == ["pytest", "bench/test_embedding.py", "bench/test_gemm.py"]
    options = {k: [w for o, w in zip(words, words[1:]) if o == k] for k in ("--model", "--workload", "--dtype")}
    selected = select(profile=None, device="cpu", models=options["--model"], workloads=options["--workload"],
                      dtypes=options["--dtype"])
    assert {p.name for p in plans} <= {p.name for p in selected.plans}


# Backend families ----------------------------------------------------------------------------------------

def test_selection_and_composition_share_the_backend_groups():
    assert all(POLICIES[name] is GROUPS[name] for name in GROUPS)
    plans = [plan(ZOO["tiny"], Workload("prefill", 2, 96))]
    assert [c.backend for c in build_cases(plans, "attention", ["sdpa*"])] == \
        ["sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"]
    eager = {c.backend for op in ("attention", "gemm") for c in build_cases(plans, op, ["eager"])}
    assert eager == {"torch", "torch-eager", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"}
    assert {c.backend for c in build_cases(plans, "attention", ["triton"])} == {"triton", "triton-decode"}
    assert select(profile="smoke", device="cpu", backends=["torch"]).unserved() == {
        "attention": tuple(get_family("attention").backends), "adamw": ("torch-fused", "torch-foreach")}
    assert select(profile="smoke", device="cpu", backends=["torch,sdpa*,torch-*"]).unserved() == {}


def test_a_backend_selection_that_drops_a_planned_op_warns():
    proc = run_pytest("bench/test_attention.py", "--collect-only", "--backend", "torch", "--model", "tiny",
                      "--workload", "prefill:b=2,s=96", timeout=300)
    header = next(line for line in proc.stdout.splitlines() if line.startswith("opbench: --backend"))
    assert header.startswith("opbench: --backend torch leaves planned ops with no backend")
    assert "attention (its backends: sdpa-math" in header and "adamw" not in header  # no training planned
    assert "PytestConfigWarning: " + header in proc.stdout


# Collectives: fits by op and dtype, measured sizes measured -----------------------------------------------

def test_collectives_are_priced_by_their_dtype_and_measured_sizes_count():
    p = plan(ZOO["tiny"], Workload("prefill", 2, 96, tp=2, dtype="bf16"))
    records, size = op_records([p]), 192 * 192 * 2
    bf16, fp32 = fit_of("allreduce", "bf16", 2e-5, 10.0), fit_of("allreduce", "fp32", 1e-5, 1.0)

    def allreduces(composer):
        return [c for c in composer.compose(p).calls if c.op == "allreduce"]
    for c in allreduces(Composer(records, fits=[bf16, fp32])):
        assert (c.source, c.backend) == ("modeled", bf16.source)
        assert c.time_s == pytest.approx(predict("allreduce", c.time_s and size, 2, bf16))
    for c in allreduces(Composer(records, fits=[fp32])):
        assert c.backend == f"{fp32.source}; its fp32 fit stands for bf16"
    measured = collective_record("allreduce", size, 2, "bf16", 3e-4)
    for c in allreduces(Composer([*records, measured], fits=[bf16])):
        assert (c.source, c.time_s, c.backend) == ("measured", 3e-4, "gloo")


def test_estimate_counts_a_collectives_runs_measured_sizes(tmp_path, capsys):
    p = plan(ZOO["tiny"], Workload("prefill", 2, 96, tp=2, dtype="bf16"))
    run = write_run(tmp_path / "ops.json", op_records([p]), plans=[p])
    coll = write_run(tmp_path / "coll.json", [collective_record("allreduce", 192 * 192 * 2, 2, "bf16", 3e-4)],
                     collectives={"fits": [fit_of("allreduce", "bf16", 2e-5, 10.0).to_dict()]})
    _, out, _ = _cli(capsys, "estimate", run, "--model", "tiny", "--phase", "prefill", "--batch", "2", "--context",
                     "96", "--tp", "2", "--collectives", coll, "--json")
    calls = [c for c in json.loads(out)["breakdown"]["calls"] if c["op"] == "allreduce"]
    assert calls and all(c["source"] == "measured" and c["time_s"] == 3e-4 for c in calls)


# The roofline chart ------------------------------------------------------------------------------------

def test_every_family_and_dtype_has_its_own_marker_and_colour():
    ops = [op for op in FAMILIES if op not in COLLECTIVES] + list(COLLECTIVES)
    markers, colours = charts.family_markers(ops), charts.dtype_colours(DTYPES)
    assert len(set(markers.values())) == len(FAMILIES) and len(set(colours.values())) == len(DTYPES)
    pair = charts.family_markers(["add", "rmsnorm"])
    assert pair["add"] != pair["rmsnorm"]  # both were orange circles in bf16


def _legend(svg: str) -> list[tuple[str, str]]:
    """(marker outline, fill and stroke) of each entry of the roofline's legend that has a marker."""
    shapes = dict(re.findall(r'<path id="([^"]+)" d="([^"]+)"', svg))
    legend = svg[svg.index('id="roofline-legend_1"'):]
    return [(shapes[href], style.split("; stroke-width")[0])
            for href, style in re.findall(r'<use xlink:href="#([^"]+)"[^>]*style="([^"]*)"', legend)]


def _right_of_axes(svg: str) -> float:
    axes = svg[svg.index('id="roofline-patch_2"'):]
    return max(float(x) for x in re.findall(r"[ML] ([\d.]+) ", axes[:axes.index("</g>")]))


# A run of the suite itself: the summary comes last, the table can go ------------------------------------

@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A -k run of a few bench modules on one plan: its stdout and its JSON."""
    path = tmp_path_factory.mktemp("run") / "small.json"
    proc = run_pytest("bench/test_add.py", "bench/test_rmsnorm.py", "bench/test_add_rmsnorm.py",
                      "bench/test_embedding.py", "bench/test_gemm.py", "--model", "tiny", "--workload",
                      "prefill:b=2,s=96", "--dtype", "fp32", "-k", "torch", "-p", "no:cacheprovider",
                      f"--benchmark-json={path}", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, path


def test_the_opbench_summary_comes_after_pytest_benchmarks_table(small_run):
    out, _ = small_run
    assert "Name (time in" in out and out.index("opbench summary") > out.index("Name (time in")
    assert out.index("opbench estimates") > out.index("opbench summary")


def test_a_k_run_names_each_missing_op_once_with_one_command(small_run):
    out, _ = small_run
    missing = [line for line in out.splitlines() if line.startswith("not composed")]
    assert len(missing) == 1 and "rotary, kv_write, attention, swiglu" in missing[0], missing
    assert out.count("measure them with: pytest bench/test_rotary.py bench/test_kv_write.py "
                     "bench/test_attention.py bench/test_swiglu.py --model tiny") == 1


def test_benchmark_quiet_hides_the_table_and_keeps_the_summary():
    proc = run_pytest("bench/test_add.py", "--model", "tiny", "--workload", "prefill:b=2,s=96", "--dtype", "fp32",
                      "-k", "torch", "--benchmark-quiet", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Name (time in" not in proc.stdout and "opbench summary" in proc.stdout


def test_benchmark_disable_runs_the_gates_without_warnings():
    proc = run_pytest("bench/test_peaks.py", "bench/test_add.py", "--model", "tiny", "--workload",
                      "prefill:b=2,s=96", "--benchmark-disable", "-W",
                      "error::pytest_benchmark.logger.PytestBenchmarkWarning", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "passed" in proc.stdout and "not used at all" not in proc.stdout


def test_report_of_a_cpu_run(small_run, tmp_path, capsys):
    _, path = small_run
    status, _, _ = _cli(capsys, "report", path, "-o", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert status == 0 and "GFLOP/s" in page and "TFLOP/s" not in page
    run = load_run(path)
    svg = charts.roofline_svg(report._points(run), None)
    entries = _legend(svg)
    points = report._points(run)
    assert len(entries) == len({p.op for p in points}) + len({p.dtype for p in points})
    assert len(set(entries)) == len(entries)  # no two entries share marker and colour
    legend_x = [float(x) for x in re.findall(r'<use xlink:href="#[^"]+" x="([\d.]+)"',
                                             svg[svg.index('id="roofline-legend_1"'):])]
    assert min(legend_x) > _right_of_axes(svg)  # the legend sits right of the axes, off the points
