"""The pytest plugin: options, parametrization from the plan, machine info, JSON section, summary.

A bench module names its op family in OP (cases: the plan's calls of it) and may list cases that
no plan has in CASES, a function of the run's Selection returning Cases; it applies the selection's
backend filter where it wants it. Modules whose cases are not Cases (peaks, units) parametrize
themselves.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import pytest

from opbench import __version__
from opbench.measure.cases import build_cases
from opbench.dist.world import is_reporting_rank
from opbench.measure.bench_adapter import silence_rank
from opbench.measure.caches import use_persistent_caches
from opbench.measure.cost import Spent
from opbench.measure.runner import run_case
from opbench.measure.hardware import energy_unavailable, gpu_info, software_versions, stable_facts, torch_gpu_name
from opbench.ops.backends import describe_patterns, unknown_patterns
from opbench.ops.dtypes import DTYPES
from opbench.spec.workload import WORKLOAD_SYNTAX
from opbench.measure.peaks import datasheet_for
from opbench.analyze.roofline import add_roofline
from opbench.measure.selection import PROFILES, Selection, SelectionError, select
from opbench.measure.storage import use_card_storage
from opbench.analyze.session import compose_session
from opbench.measure.summary import composition_lines, summary_lines
from opbench.measure.timing import L2_MODES, RunSettings
from opbench.record import OpCase
from opbench.record import UnitCase as UnitRecord
from opbench.measure.units import run_unit_case


@dataclass
class State:
    """The run as the plugin knows it: what was selected, how it is timed, the records timed so far."""
    selection: Selection
    settings: RunSettings
    timed: list[OpCase] = field(default_factory=list)
    units: list[UnitRecord] = field(default_factory=list)
    spent: Spent = field(default_factory=Spent)  # setup and timing of every case, all kinds
    _composition: dict | None = None

    def composition(self) -> dict:
        """The run composed: computed once, when the JSON or the summary first asks."""
        if self._composition is None:
            sheet = datasheet_for(torch_gpu_name()) if self.settings.device == "cuda" else None
            self._composition = compose_session(self.selection.plans, self.timed, self.units,
                                                peak_tflops=dict(sheet.matmul_tflops) if sheet else None)
        return self._composition


STATE = pytest.StashKey[State]()


def state(config: pytest.Config) -> State:
    """The opbench state of a pytest run (bench modules and collectives/conftest.py read it here)."""
    return config.stash[STATE]


def pytest_addoption(parser):
    group = parser.getgroup("opbench", "opbench: what to measure (defaults come from --profile)")
    group.addoption("--model", action="append", metavar="NAME|PATH",
                    help="model to plan: a zoo name (see `opbench models`) or a Hugging Face config.json path; "
                         "repeat or comma-separate for several. Default: the profile's models.")
    group.addoption("--workload", action="append", metavar=WORKLOAD_SYNTAX,
                    help="workload to plan, e.g. prefill:b=1,s=2048 or decode:b=32,s=4096,tp=8 "
                         "(s: prompt, context or sequence length; smin: a decode batch's shortest context, the "
                         "others spread evenly up to s; ep: expert-parallel GPUs; skew: the routing's Zipf "
                         "exponent; r: LoRA rank for finetune); repeat for several. "
                         "Default: the profile's workloads.")
    group.addoption("--dtype", action="append", metavar="DTYPE",
                    help=f"dtypes to run: {', '.join(DTYPES)} (comma-separated or repeated). "
                         "Default: the profile's.")
    group.addoption("--backend", action="append", metavar="PATTERN",
                    help=f"only these backends (comma-separated or repeated): each {describe_patterns()}; "
                         "e.g. torch,sdpa* or eager. Default: all.")
    group.addoption("--profile", choices=sorted(PROFILES), default=None,
                    help="; ".join(f"{p.name}: {p.about}" for p in PROFILES.values())
                         + ". Default: default on a GPU, smoke on a CPU.")
    group.addoption("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="where cases run. auto: cuda when a GPU is visible, else cpu.")
    group.addoption("--l2", choices=L2_MODES, default=None,
                    help="what the cache holds when a timed call starts. rotate: the call cycles through copies of "
                         "its inputs whose working set exceeds twice the L2, so weights are cold as in a model whose "
                         "every layer has its own (default on a GPU); warm: the same buffers every call, for "
                         "microarchitecture work (default on a CPU); flush: a read of twice the L2 before every "
                         "call, with no host gap inside the timed interval (GPU only).")
    group.addoption("--energy", action="store_true", default=False,
                    help="read NVML's energy counter over a window of at least a second per GPU case: joules per "
                         "call, composed into joules per token. Needs an NVIDIA GPU whose driver exposes the counter.")


def _resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("opbench: --device cuda, but torch sees no CUDA GPU "
                                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    return choice


def pytest_configure(config):
    use_persistent_caches()  # before anything compiles
    opt = config.option
    device = _resolve_device(opt.device)
    try:
        selection = select(profile=opt.profile, device=device, models=opt.model, workloads=opt.workload,
                           dtypes=opt.dtype, backends=opt.backend)
    except SelectionError as error:
        raise pytest.UsageError(f"opbench: {error}") from None
    unknown = unknown_patterns(selection.backends or ())
    if unknown:
        raise pytest.UsageError(f"opbench: unknown backend(s) {', '.join(unknown)} (a pattern is "
                                f"{describe_patterns()})")
    explicit_time = any(a.startswith("--benchmark-max-time") for a in config.invocation_params.args)
    budget = opt.benchmark_max_time if explicit_time else selection.profile.budget_s
    min_rounds = opt.benchmark_min_rounds if any(
        a.startswith("--benchmark-min-rounds") for a in config.invocation_params.args) else selection.profile.min_rounds
    if opt.l2 == "flush" and device != "cuda":
        raise pytest.UsageError("opbench: --l2 flush needs a CUDA GPU (the CPU's caches cannot be flushed "
                                "without a host gap); on a CPU use warm or rotate")
    if opt.energy and (device != "cuda" or energy_unavailable()):
        raise pytest.UsageError("opbench: --energy needs a CUDA GPU whose driver exposes NVML's energy counter: "
                                + ("this run is on the CPU" if device != "cuda" else str(energy_unavailable())))
    settings = RunSettings(device=device, budget_s=float(budget), min_rounds=int(min_rounds),
                           l2=opt.l2 or ("rotate" if device == "cuda" else "warm"), energy=opt.energy)
    config.stash[STATE] = State(selection, settings)
    if selection.unserved():
        config.issue_config_time_warning(pytest.PytestConfigWarning(unserved_line(selection)), stacklevel=2)
    config.addinivalue_line("markers", "opbench: a case measured by opbench")
    if not is_reporting_rank():  # under torchrun every rank runs pytest; rank 0 alone reports
        silence_rank(config)
    use_card_storage(config, device)  # saved runs kept per card, before pytest-benchmark opens its storage


def unserved_line(selection: Selection) -> str:
    """What a --backend selection leaves unmeasured, and how to keep it."""
    ops = "; ".join(f"{op} (its backends: {', '.join(names)})" for op, names in selection.unserved().items())
    return (f"opbench: --backend {','.join(selection.backends)} leaves planned ops with no backend, so no "
            f"estimate can compose from this run: {ops}; add their backends, a glob such as sdpa*, or a group "
            f"such as eager")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    op = getattr(metafunc.module, "OP", None)
    extra = getattr(metafunc.module, "CASES", None)
    if op is None and extra is None:
        raise pytest.UsageError(f"{metafunc.module.__name__}: a bench module must name its op family in OP "
                                "or list its cases in CASES")
    selection = state(metafunc.config).selection
    cases = build_cases(selection.plans, op, selection.backends) if op is not None else []
    if extra is not None:
        cases += extra(selection)
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Every kind of case (ops, peaks, units, collectives) adds its record's setup and timing time."""
    try:
        return (yield)
    finally:
        benchmark = getattr(item, "funcargs", {}).get("benchmark")
        if STATE in item.config.stash and benchmark is not None:
            info = benchmark.extra_info
            state(item.config).spent.add(info.get("setup_s"), info.get("timing_s"))


