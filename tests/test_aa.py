"""An A/A comparison: the same CPU run twice, nothing changed in between. Whatever the machine does
between two runs, `opbench compare` must not call a change of the same code a regression."""

import json

import pytest

from opbench.analyze.compare import compare_runs
from opbench.analyze.runs import label, load_run
from opbench.cli import main

from tests.helpers import run_pytest

SELECTION = "gemm or rmsnorm or layer"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    where = tmp_path_factory.mktemp("aa")
    paths = []
    for name in ("a.json", "b.json"):
        out = where / name
        proc = run_pytest("bench/", "-k", SELECTION, f"--benchmark-json={out}", "-q")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        paths.append(out)
    return paths


def _ci(m) -> str:
    return "n/a" if m.stability.ci_rel is None else f"{m.stability.ci_rel:.2%}"


def _figures(c) -> str:
    rows = [f"{label(ch.base)}: {ch.change:+.1%} (base ci {_ci(ch.base)} stable {ch.base.stability.stable}, "
            f"new ci {_ci(ch.new)} stable {ch.new.stability.stable}) -> {ch.verdict}"
            for ch in sorted(c.changes, key=lambda ch: -abs(ch.change))]
    return f"drift {c.drift}\n" + "\n".join(rows)


def test_the_same_run_twice_has_no_regression_nor_improvement(two_runs, capsys):
    a, b = two_runs
    base, new = load_run(a), load_run(b)
    ops = {m.op for m in base.measurements}
    assert {"gemm", "rmsnorm", "add_rmsnorm"} <= ops and len(base.measurements) >= 10
    c = compare_runs(base, new)
    assert len(c.changes) == len(base.measurements) == len(new.measurements)  # every case matched
    assert not c.only_base and not c.only_new
    assert {ch.verdict for ch in c.changes} <= {"same", "ambiguous"}, _figures(c)
    assert main(["compare", str(a), str(b)]) == 0
    assert "regression: 0, improvement: 0," in capsys.readouterr().out


def test_a_unit_is_timed_in_both_runs(two_runs):
    units = [[b["extra_info"] for b in json.loads(p.read_text())["benchmarks"] if b["extra_info"]["kind"] == "unit"]
             for p in two_runs]
    assert units[0] and [(u["unit"], u["plan"]) for u in units[0]] == [(u["unit"], u["plan"]) for u in units[1]]
