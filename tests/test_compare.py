"""`opbench compare`: matching, the regression rule (stability, drift, throttling, clocks), environments,
storage, and bad files."""

import json
import math

import pytest

from opbench.analyze.compare import Drift, compare_runs
from opbench.analyze.runs import label, load_run
from opbench.cli import main
from opbench.record import RECORD_VERSION, from_info

from tests.synthetic_runs import bench, gpu_state, machine, write_run


@pytest.fixture
def pair(tmp_path):
    """Write a base and a new run; returns a function taking their benchmark lists (and machine infos)."""
    def write(base, new, base_machine=None, new_machine=None):
        return (write_run(tmp_path / "base.json", base, base_machine),
                write_run(tmp_path / "new.json", new, new_machine))
    return write


def verdicts(c) -> dict[str, str]:
    return {label(ch.base): ch.verdict for ch in c.changes}


# Eleven GEMM shapes (odd sizes), each timed at its own median with tight rounds.
SHAPES = [(m, 96 + 32 * i, 72 + 8 * i) for i, m in enumerate((1, 3, 7, 17, 33, 65, 129, 257, 511, 1023, 2047))]


def suite(scale=lambda i: 1.0, spread=lambda i: 0.001, **per_case):
    """The eleven cases, case i at 10 us x (i + 1) x scale(i); per_case: {i: extra bench arguments}."""
    return [bench(m, n, k, 10e-6 * (i + 1) * scale(i), spread(i), **per_case.get(i, {}))
            for i, (m, n, k) in enumerate(SHAPES)]


def test_a_real_slowdown_is_a_regression_and_fails_the_command(pair, capsys):
    base, new = pair([bench(4096, 4096, 4096, 1.00e-3), bench(8, 4096, 4096, 20e-6)],
                     [bench(4096, 4096, 4096, 1.20e-3), bench(8, 4096, 4096, 20e-6)])
    c = compare_runs(load_run(base), load_run(new))
    assert [ch.base.shape for ch in c.regressions] == [{"m": 4096, "n": 4096, "k": 4096}]
    assert c.regressions[0].change == pytest.approx(0.20)
    assert main(["compare", str(base), str(new)]) == 1
    out = capsys.readouterr().out
    assert "regressions (1):" in out and "+20.0%" in out and "regression: 1," in out


def test_overlapping_rounds_are_ambiguous_and_a_small_change_is_the_same(pair):
    # 8% slower but the rounds' IQRs (+-6%) overlap; 3% slower with disjoint IQRs is under the threshold
    base, new = pair([bench(1024, 1024, 1024, 100e-6, spread=0.06), bench(2048, 1024, 1024, 100e-6, spread=0.001)],
                     [bench(1024, 1024, 1024, 108e-6, spread=0.06), bench(2048, 1024, 1024, 103e-6, spread=0.001)])
    c = compare_runs(load_run(base), load_run(new))
    assert not c.regressions
    assert verdicts(c) == {"gemm 1024x1024x1024 bf16 fwd torch": "ambiguous",
                           "gemm 2048x1024x1024 bf16 fwd torch": "same"}
    assert main(["compare", str(base), str(new)]) == 0


def test_an_unstable_record_makes_a_move_ambiguous_not_a_regression(pair, capsys):
    # one case of eleven moved 8% while its rounds spread wider (quartiles at +-6%, so its median's
    # confidence interval is wide): the move cannot be told from the case's own noise
    base, new = pair(suite(spread=lambda i: 0.06 if i == 4 else 0.001),
                     suite(scale=lambda i: 1.08 if i == 4 else 1.0, spread=lambda i: 0.06 if i == 4 else 0.001))
    base_run, new_run = load_run(base), load_run(new)
    moved = [m for m in new_run.measurements if m.shape["m"] == 33]
    assert [m.stability.stable for m in moved] == [False]
    assert moved[0].stability.iqr_rel > 0.08  # the spread is wider than the move
    c = compare_runs(base_run, new_run)
    assert verdicts(c)["gemm 33x224x104 bf16 fwd torch"] == "ambiguous"
    assert c.of("same") and len(c.of("same")) == 10 and not c.regressions
    assert main(["compare", str(base), str(new)]) == 0
    main(["compare", str(base), str(new), "--all"])
    out = capsys.readouterr().out
    assert "regression: 0," in out and "ambiguous: 1," in out
    assert "gemm 33x224x104 bf16 fwd torch" in out  # --all lists it


