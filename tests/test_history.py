"""`opbench history` on synthetic histories built from real records (OpCase(...).to_info() in
pytest-benchmark's JSON): steps found where they are, attributed to the version that moved there,
clock drops explained away, unstable records never flagged; and the trends of the report."""

import json
import math
import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from opbench.analyze import history as hist
from opbench.analyze.history import Thresholds, build_history, case_id, fit_steps, robust_sigma
from opbench.analyze.runs import load_run
from opbench.cli import main
from opbench.record import GpuState, OpCase, Stability

H100 = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "vbios": "96.00.99.00.01", "max_sm_clock_mhz": 1980,
        "app_sm_clock_mhz": 1980, "power_limit_w": 700.0, "ecc_enabled": True, "mig_enabled": False}
A100 = {**H100, "name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-2"}
BASE_CLOCK_MHZ, LOW_CLOCK_MHZ = 1980.0, 1700.0
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def machine(driver="550.54.15", torch="2.12.0", gpu=H100, triton="3.4.0", cuda="12.8") -> dict:
    return {"machine": "x86_64", "system": "Linux", "release": "6.8", "python_implementation": "CPython",
            "python_version": "3.12.3", "cpu": {"brand_raw": "Intel Xeon"},
            "gpu": {"available": True, "driver": driver, "cuda_driver": "12.8", "devices": [gpu],
                    "used_uuid": gpu["uuid"]},
            "software": {"torch": torch, "cuda_runtime": cuda, "triton": triton, "nccl": "2.27.3"}}


def record(op: str, shape: dict, median_s: float, *, clock_mhz: float | None = BASE_CLOCK_MHZ, stable=True,
           throttled=(), dtype="bf16", backend="torch", rng=None) -> OpCase:
    """A case whose 30 rounds lie within 0.2% of `median_s` (a tight, stable median), or spread over 5%
    and marked unstable (its median's confidence interval is some 2% wide)."""
    rng = rng or random.Random(0)
    spread = 0.002 if stable else 0.05
    st = Stability.of([median_s * (1 + rng.gauss(0, spread)) for _ in range(30)], stable_ci_rel=0.005)
    st = replace(st, stable=stable)
    gpu = (GpuState(clock_mhz, 600.0, 70.0, 40, 0.0, 0.0, tuple(throttled)) if clock_mhz else None)
    return OpCase(op=op, backend=backend, shape=shape, dtype=dtype, timer="cuda-graph", l2="rotate",
                  median_s=st.median_s, stability=st, gpu=gpu, flops=1, bytes=1)


def bench_entry(m: OpCase) -> dict:
    param = case_id(m).split("[", 1)[1][:-1]
    s = m.stability
    return {"name": f"test_{m.op}[{param}]", "fullname": f"bench/test_{m.op}.py::test_{m.op}[{param}]",
            "param": param, "group": None, "params": {}, "extra_info": m.to_info(), "options": {},
            "stats": {"min": s.min_s, "max": s.max_s, "median": s.median_s, "q1": s.q1_s, "q3": s.q3_s,
                      "rounds": s.rounds, "mean": s.median_s}}


