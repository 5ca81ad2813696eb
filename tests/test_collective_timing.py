"""How collectives are timed on every rank: a barrier before each round, and small NCCL messages also
as CUDA-graph replays; tested with a fake world (and a fake torch.cuda for the graph path)."""

from __future__ import annotations

import pytest

from opbench.analyze.alphabeta import fit_all
from opbench.analyze.compose import Composer
from opbench.dist import collectives
from opbench.dist.collectives import GRAPH_MAX_BYTES, CollectiveRun, collective_runs, graph_unsupported
from opbench.measure import timing
from opbench.measure.cases import Case
from opbench.measure.timing import RunSettings
from opbench.ops.collective import CollectiveShape
from tests.fake_cuda import CLOCK_KHZ, FakeCuda


class FakeWorld:
    """One rank's view of the world: its barriers and calls logged in order; another rank's values
    reach at least `peer` (the slowest rank) in every max."""

    def __init__(self, log: list, device: str = "cpu", peer: float = 0.0, agreed: str | None = None):
        self.log, self.peer, self.agreed = log, peer, agreed
        self.device = type("Device", (), {"type": device})()

    def barrier(self) -> None:
        self.log.append(("barrier",))

    def max(self, *values: float) -> list[float]:
        return [max(v, self.peer) for v in values]

    def agree(self, reason: str | None) -> str | None:
        return reason or self.agreed


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(timing, "torch_cuda", lambda: fake)
    monkeypatch.setattr(collectives, "torch_cuda", lambda: fake)
    return fake


def case(size: int, op: str = "allreduce", backend: str = "nccl") -> Case:
    return Case(op, CollectiveShape(size, 8), "bf16", "fwd", backend, ())


# Which cases get a CUDA-graph twin -------------------------------------------------------------------

@pytest.mark.parametrize("backend, size, nccl, twin", [
    ("nccl", 2**10, (2, 21, 5), True),
    ("nccl", GRAPH_MAX_BYTES, (2, 21, 5), True),
    ("nccl", GRAPH_MAX_BYTES + 1, (2, 21, 5), False),  # dispatch is a negligible share there
    ("nccl", 2**10, (2, 9, 6), True),
    ("nccl", 2**10, (2, 9, 5), False),  # NCCL before 2.9.6 cannot be captured
    ("nccl", 2**10, None, False),
    ("gloo", 2**10, (2, 21, 5), False),  # gloo runs on the host: nothing to capture
])
def test_a_graph_twin_where_nccl_can_be_captured_and_the_message_is_small(backend, size, nccl, twin):
    assert (graph_unsupported(backend, size, nccl) is None) == twin


def test_each_small_nccl_case_is_followed_by_its_graph_twin():
    cases = [case(2**10), case(2**30)]
    runs = collective_runs(cases, "nccl", (2, 21, 5))
    assert runs == [CollectiveRun(cases[0]), CollectiveRun(cases[0], graph=True), CollectiveRun(cases[1])]
    assert [r.id for r in runs][:2] == [f"allreduce-{cases[0].id}", f"allreduce-{cases[0].id}-graph"]


def test_gloo_runs_keep_their_cases_and_ids():
    cases = [case(2**10, backend="gloo"), case(2**12, backend="gloo")]
    runs = collective_runs(cases, "gloo", None)
    assert [r.case for r in runs] == cases and not any(r.graph for r in runs)
    assert [r.id for r in runs] == [f"{c.op}-{c.id}" for c in cases]


# A barrier before each timed round ------------------------------------------------------------------

def test_every_round_starts_after_a_barrier_with_the_same_calls():
    log = []
    world = FakeWorld(log)
    settings = RunSettings("cpu", budget_s=0.0, min_rounds=4)
    samples, slowest = collectives._time(lambda: log.append(("call",)), settings, world, graph=False, started=0.0)
    timed = log[log.index(("barrier",)):]
    iterations = samples.unroll
    assert timed == ([("barrier",)] + [("call",)] * iterations) * (1 + len(samples.per_call_s))  # warm-up too
    assert len(slowest) == len(samples.per_call_s) == 4
    assert samples.timer == "cpu" and samples.setup_s >= 0 and samples.timing_s >= 0


