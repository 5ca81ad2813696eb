"""The suite's own cost on a GPU: the default profile's estimate, compiled code kept across cases,
persistent compile caches, and the setup and timing time a run reports."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from opbench.measure import cost
from opbench.measure.caches import cache_root, use_persistent_caches
from opbench.measure.cases import build_cases
from opbench.measure.peak_cases import peak_cases, work
from opbench.measure.selection import PROFILES, select
from opbench.measure.timing import RunSettings
from opbench.measure.units import unit_cases
from opbench.ops import base, get_family, tokenwise
from opbench.ops.dtypes import get_dtype

BENCH = Path(__file__).resolve().parent.parent / "bench"
TEN_MINUTES_S = 600.0


def run_costs(profile: str) -> cost.RunCost:
    """Every case a GPU run of `profile` parametrizes (bench/ as the plugin reads it: each module's
    OP and CASES, the peaks, the units), priced by opbench.measure.cost."""
    selection = select(profile=profile, device="cuda")
    budget, min_rounds = selection.profile.budget_s, selection.profile.min_rounds
    costs = []
    for path in sorted(BENCH.glob("test_*.py")):
        module = importlib.import_module(f"bench.{path.stem}")
        op, extra = getattr(module, "OP", None), getattr(module, "CASES", None)
        cases = (build_cases(selection.plans, op, selection.backends) if op else []) + (extra(selection) if extra else [])
        for c in cases:
            family = get_family(c.op)
            seconds = cost.call_s(family.flops(c.shape, c.pass_), family.bytes(c.shape, get_dtype(c.dtype), c.pass_),
                                  c.dtype)
            costs.append(cost.case_cost(c.id, seconds, budget, min_rounds, cost.setup_allowance_s(c.op, c.backend)))
    for peak in peak_cases("cuda"):
        costs.append(cost.case_cost(peak.id, cost.call_s(*work(peak), peak.dtype), budget, min_rounds))
    units = RunSettings("cuda", budget, min_rounds).for_units()
    costs += [cost.case_cost(u.id, 0.0, units.budget_s, units.min_rounds) for u in unit_cases(selection.plans)]
    return cost.RunCost(tuple(costs))


# The default profile within ten minutes on an H100 with cold caches -----------------------------------

def test_the_default_profile_finishes_within_ten_minutes_on_an_h100_with_cold_caches():
    run = run_costs("default")
    compiled = [c for c in run.cases if c.setup_s > cost.CASE_OVERHEAD_S + 1.0]
    assert 200 <= len(run.cases) <= 350, len(run.cases)  # the count the estimate stands on
    assert len(compiled) >= 40  # torch.compile, FlexAttention and autotuned Triton cases
    assert run.total_s < TEN_MINUTES_S, (f"{len(run.cases)} cases: setup {run.setup_s:.0f} s + timing "
                                         f"{run.timing_s:.0f} s = {run.total_s:.0f} s")


def test_the_estimate_is_count_times_budget_and_setup_allowances_by_hand():
    assert cost.setup_allowance_s("rmsnorm", "compile") == cost.SETUP_ALLOWANCE_S["compile"]
    assert cost.setup_allowance_s("gemm", "triton") == cost.SETUP_ALLOWANCE_S[("gemm", "triton")]
    assert cost.setup_allowance_s("rmsnorm", "triton") == cost.SETUP_ALLOWANCE_S["triton"]
    assert cost.setup_allowance_s("gemm", "torch") == 0.0
    short = cost.case_cost("a", 1e-5, budget_s=0.2, min_rounds=5, allowance_s=4.0)
    assert short.setup_s == pytest.approx(cost.CASE_OVERHEAD_S + 8e-5 + 4.0)
    assert short.timing_s == 0.2
    long = cost.case_cost("b", 0.1, budget_s=0.2, min_rounds=5)  # five rounds outlast the budget
    assert long.timing_s == pytest.approx(0.5)
    run = cost.RunCost((short, long), fixed_s=10.0)
    assert run.total_s == pytest.approx(10.0 + short.setup_s + long.setup_s + 0.7)


def test_a_call_is_priced_at_a_quarter_of_the_h100s_rate_for_its_dtype():
    assert cost.call_s(int(989e12), 0, "bf16") == pytest.approx(4.0)
    assert cost.call_s(0, int(3.35e12), "bf16") == pytest.approx(4.0)
    assert cost.call_s(int(67e12), 0, "fp32") == pytest.approx(4.0)


def test_the_full_profile_is_not_held_to_ten_minutes():
    assert PROFILES["full"].budget_s > PROFILES["default"].budget_s  # full is for a long session


# torch.compile keeps what earlier cases compiled -------------------------------------------------------

def test_compiled_cases_do_not_reset_dynamo_and_raise_its_recompile_limits(monkeypatch):
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(torch._dynamo.config, "accumulated_recompile_limit", 256)
    monkeypatch.setattr(tokenwise, "_COMPILES", tokenwise.Counter())

    def norm(x):
        return x * 2
    for _ in range(20):  # twenty cases of one function, each at its own shape
        tokenwise.compiled(norm)
    assert resets == []
    assert torch._dynamo.config.recompile_limit >= base.RECOMPILE_LIMIT
    assert torch._dynamo.config.accumulated_recompile_limit >= base.RECOMPILE_LIMIT


def test_dynamo_is_reset_only_when_a_function_nears_the_limit(monkeypatch):
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(tokenwise, "_COMPILES", tokenwise.Counter())
    monkeypatch.setattr(tokenwise, "RECOMPILE_LIMIT", 20)

    def act(x):
        return x + 1
    for _ in range(12):
        tokenwise.compiled(act)
    assert resets == []
    tokenwise.compiled(act)  # 12 compiles kept of 20 allowed: the margin for cases adding several entries
    assert resets == [1]
    assert tokenwise._COMPILES[act] == 1


# Persistent caches ------------------------------------------------------------------------------------

def test_compile_caches_persist_in_the_suites_cache_folder(tmp_path):
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    got = use_persistent_caches(env)
    assert got == {"TRITON_CACHE_DIR": str(tmp_path / "xdg" / "opbench" / "triton"),
                   "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "xdg" / "opbench" / "inductor"),
                   "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    assert "TRITON_CACHE_AUTOTUNING" not in env  # autotuning results are not shared between GPU models


def test_cache_locations_already_set_are_kept(tmp_path):
    env = {"OPBENCH_CACHE_DIR": str(tmp_path), "TRITON_CACHE_DIR": "/elsewhere", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    got = use_persistent_caches(env)
    assert cache_root(env) == tmp_path
    assert got["TRITON_CACHE_DIR"] == "/elsewhere" and got["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0"
    assert got["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")


def test_without_xdg_the_cache_lives_in_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    assert cache_root({}) == tmp_path / ".cache" / "opbench"


# What a run spent ------------------------------------------------------------------------------------

def test_the_run_sums_setup_and_timing_over_the_records_that_have_them():
    spent = cost.spent([{"setup_s": 12.5, "timing_s": 0.25}, {"setup_s": 0.5, "timing_s": 0.25},
                        {"op": "skipped"}])
    assert (spent.cases, spent.setup_s, spent.timing_s) == (2, 13.0, 0.5)
    assert spent.line() == "setup (compile, autotune) 13.0 s, timing 0.5 s over 2 cases"