def write_run(folder: Path, number: int, records: list[OpCase], machine_info: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{number:04d}_run.json"
    data = {"machine_info": machine_info, "commit_info": {}, "benchmarks": [bench_entry(m) for m in records],
            "datetime": (START + timedelta(days=number)).isoformat(), "version": "5.3.1",
            "opbench": {"device": "cuda", "profile": "default", "plans": []}}
    path.write_text(json.dumps(data))
    return path


# The cases of the synthetic card: (op, shape, usual median, run-to-run noise)
CASES = [("gemm", {"m": 4096, "n": 4096, "k": 4096}, 180e-6, 0.010),  # the one that steps
         ("gemm", {"m": 4096, "n": 14336, "k": 4096}, 610e-6, 0.015),
         ("gemm", {"m": 16, "n": 4096, "k": 4096}, 22e-6, 0.020),
         ("gemm", {"m": 8192, "n": 1024, "k": 4096}, 95e-6, 0.012),
         ("rmsnorm", {"tokens": 4096, "width": 4096}, 31e-6, 0.015),
         ("rmsnorm", {"tokens": 16, "width": 4096}, 4.1e-6, 0.020),
         ("rmsnorm", {"tokens": 8192, "width": 8192}, 118e-6, 0.010),
         ("gemm", {"m": 2048, "n": 2048, "k": 8192}, 140e-6, 0.018)]
STEP_CASE = 0
STEP_RUN, STEP_RISE = 12, 0.08  # runs numbered from 1, as `opbench history` prints them
CLOCK_RUN = 15
RISE_CASE = 6  # rmsnorm 8192x8192, 1% noise


def synthetic_history(folder: Path, seed: int, runs: int = 20, *, unstable_jump_at: int | None = None,
                      last_run_rise: float = 0.0) -> list[Path]:
    """`runs` runs of CASES: case STEP_CASE 8% slower from run 12 on, where torch went 2.12 -> 2.13; from
    run 15 the card's SM clock is 1700 MHz instead of 1980, every time longer in proportion; with
    `unstable_jump_at`, an extra case marked unstable that jumps 20% there; with `last_run_rise`, case
    RISE_CASE that much slower in the last run."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(1, runs + 1):
        clock = LOW_CLOCK_MHZ if n >= CLOCK_RUN else BASE_CLOCK_MHZ
        records = []
        for i, (op, shape, usual_s, noise) in enumerate(CASES):
            t = usual_s * math.exp(rng.gauss(0, noise)) * BASE_CLOCK_MHZ / clock  # the same cycles at a lower clock
            if i == STEP_CASE and n >= STEP_RUN:
                t *= 1 + STEP_RISE
            if i == RISE_CASE and n == runs:
                t *= 1 + last_run_rise
            records.append(record(op, shape, t, clock_mhz=clock, rng=rng))
        if unstable_jump_at is not None:
            t = 55e-6 * math.exp(rng.gauss(0, 0.01)) * (1.2 if n >= unstable_jump_at else 1.0) * BASE_CLOCK_MHZ / clock
            records.append(record("gemm", {"m": 1, "n": 8192, "k": 8192}, t, clock_mhz=clock, stable=False, rng=rng))
        torch = "2.13.0" if n >= STEP_RUN else "2.12.0"
        paths.append(write_run(folder, n, records, machine(torch=torch)))
    return paths


def flagged_events(h: hist.History) -> set[tuple[str, int]]:
    """(case id, run number) of every flagged step and every flagged newest run."""
    events = {(case_id(c.case), s.run + 1) for c, s in h.flagged}
    events |= {(case_id(c.case), len(h.runs)) for c in h.cases if c.lookback and c.lookback.verdict in hist.FLAGGED}
    return events


def precision_recall(found: set, truth: set) -> tuple[float, float]:
    hits = len(found & truth)
    return (hits / len(found) if found else 1.0), (hits / len(truth) if truth else 1.0)


# ------------------------------------------------------------------------------------------- the method

def test_fit_steps_finds_a_level_change_and_nothing_in_a_flat_series():
    xs = [0.0, 0.01, -0.01, 0.0, 0.3, 0.31, 0.29, 0.3]
    bounds, levels = fit_steps(xs, gamma=0.1)
    assert bounds == [4]
    assert levels[0] == pytest.approx(0.0, abs=0.01) and levels[-1] == pytest.approx(0.3, abs=0.01)
    assert fit_steps(xs, gamma=5.0)[0] == []  # a penalty above the gain keeps one level
    assert fit_steps([0.0, 0.01, -0.01, 0.0], gamma=0.1)[0] == []


def test_fit_steps_is_the_exact_minimum():
    """Against every segmentation of short random series: the dynamic programme finds the least cost."""
    import itertools
    rng = random.Random(3)
    for _ in range(30):
        xs = [rng.gauss(0, 1) + (2 if i > 3 else 0) for i in range(7)]
        gamma = rng.uniform(0.2, 3)

        def cost(bounds, xs=xs, gamma=gamma):
            edges = [0, *bounds, len(xs)]
            total = gamma * len(bounds)
            for a, b in zip(edges, edges[1:]):
                seg = sorted(xs[a:b])
                med = seg[len(seg) // 2]
                total += sum(abs(x - med) for x in seg)
            return total
        best = min(cost(list(c)) for k in range(len(xs)) for c in itertools.combinations(range(1, len(xs)), k))
        assert cost(fit_steps(xs, gamma)[0]) == pytest.approx(best)


def test_robust_sigma_ignores_a_step():
    rng = random.Random(1)
    xs = [rng.gauss(0, 0.01) + (0.5 if i >= 10 else 0) for i in range(40)]
    assert robust_sigma(xs) == pytest.approx(0.01, rel=0.4)


def test_step_penalty_calibration():
    """The penalty STEP_BETA x noise, in 20-run series of Gaussian noise (the noise estimated from the series
    as the history does): few spurious steps, and a step of four times the noise found where it is."""
    rng = random.Random(11)
    trials, sigma = 300, 0.015

    def detect(step: float) -> list[int]:
        xs = [rng.gauss(0, sigma) + (math.log(1 + step) if i >= 11 else 0) for i in range(20)]
        return fit_steps(xs, hist.STEP_BETA * max(robust_sigma(xs), hist.MIN_SIGMA_REL))[0]
    spurious = sum(bool(detect(0.0)) for _ in range(trials)) / trials
    found = sum(detect(4 * sigma) == [11] for _ in range(trials)) / trials
    assert spurious <= 0.03 and found >= 0.85, (spurious, found)


# ------------------------------------------------------------------------------------------- histories

def test_step_found_at_run_12_attributed_to_torch_and_clock_drop_explained(tmp_path):
    h = build_history([load_run(p) for p in synthetic_history(tmp_path, seed=0)])
    assert h.reference_clock_mhz == pytest.approx(BASE_CLOCK_MHZ)  # 14 of 20 runs at 1980 MHz
    [(case, step)] = h.flagged
    assert case_id(case.case) == "gemm[4096x4096x4096-bf16-fwd-torch]"
    assert (step.run + 1, step.prev_run + 1) == (STEP_RUN, STEP_RUN - 1)
    assert step.verdict == "regression" and step.change == pytest.approx(STEP_RISE, abs=0.02)
    assert step.environment == (("torch", "2.12.0", "2.13.0"),)
    assert hist.change_text(step.environment) == "torch 2.12.0 -> 2.13.0"
    # the raw times of every case jump 16% at run 15; in cycles nothing moved: "clock", never flagged
    for c in h.cases:
        clock_steps = [s for s in c.steps if s.run + 1 == CLOCK_RUN]
        assert [s.verdict for s in clock_steps] == ["clock"], c.label
        assert "1980 MHz -> 1700 MHz" in clock_steps[0].why
    assert all(c.verdict in ("same", "clock") for c in h.cases)  # the newest run is like the ones before
    families = {f.op: f for f in h.families}
    assert not [s for f in families.values() for s in f.steps if s.flagged]  # 8% of one case in five: 1.6%


def test_precision_and_recall_of_flagged_steps_over_many_histories(tmp_path):
    found, truth = set(), set()
    for seed in range(12):
        h = build_history([load_run(p) for p in synthetic_history(tmp_path / str(seed), seed)])
        found |= {(seed, *e) for e in flagged_events(h)}
        truth.add((seed, "gemm[4096x4096x4096-bf16-fwd-torch]", STEP_RUN))
        [(_, step)] = h.flagged or [(None, None)]
        assert step is not None and step.environment == (("torch", "2.12.0", "2.13.0"),), seed
    precision, recall = precision_recall(found, truth)
    print(f"flagged steps over 12 synthetic histories: precision {precision:.2f}, recall {recall:.2f}")
    assert (precision, recall) == (1.0, 1.0)


def test_without_normalisation_the_clock_drop_would_be_flagged(tmp_path):
    """The same history with the clocks stripped from the records: the drop at run 15 is a step in every
    case; what the clock normalisation saves the reader from."""
    paths = synthetic_history(tmp_path, seed=0)
    for p in paths:
        data = json.loads(p.read_text())
        for b in data["benchmarks"]:
            b["extra_info"]["gpu"] = None
        p.write_text(json.dumps(data))
    h = build_history([load_run(p) for p in paths])
    at_clock = {case_id(c.case) for c, s in h.flagged if s.run + 1 == CLOCK_RUN}
    assert len(at_clock) == len(CASES)


def test_unstable_case_with_a_20_percent_jump_is_ambiguous(tmp_path):
    h = build_history([load_run(p) for p in synthetic_history(tmp_path, seed=1, unstable_jump_at=8)])
    [unstable] = [c for c in h.cases if c.case.shape == {"m": 1, "n": 8192, "k": 8192}]
    [jump] = [s for s in unstable.steps if s.run + 1 == 8]
    assert jump.verdict == "ambiguous" and jump.change == pytest.approx(0.2, abs=0.03)
    assert "unstable record" in jump.why
    assert not unstable.flagged
    assert flagged_events(h) == {("gemm[4096x4096x4096-bf16-fwd-torch]", STEP_RUN)}


def test_unstable_jump_in_the_newest_run_is_ambiguous_and_exits_0(tmp_path, capsys):
    synthetic_history(tmp_path, seed=2, unstable_jump_at=20)
    assert main(["history", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    per_case = out[out.index("per case, the newest run"):]
    line = next(l for l in per_case.splitlines() if l.strip().startswith("gemm 1x8192x8192"))
    assert line.rstrip().endswith("ambiguous")


def test_newest_run_regression_exits_1_with_json(tmp_path, capsys):
    synthetic_history(tmp_path, seed=3, last_run_rise=0.12)
    assert main(["history", str(tmp_path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    [h] = data["histories"]
    assert h["newest_regressions"] == ["rmsnorm[8192x8192-bf16-fwd-torch]"]
    [case] = [c for c in h["cases"] if c["case"] == "rmsnorm[8192x8192-bf16-fwd-torch]"]
    assert case["verdict"] == "regression" and case["lookback"]["z"] > hist.DEFAULT_Z
    assert case["lookback"]["change"] == pytest.approx(0.12, abs=0.03)
    assert {(f["case"], f["run"]) for f in h["flagged"]} >= {("gemm[4096x4096x4096-bf16-fwd-torch]", STEP_RUN)}
    assert h["runs"][11]["versions"]["torch"] == "2.13.0"
    # a threshold above the rise for that case lets the run pass
    assert main(["history", str(tmp_path), "--threshold", "rmsnorm[8192x*]=15%"]) == 0


def test_throttled_step_is_not_a_regression(tmp_path):
    paths = synthetic_history(tmp_path, seed=4)
    for p in paths[STEP_RUN - 1:STEP_RUN]:  # the card held back by its power limit in run 12
        data = json.loads(p.read_text())
        for b in data["benchmarks"]:
            b["extra_info"]["gpu"]["throttled"] = ["sw_power_cap"]
        p.write_text(json.dumps(data))
    h = build_history([load_run(p) for p in paths])
    [case] = [c for c in h.cases if case_id(c.case) == "gemm[4096x4096x4096-bf16-fwd-torch]"]
    [step] = [s for s in case.steps if s.run + 1 == STEP_RUN]
    assert step.verdict == "throttled" and step.why == "sw_power_cap"
    assert not h.flagged


def test_thresholds_per_family_and_per_case():
    t = Thresholds.parse("4%,gemm=3%,attention=5%,gemm[16x*]=9", {"gemm"})
    big = record("gemm", {"m": 4096, "n": 4096, "k": 4096}, 1e-4)
    small = record("gemm", {"m": 16, "n": 4096, "k": 4096}, 1e-5)
    norm = record("rmsnorm", {"tokens": 16, "width": 4096}, 1e-5)
    assert (t.of(big), t.of(small), t.of(norm)) == (0.03, 0.09, 0.04)
    assert t.families == {"gemm": 0.03, "attention": 0.05}
    assert Thresholds.parse(None).default == 0.05
    with pytest.raises(hist.HistoryError, match="KEY=PCT"):
        Thresholds.parse("gemm=fast")


def test_family_threshold_above_the_step_silences_it(tmp_path):
    paths = synthetic_history(tmp_path, seed=0)
    h = build_history([load_run(p) for p in paths], thresholds=Thresholds.parse("gemm=10%"))
    assert not h.flagged
    [case] = [c for c in h.cases if case_id(c.case) == "gemm[4096x4096x4096-bf16-fwd-torch]"]
    assert [s.verdict for s in case.steps if s.run + 1 == STEP_RUN] == ["same"]


def test_family_aggregate_steps_when_every_case_moves(tmp_path):
    """A new driver slows every GEMM by 10% from run 9: each case and the family's geometric mean step there."""
    rng = random.Random(5)
    for n in range(1, 17):
        driver = "560.28.03" if n >= 9 else "550.54.15"
        records = [record(op, shape, usual * math.exp(rng.gauss(0, noise)) * (1.1 if op == "gemm" and n >= 9 else 1),
                          rng=rng) for op, shape, usual, noise in CASES]
        write_run(tmp_path, n, records, machine(driver=driver))
    [h], _ = hist.histories([str(tmp_path)])
    [gemm] = [f for f in h.families if f.op == "gemm"]
    [step] = [s for s in gemm.steps if s.verdict != "same"]
    assert (step.run + 1, step.verdict) == (9, "regression")
    assert hist.change_text(step.environment) == "driver 550.54.15 -> 560.28.03"
    assert {s.run + 1 for _, s in h.flagged} == {9}
    assert len(h.flagged) == sum(op == "gemm" for op, *_ in CASES)


def test_order_by_version_and_cards_kept_apart(tmp_path):
    rng = random.Random(6)
    # saved out of version order in time: 2.10 was installed after 2.9 but tested before it
    for n, torch in enumerate(["2.10.0", "2.9.1", "2.13.0", "2.11.0"], 1):
        write_run(tmp_path / "h100", n, [record(*CASES[0][:3], rng=rng)], machine(torch=torch))
    write_run(tmp_path / "a100", 1, [record(*CASES[0][:3], rng=rng)], machine(gpu=A100))
    found, _ = hist.histories([str(tmp_path)], by="torch")
    assert [h.card for h in found] == ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    versions = [r.machine_info["software"]["torch"] for r in found[1].runs]
    assert versions == ["2.9.1", "2.10.0", "2.11.0", "2.13.0"]
    with pytest.raises(hist.HistoryError, match="a history is one card's"):
        build_history([r for h in found for r in h.runs])
    with pytest.raises(hist.HistoryError, match="no run records a driver"):
        hist.order_runs([replace(r, machine_info={"cpu": {}}) for r in found[1].runs], "driver")


def test_history_of_a_folder_without_runs_is_an_error(tmp_path, capsys):
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["history", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no opbench runs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the report

def test_report_shows_trend_charts_with_steps_and_versions(tmp_path):
    pytest.importorskip("matplotlib")
    paths = synthetic_history(tmp_path / "runs", seed=0)
    out = tmp_path / "report.html"
    assert main(["report", str(paths[-1]), "--history", str(tmp_path / "runs"), "-o", str(out)]) == 0
    page = out.read_text()
    trends = page[page.index("<section id=trends>"):page.index("<section id=roofline>")]
    assert trends.count("<svg") == 1 + 2  # the flagged case, and the gemm and rmsnorm families
    assert 'id="trend-case-0-' in trends and "trend-case-0-step-" in trends
    assert "#12 regression: torch 2.12.0 -&gt; 2.13.0" in trends  # the step's label inside the chart
    assert "#15 clock" in trends  # the clock drop drawn, in its own colour, not as a regression
    assert trends.count("<tr>") >= 1 + 20  # the version table: a header and a row per run
    assert "0020_run.json" in trends
