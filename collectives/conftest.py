"""The process group, the cases and the end-of-run report of a collectives run; every rank runs this."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import pytest

from opbench.analyze.alphabeta import Fit, fit_all
from opbench.dist.collectives import (
    collective_cases,
    collective_runs,
    nccl_version,
    run_collective_case,
    summary_lines,
)
from opbench.dist.world import (
    DEFAULT_TIMEOUT_S,
    DistributedError,
    Launch,
    World,
    finish,
    is_reporting_rank,
    launch_layout,
    start,
    stop,
)
from opbench.measure.plugin import state
from opbench.record import CollectiveCase


@dataclass
class _Run:
    """What this rank knows of the run: how it was launched, its process group, its timed cases."""
    launch: Launch
    backend: str
    timeout_s: float
    world: World | None = None
    timed: list[CollectiveCase] = field(default_factory=list)  # each timed case's record

    def layout(self) -> dict:
        return self.world.layout() if self.world else launch_layout(self.launch) | {"backend": self.backend}

    def fits(self) -> list[Fit]:
        return fit_all((r.op, r.dtype, r.backend, r.world, r.bytes, r.median_s, r.graph) for r in self.timed)


_RUN = pytest.StashKey[_Run]()


def pytest_addoption(parser):
    parser.getgroup("opbench").addoption(
        "--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help="collectives: how long ranks wait for each other, at start-up (the rendezvous) and in any "
             f"collective, before stopping with an error (default {DEFAULT_TIMEOUT_S:g})")


@pytest.hookimpl(trylast=True)  # after the opbench plugin has chosen the device
def pytest_configure(config):
    backend = "nccl" if state(config).settings.device == "cuda" else "gloo"
    config.stash[_RUN] = _Run(Launch.from_env(), backend, config.option.dist_timeout)


def pytest_report_header(config):
    run = config.stash[_RUN]
    return f"opbench collectives: {run.launch.describe()}; {run.backend}, timeout {run.timeout_s:g} s"


def pytest_generate_tests(metafunc):
    if "collective" not in metafunc.fixturenames:
        return
    run = metafunc.config.stash[_RUN]
    cases = collective_cases(state(metafunc.config).selection, run.launch.world_size, run.backend)
    runs = collective_runs(cases, run.backend, nccl_version())
    metafunc.parametrize("collective", runs, ids=[r.id for r in runs])


@pytest.fixture(scope="session")
def world(request) -> World:
    run = request.config.stash[_RUN]
    try:
        run.world = start(run.launch, state(request.config).settings.device, run.timeout_s)
        run.world.check_same_tests(item.nodeid for item in request.session.items)
    except DistributedError as error:
        stop(str(error), request.config)
    yield run.world  # the process group ends in pytest_unconfigure, once every rank has reported


@pytest.fixture
def measure_collective(benchmark, world, request):
    """Run a collective case on every rank: agreed skips, correctness, fixed rounds, slowest rank's times."""
    run = request.config.stash[_RUN]

    def measure(collective) -> None:
        try:
            record = run_collective_case(benchmark, collective.case, state(request.config).settings, world,
                                         graph=collective.graph)
        except DistributedError as error:
            stop(str(error), request.config)
        if record.timed:
            run.timed.append(record)
    return measure


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["distributed"] = config.stash[_RUN].layout()


@pytest.hookimpl(trylast=True)  # after the plugin has written the opbench section
def pytest_benchmark_update_json(config, benchmarks, output_json):
    run = config.stash[_RUN]
    output_json.setdefault("opbench", {})["collectives"] = {
        "world": run.layout(),
        "model": "time_s = alpha_s + busbw_factor(op, world) * size_bytes / (busbw_gbps * 1e9); fits with graph: "
                 "true come from CUDA-graph replays (NCCL alone), the others from calls launched one by one",
        "fits": [f.to_dict() for f in run.fits()],
    }


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    run = config.stash[_RUN]
    if not run.timed or not is_reporting_rank():
        return
    terminalreporter.section("opbench collectives")
    for line in summary_lines(run.timed, run.fits(), run.launch.describe()):
        terminalreporter.write_line(line)


def pytest_unconfigure(config):
    """After every rank has printed its summary: torchrun ends the other ranks as soon as one exits
    non-zero (a failed case fails on every rank), so no rank leaves before all are done reporting."""
    run = config.stash.get(_RUN, None)
    if run is not None and run.world is not None:
        sys.stdout.flush()
        with contextlib.suppress(Exception):  # a rank that died already: nothing left to wait for
            run.world.barrier()
    finish()