def test_plain_gpu_rounds_time_the_launches_right_after_the_barrier(cuda):
    world = FakeWorld(cuda.log, device="cuda")
    settings = RunSettings("cuda", budget_s=0.0, min_rounds=3)
    samples, _ = collectives._time(cuda.call("allreduce", 0.01), settings, world, graph=False, started=0.0)
    rounds = [k for k in cuda.kinds() if k != "wait"]
    per_round = ["barrier", "record"] + ["call"] * samples.unroll + ["record"]
    assert rounds[-4 * len(per_round):] == per_round * 4  # warm-up and 3 rounds: dispatch is in the interval
    assert "spin" not in rounds and samples.timer == "cuda-event"


# The CUDA-graph twin ----------------------------------------------------------------------------------

def test_graph_rounds_are_barrier_spin_start_replay_end_with_the_same_spin_on_every_rank(cuda):
    world = FakeWorld(cuda.log, device="cuda", peer=2e-3)  # another rank launches in 2 ms
    settings = RunSettings("cuda", budget_s=0.0, min_rounds=3)
    samples, _ = collectives._time(cuda.call("allreduce", 0.02), settings, world, graph=True, started=0.0)
    assert samples.timer == "cuda-graph"
    assert [e for e in cuda.log if e[0] == "capture_begin"] == [("capture_begin", "side1", "thread_local")]
    rounds = [k for k in cuda.kinds() if k != "wait"][-4 * 5:]
    assert rounds == ["barrier", "spin", "record", "replay", "record"] * 4
    spins = {e[1] for e in cuda.log if e[0] == "spin"}
    assert spins == {int(timing.spin_s(2e-3) * CLOCK_KHZ * 1e3)}  # sized from the slowest rank's launch
    assert samples.per_call_s == pytest.approx([0.02e-3] * 3)  # NCCL's device time alone
    assert cuda.current is cuda.default


def test_a_capture_failing_on_any_rank_skips_the_graph_twin_on_all(cuda):
    settings = RunSettings("cuda", budget_s=0.0, min_rounds=3)
    world = FakeWorld(cuda.log, device="cuda", agreed="rank 1: NCCL could not be captured in a CUDA graph here")
    with pytest.raises(pytest.skip.Exception, match="rank 1"):  # this rank captured; another could not
        collectives._time(cuda.call("allreduce"), settings, world, graph=True, started=0.0)
    cuda.fail_capture_end = True
    with pytest.raises(pytest.skip.Exception, match="could not be captured"):
        collectives._time(cuda.call("allreduce"), settings, FakeWorld(cuda.log, device="cuda"), True, 0.0)
    assert cuda.current is cuda.default


# Fits keyed by how the calls were issued -------------------------------------------------------------

def test_graph_timings_are_fitted_apart_and_composition_prefers_the_dispatched_fit():
    rows = [("allreduce", "bf16", "nccl", 8, s, 20e-6 + s / 300e9, False) for s in (2**10, 2**20, 2**24)]
    rows += [("allreduce", "bf16", "nccl", 8, s, 8e-6 + s / 300e9, True) for s in (2**10, 2**20, 2**24)]
    fits = {f.graph: f for f in fit_all(rows)}
    assert set(fits) == {False, True}
    assert fits[True].alpha_s < fits[False].alpha_s  # the latency without dispatch
    assert "CUDA graph" in fits[True].source and "CUDA graph" not in fits[False].source
    for order in (list(fits.values()), list(fits.values())[::-1]):
        assert Composer([], fits=order).fits[("allreduce", "bf16")].graph is False


def test_rows_without_a_graph_flag_fit_as_dispatched_calls():
    rows = [("allgather", "bf16", "gloo", 2, s, 1e-4 + s / 1e9) for s in (2**10, 2**16)]
    fit, = fit_all(rows)
    assert fit.graph is False


def test_a_messages_plain_and_graph_timings_are_two_cases():
    from opbench.record import CollectiveCase

    plain = CollectiveCase(op="allreduce", backend="nccl", dtype="bf16", shape={"size_bytes": 1024, "world": 8},
                           world=8, busbw_factor=1.75)
    twin = CollectiveCase(**{**plain.__dict__, "graph": True})
    assert plain.key != twin.key and twin.key[:len(plain.key)] == plain.key