def test_disjoint_rounds_of_an_unstable_record_are_still_ambiguous(pair):
    base, new = pair([bench(96, 160, 200, 50e-6, spread=0.001)],
                     [bench(96, 160, 200, 60e-6, spread=0.001, stable=False)])
    (change,) = compare_runs(load_run(base), load_run(new)).changes
    assert change.change == pytest.approx(0.2) and change.verdict == "ambiguous"


def test_a_clean_shift_of_one_case_among_unchanged_ones_is_a_regression(pair, capsys):
    base, new = pair(suite(), suite(scale=lambda i: 1.10 if i == 7 else 1.0))
    c = compare_runs(load_run(base), load_run(new))
    assert [label(ch.base) for ch in c.regressions] == ["gemm 257x320x128 bf16 fwd torch"]
    assert c.regressions[0].change == pytest.approx(0.10)
    assert len(c.of("same")) == 10
    assert main(["compare", str(base), str(new)]) == 1
    assert "regressions (1):" in capsys.readouterr().out


def test_a_machine_that_moved_every_case_has_no_regression(pair, capsys):
    base, new = pair(suite(), suite(scale=lambda i: 1.07))
    c = compare_runs(load_run(base), load_run(new))
    assert c.drift.log_shift == pytest.approx(0.0677, abs=1e-4) and c.drift.log_sigma == pytest.approx(0, abs=1e-9)
    assert not c.regressions and {ch.verdict for ch in c.changes} == {"ambiguous"}
    assert main(["compare", str(base), str(new)]) == 0
    assert "median change +7.0%" in capsys.readouterr().out


def test_a_case_that_stands_out_of_the_drift_is_still_a_regression(pair):
    base, new = pair(suite(), suite(scale=lambda i: 1.25 if i == 2 else 1.07))
    c = compare_runs(load_run(base), load_run(new))
    assert [label(ch.base) for ch in c.regressions] == ["gemm 7x160x88 bf16 fwd torch"]
    assert len(c.of("ambiguous")) == 10


def test_the_drift_is_learned_only_from_enough_cases():
    assert Drift.of([]) == Drift()
    base, new = suite(), suite(scale=lambda i: 1.0 + 0.01 * i)
    # fewer than five matched cases say nothing of the machine
    pairs = [(from_info(b["extra_info"]), from_info(n["extra_info"])) for b, n in zip(base, new)]
    assert Drift.of(pairs[:4]) == Drift()
    drift = Drift.of(pairs)
    logs = sorted(math.log(1 + 0.01 * i) for i in range(11))
    assert drift.log_shift == pytest.approx(logs[5])
    assert drift.log_sigma == pytest.approx(1.4826 * sorted(abs(x - logs[5]) for x in logs)[5])


def test_threshold_option(pair):
    base, new = pair([bench(2048, 1024, 1024, 100e-6, spread=0.001)], [bench(2048, 1024, 1024, 103e-6, spread=0.001)])
    assert main(["compare", str(base), str(new), "--threshold", "2"]) == 1
    assert main(["compare", str(base), str(new), "--threshold", "5"]) == 0


def test_noise_option_raises_the_bar(pair):
    base, new = pair([bench(2048, 1024, 1024, 100e-6, spread=0.001)], [bench(2048, 1024, 1024, 108e-6, spread=0.001)])
    assert main(["compare", str(base), str(new)]) == 1
    assert main(["compare", str(base), str(new), "--noise", "9"]) == 0


def test_a_faster_case_is_an_improvement_not_a_regression(pair):
    base, new = pair([bench(4096, 4096, 4096, 1e-3)], [bench(4096, 4096, 4096, 0.8e-3)])
    c = compare_runs(load_run(base), load_run(new))
    assert [ch.verdict for ch in c.changes] == ["improvement"] and c.changes[0].speedup == pytest.approx(1.25)


