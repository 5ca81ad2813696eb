"""`opbench compare`: matching, the regression rule, environments, storage, and bad files."""

import json

import pytest

from opbench.cli import main
from opbench.analyze.compare import compare_runs
from opbench.analyze.runs import load_run

from tests.synthetic_runs import bench, machine, write_run


@pytest.fixture
def pair(tmp_path):
    """Write a base and a new run; returns a function taking their benchmark lists (and machine infos)."""
    def write(base, new, base_machine=None, new_machine=None):
        return (write_run(tmp_path / "base.json", base, base_machine),
                write_run(tmp_path / "new.json", new, new_machine))
    return write


def test_a_real_slowdown_is_a_regression_and_fails_the_command(pair, capsys):
    base, new = pair([bench(4096, 4096, 4096, 1.00e-3), bench(8, 4096, 4096, 20e-6)],
                     [bench(4096, 4096, 4096, 1.20e-3), bench(8, 4096, 4096, 20e-6)])
    c = compare_runs(load_run(base), load_run(new))
    assert [ch.base.shape_id for ch in c.regressions] == ["4096x4096x4096"]
    assert c.regressions[0].change == pytest.approx(0.20)
    assert main(["compare", str(base), str(new)]) == 1
    out = capsys.readouterr().out
    assert "regressions (1):" in out and "+20.0%" in out and "regression: 1," in out


def test_noise_does_not_flag(pair):
    # 8% slower but the rounds' IQRs (+-6%) overlap; 3% slower with disjoint IQRs is under the threshold
    base, new = pair([bench(1024, 1024, 1024, 100e-6, spread=0.06), bench(2048, 1024, 1024, 100e-6, spread=0.001)],
                     [bench(1024, 1024, 1024, 108e-6, spread=0.06), bench(2048, 1024, 1024, 103e-6, spread=0.001)])
    c = compare_runs(load_run(base), load_run(new))
    assert not c.regressions
    assert {ch.base.shape_id: ch.verdict for ch in c.changes} == {"1024x1024x1024": "noise", "2048x1024x1024": "same"}
    assert main(["compare", str(base), str(new)]) == 0


def test_threshold_option(pair):
    base, new = pair([bench(2048, 1024, 1024, 100e-6, spread=0.001)], [bench(2048, 1024, 1024, 103e-6, spread=0.001)])
    assert main(["compare", str(base), str(new), "--threshold", "2"]) == 1
    assert main(["compare", str(base), str(new), "--threshold", "5"]) == 0


def test_a_faster_case_is_an_improvement_not_a_regression(pair):
    base, new = pair([bench(4096, 4096, 4096, 1e-3)], [bench(4096, 4096, 4096, 0.8e-3)])
    c = compare_runs(load_run(base), load_run(new))
    assert [ch.verdict for ch in c.changes] == ["improvement"] and c.changes[0].speedup == pytest.approx(1.25)


def test_a_throttled_slowdown_is_listed_but_not_a_regression(pair, capsys):
    base, new = pair([bench(4096, 4096, 4096, 1e-3, throttled=[])],
                     [bench(4096, 4096, 4096, 1.3e-3, throttled=["sw_thermal"])])
    c = compare_runs(load_run(base), load_run(new))
    assert not c.regressions and [ch.verdict for ch in c.changes] == ["throttled"]
    assert main(["compare", str(base), str(new)]) == 0
    assert "sw_thermal" in capsys.readouterr().out


def test_cases_are_matched_by_identity_and_the_unmatched_listed(pair, capsys):
    base, new = pair([bench(64, 64, 64, 1e-5), bench(64, 64, 64, 1e-5, dtype="fp16"),
                      bench(64, 64, 64, 1e-5, backend="triton")],
                     [bench(64, 64, 64, 1e-5, backend="triton"), bench(64, 64, 64, 1e-5),
                      bench(64, 64, 64, 1e-5, pass_="dgrad")])
    c = compare_runs(load_run(base), load_run(new))
    assert len(c.changes) == 2 and all(ch.base.key == ch.new.key for ch in c.changes)
    assert [m.label for m in c.only_base] == ["gemm 64x64x64 fp16 fwd torch"]
    assert [m.label for m in c.only_new] == ["gemm 64x64x64 bf16 dgrad torch"]
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


@pytest.mark.parametrize("content, message", [
    ("not json {", "is not JSON (JSONDecodeError at line 1)"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", "is not JSON (UnicodeDecodeError)"),
    (json.dumps([1, 2]), "is JSON but not a pytest-benchmark run (a JSON list, no 'benchmarks' list)"),
    (json.dumps({"model_type": "llama"}), "is JSON but not a pytest-benchmark run (an object with keys model_type"),
    (json.dumps({"machine_info": {}, "benchmarks": [{"name": "test_x", "stats": {"median": 1.0}, "extra_info": {}}]}),
     "is a pytest-benchmark run of 1 benchmarks without opbench data"),
    (json.dumps({"benchmarks": [{"name": "test_gemm[x]", "stats": {"median": 1.0}, "extra_info": {"op": "gemm"}}]}),
     "incomplete opbench data (its benchmark 'test_gemm[x]' lacks backend, dtype, pass, shape, stats.q1"),
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