def run_settings(config) -> RunSettings:
    """The run's device and timing settings, for bench modules that parametrize their own cases."""
    return state(config).settings


def _recorded(benchmark, request, runner, kept: str):
    """A function running one case with `runner` and keeping its record in the state's `kept` list
    once it was timed, for the end-of-run composition."""
    run_state = state(request.config)

    def run(case) -> None:
        record = runner(benchmark, case, run_state.settings)
        if record.timed:
            getattr(run_state, kept).append(record)
    return run


@pytest.fixture
def measure_case(benchmark, request):
    """Run a case through the runner: availability, correctness gate, timing, record."""
    return _recorded(benchmark, request, run_case, "timed")


@pytest.fixture
def measure_unit(benchmark, request):
    """Time a decoder layer or a whole model as one unit (bench/test_layer.py)."""
    return _recorded(benchmark, request, run_unit_case, "units")


def pytest_report_header(config):
    if STATE not in config.stash:
        return None
    run_state = config.stash[STATE]
    sel = run_state.selection
    models = sorted({p.model.name for p in sel.plans})
    lines = [f"opbench {__version__}: profile {sel.profile.name}, device {sel.device}, "
             f"{len(sel.plans)} plans ({', '.join(models)}), dtypes {','.join(sel.dtypes)}, "
             f"budget {run_state.settings.budget_s:g} s/case, L2 {run_state.settings.l2}"
             + (", TRITON_INTERPRET=1" if os.environ.get("TRITON_INTERPRET") == "1" else "")]
    if sel.unserved():
        lines.append(unserved_line(sel))
    return lines


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gpu"] = gpu_info()
    machine_info["software"] = software_versions()


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    now, then = stable_facts(machine_info), stable_facts(compared_benchmark.get("machine_info", {}))
    if now != then:
        changed = sorted(k for k in now if now[k] != then.get(k))
        benchmarksession.logger.warning(f"opbench: the compared run comes from a different machine or software: "
                                        f"{', '.join(changed)} differ")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    if STATE not in config.stash:
        return
    run_state = config.stash[STATE]
    output_json["opbench"] = {
        "version": __version__,
        "profile": run_state.selection.profile.name,
        "device": run_state.settings.device,
        "settings": asdict(run_state.settings),
        "plans": [p.to_dict() for p in run_state.selection.plans],
        "spent": asdict(run_state.spent),
        **run_state.composition(),
    }
    add_roofline(output_json)  # peaks may run before or after the cases they bound


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table, which would bury it
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if STATE not in config.stash or not is_reporting_rank():
        return
    run_state = config.stash[STATE]
    if run_state.spent.cases:
        terminalreporter.write_line(f"opbench: {run_state.spent.line()}")
    if not run_state.timed:
        return
    terminalreporter.section("opbench summary")
    for line in summary_lines(run_state.timed, run_state.settings.device):
        terminalreporter.write_line(line)
    terminalreporter.section("opbench estimates")
    for line in composition_lines(run_state.composition(), run_state.settings.device):
        terminalreporter.write_line(line)