def test_a_throttled_slowdown_is_listed_but_not_a_regression(pair, capsys):
    base, new = pair([bench(4096, 4096, 4096, 1e-3, gpu=gpu_state())],
                     [bench(4096, 4096, 4096, 1.3e-3, gpu=gpu_state(throttled=["sw_thermal"]))])
    c = compare_runs(load_run(base), load_run(new))
    assert not c.regressions and [ch.verdict for ch in c.changes] == ["throttled"]
    assert main(["compare", str(base), str(new)]) == 0
    assert "sw_thermal" in capsys.readouterr().out


def test_a_slowdown_that_is_the_same_in_cycles_is_the_clock(pair, capsys):
    # 10% more time at a 10% lower SM clock: -1% in cycles, the card's clock moved, not the kernel
    base, new = pair([bench(640, 384, 1000, 200e-6, gpu=gpu_state(1980.0)), bench(64, 64, 64, 5e-6)],
                     [bench(640, 384, 1000, 220e-6, gpu=gpu_state(1782.0)), bench(64, 64, 64, 5e-6)])
    c = compare_runs(load_run(base), load_run(new))
    assert verdicts(c) == {"gemm 640x384x1000 bf16 fwd torch": "clock", "gemm 64x64x64 bf16 fwd torch": "same"}
    assert main(["compare", str(base), str(new)]) == 0
    assert "the same in cycles: the SM clock moved, not the kernel (1):" in capsys.readouterr().out
    # the same 10% at an unchanged clock is a regression
    base, new = pair([bench(640, 384, 1000, 200e-6, gpu=gpu_state(1980.0))],
                     [bench(640, 384, 1000, 220e-6, gpu=gpu_state(1980.0))])
    assert [ch.verdict for ch in compare_runs(load_run(base), load_run(new)).changes] == ["regression"]


def test_cases_are_matched_by_identity_and_the_unmatched_listed(pair, capsys):
    base, new = pair([bench(64, 64, 64, 1e-5), bench(64, 64, 64, 1e-5, dtype="fp16"),
                      bench(64, 64, 64, 1e-5, backend="triton")],
                     [bench(64, 64, 64, 1e-5, backend="triton"), bench(64, 64, 64, 1e-5),
                      bench(64, 64, 64, 1e-5, pass_="dgrad")])
    c = compare_runs(load_run(base), load_run(new))
    assert len(c.changes) == 2 and all(ch.base.key == ch.new.key for ch in c.changes)
    assert [label(m) for m in c.only_base] == ["gemm 64x64x64 fp16 fwd torch"]
    assert [label(m) for m in c.only_new] == ["gemm 64x64x64 bf16 dgrad torch"]
    main(["compare", str(base), str(new)])
    out = capsys.readouterr().out
    assert "only in base (1):\n  gemm 64x64x64 fp16 fwd torch" in out
    assert "only in new (1):\n  gemm 64x64x64 bf16 dgrad torch" in out


def test_environment_differences_come_first(pair, capsys):
    faster_clocks = {**machine()["gpu"]["devices"][0], "app_sm_clock_mhz": 1755}
    base, new = pair([bench(64, 64, 64, 1e-5)], [bench(64, 64, 64, 1e-5)],
                     machine(driver="550.54.15", torch="2.4.0"),
                     machine(driver="560.35.03", torch="2.5.1", gpu=faster_clocks, nccl="2.23.4"))
    main(["compare", str(base), str(new)])
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "environment differences:"
    table = "\n".join(out[2:8])
    for fact, old, new_value in (("driver", "550.54.15", "560.35.03"), ("torch", "2.4.0", "2.5.1"),
                                 ("NCCL", "2.21.5", "2.23.4"), ("SM clock max / application (MHz)", "1980 / 1980",
                                                                "1980 / 1755")):
        expected = [*fact.split(), *old.split(), *new_value.split()]
        assert any(line.split() == expected for line in table.splitlines()), fact
    assert "Triton" not in table  # unchanged facts are not listed


def test_same_environment_is_said_in_one_line(pair, capsys):
    base, new = pair([bench(64, 64, 64, 1e-5)], [bench(64, 64, 64, 1e-5)])
    main(["compare", str(base), str(new)])
    assert capsys.readouterr().out.splitlines()[1].startswith("environment: no difference")


def test_several_new_runs_each_against_the_base(tmp_path, capsys):
    base = write_run(tmp_path / "base.json", [bench(64, 64, 64, 1e-5, spread=0.001)])
    same = write_run(tmp_path / "same.json", [bench(64, 64, 64, 1e-5, spread=0.001)])
    slow = write_run(tmp_path / "slow.json", [bench(64, 64, 64, 2e-5, spread=0.001)])
    assert main(["compare", str(base), str(same), str(slow)]) == 1
    out = capsys.readouterr().out
    assert out.count("opbench compare: base") == 2
    assert out.count("regression: 1,") == 1 and out.count("regression: 0,") == 1


def test_runs_from_pytest_benchmark_storage(tmp_path, capsys):
    storage = tmp_path / ".benchmarks"
    (storage / "Linux-CPython-3.11-64bit").mkdir(parents=True)
    write_run(storage / "Linux-CPython-3.11-64bit" / "0001_driver550.json", [bench(64, 64, 64, 1e-5, spread=0.001)])
    newer = write_run(storage / "Linux-CPython-3.11-64bit" / "0002_driver560.json",
                      [bench(64, 64, 64, 2e-5, spread=0.001)])
    assert main(["compare", "0001", "0002", "--storage", f"file://{storage}"]) == 1
    assert main(["compare", "Linux-CPython-3.11-64bit/0001", str(newer), "--storage", str(storage)]) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["compare", "0001", "0003", "--storage", str(storage)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run '0003'" in err[0] and "0001_driver550.json" in err[0]


def _old_gemm_info() -> dict:
    """The extra_info an opbench before the typed record wrote: flat keys, no kind, no record version."""
    return {"op": "gemm", "backend": "torch", "dtype": "bf16", "pass": "fwd", "shape": {"m": 8, "n": 8, "k": 8},
            "roles": [], "flops": 1024, "bytes": 384, "median_s": 1e-6, "timer": "cuda-graph", "unroll": 4}


@pytest.mark.parametrize("content, message", [
    ("not json {", "is not JSON (JSONDecodeError at line 1)"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", "is not JSON (UnicodeDecodeError)"),
    (json.dumps([1, 2]), "is JSON but not a pytest-benchmark run (a JSON list, no 'benchmarks' list)"),
    (json.dumps({"model_type": "llama"}), "is JSON but not a pytest-benchmark run (an object with keys model_type"),
    (json.dumps({"machine_info": {}, "benchmarks": [{"name": "test_x", "stats": {"median": 1.0}, "extra_info": {}}]}),
     "is a pytest-benchmark run of 1 benchmarks without opbench data"),
    (json.dumps({"benchmarks": [{"name": "test_gemm[x]", "stats": {"median": 1.0}, "extra_info": _old_gemm_info()}]}),
     "benchmark 'test_gemm[x]' was written by an opbench older than 0.2 (no record kind); re-run the suite"),
    (json.dumps({"benchmarks": [{"name": "test_gemm[y]", "extra_info": {**_old_gemm_info(), "kind": "op",
                                                                          "record": RECORD_VERSION - 1}}]}),
     f"benchmark 'test_gemm[y]': record version {RECORD_VERSION - 1}, this opbench reads version {RECORD_VERSION}"),
    (json.dumps({"benchmarks": [{"name": "test_z[a]", "extra_info": {"kind": "kernel", "record": RECORD_VERSION}}]}),
     "benchmark 'test_z[a]': kind 'kernel' (known: op, collective, peak, unit)"),
])
def test_a_file_that_is_not_a_run_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    good = write_run(tmp_path / "good.json", [bench(64, 64, 64, 1e-5)])
    for argv in (["compare", str(good), str(bad)], ["compare", str(bad), str(good)]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"opbench: error: {bad} ") and message in err[0], err
        assert "expected a pytest-benchmark JSON of opbench's bench/ suite" in err[0]


def test_a_missing_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["compare", str(tmp_path / "nope.json"), str(tmp_path / "nope2.json")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.json: cannot read it" in err[0]
