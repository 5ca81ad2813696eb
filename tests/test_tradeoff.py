"""The inference trade-off: configurations composed from a run, the Pareto frontier, the SLO's choice."""

import random

import pytest

from opbench.analyze.pareto import SloError, choose, pareto_front, parse_seconds, parse_slo
from opbench.analyze.tradeoff import GpuMemory, InferenceConfig, inference_tradeoff, tp_degrees
from opbench.spec.models import ZOO
from opbench.spec.workload import PlanError

from tests import roofline_run

GIB = 2**30


@pytest.fixture(scope="module")
def llama3():
    return inference_tradeoff(roofline_run.composer(), ZOO["llama-3-8b"], 1024, 256, GpuMemory(80 * GIB, "test"))


def dominates(a, b):
    return (a.e2e_s <= b.e2e_s and a.gpu_s_per_1k_tokens <= b.gpu_s_per_1k_tokens
            and (a.e2e_s < b.e2e_s or a.gpu_s_per_1k_tokens < b.gpu_s_per_1k_tokens))


def test_the_frontier_contains_no_dominated_point(llama3):
    front = llama3.frontier
    assert len(front) >= 3
    for f in front:
        assert not any(dominates(p, f) for p in llama3.fitting), f.config.label
    # sorted by latency, each cheaper than the one before
    assert all(a.e2e_s <= b.e2e_s and a.gpu_s_per_1k_tokens > b.gpu_s_per_1k_tokens for a, b in zip(front, front[1:]))


def test_pareto_front_is_the_non_dominated_set():
    rng = random.Random(3)
    for _ in range(50):
        pts = [(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(30)]
        front = pareto_front(pts, lambda p: p[0], lambda p: p[1], tie_rel=0.0)
        brute = {p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)}
        assert set(front) == brute


def test_memory_per_gpu_never_grows_with_more_gpus(llama3):
    by = {}
    for p in llama3.points:
        by.setdefault((p.config.batch, p.config.dtype, p.config.mode), []).append(p)
    checked = 0
    for points in by.values():
        points.sort(key=lambda p: p.config.gpus)
        for a, b in zip(points, points[1:]):
            assert b.memory_per_gpu_bytes <= a.memory_per_gpu_bytes
            checked += 1
    assert checked > 10


def test_a_configuration_that_cannot_fit_is_never_proposed():
    # 20 GiB, 18 usable: Llama-3-8B's 15 GiB of bf16 weights leave little KV cache at tp=1
    t = inference_tradeoff(roofline_run.composer(), ZOO["llama-3-8b"], 1024, 256, GpuMemory(20 * GIB, "test"))
    unfit = [p for p in t.points if not p.fits]
    assert unfit and all(p.ttft_s is None and p.memory_per_gpu_bytes > 18 * GIB for p in unfit)
    assert all(p.fits for p in t.frontier)
    # 3 GiB of KV cache beside the weights at tp=1 hold 19 sequences of 1280 tokens (160 MiB each): 16 fit,
    # 32 do not, and no larger batch is tried
    tp1 = {p.config.batch: p.fits for p in t.points if p.config.tp == 1}
    assert tp1 == {1: True, 2: True, 4: True, 8: True, 16: True, 32: False}
    # an SLO that only a configuration too big for memory would meet: none is proposed
    choice = t.choose(parse_slo("ttft=1h,tpot=1h", ("ttft", "tpot", "e2e")))
    assert choice.best.fits and choice.runner_up.fits
    assert not any(p.config == choice.best.config for p in unfit)


def test_slo_choice_is_the_cheapest_that_meets_it_and_names_the_binding_limit(llama3):
    slo = parse_slo("ttft=500ms,tpot=20ms", ("ttft", "tpot", "e2e"))
    choice = llama3.choose(slo)
    meeting = sorted((p for p in llama3.fitting if p.ttft_s <= 0.5 and p.tpot_s <= 0.02),
                     key=lambda p: p.gpu_s_per_1k_tokens)
    assert len(meeting) >= 2
    assert choice.best is meeting[0] and choice.runner_up is meeting[1]
    use = {"ttft": choice.best.ttft_s / 0.5, "tpot": choice.best.tpot_s / 0.02}
    assert choice.binding == max(use, key=use.get)
    assert choice.binding_use == pytest.approx(max(use.values()))
    cheaper = [p for p in llama3.fitting if p.gpu_s_per_1k_tokens < choice.best.gpu_s_per_1k_tokens]
    assert sum(choice.cheaper_fail.values()) >= len(cheaper) > 0  # each cheaper one fails a limit


def test_choose_when_nothing_meets_names_the_closest():
    items = [(1.0, 5.0, 10.0), (2.0, 3.0, 5.0)]  # (ttft, tpot, cost)
    slo = parse_slo("ttft=0.5s,tpot=1s", ("ttft", "tpot"))
    c = choose(items, slo, lambda x: {"ttft": x[0], "tpot": x[1]}, lambda x: x[2])
    assert c.best is None and c.closest == (2.0, 3.0, 5.0) and c.binding == "ttft"
    assert c.binding_use == pytest.approx(4.0)  # ttft 2 s over 0.5 s; the other is at 5x its tpot


def test_eager_is_composed_apart_only_where_host_times_were_recorded():
    model, mem = ZOO["llama-3-8b"], GpuMemory(80 * GIB, "test")
    plain = inference_tradeoff(roofline_run.composer(), model, 512, 64, mem, max_tp=1, max_batch=4)
    assert plain.eager_same and {p.config.mode for p in plain.points} == {"graph"}
    host = inference_tradeoff(roofline_run.composer(host_s=1e-3), model, 512, 64, mem, max_tp=1, max_batch=4)
    eager = {p.config.batch: p for p in host.points if p.config.mode == "eager"}
    graph = {p.config.batch: p for p in host.points if p.config.mode == "graph"}
    assert not host.eager_same and eager.keys() == graph.keys()
    assert all(eager[b].tpot_s > graph[b].tpot_s for b in eager)  # every measured call pays at least 1 ms


def test_tokens_and_costs_follow_from_the_latencies(llama3):
    p = next(p for p in llama3.fitting if p.config == InferenceConfig(2, 16, "bf16", "graph"))
    e2e = p.ttft_s + 255 * p.tpot_s
    assert p.e2e_s == pytest.approx(e2e)
    assert p.tokens_per_s_per_gpu == pytest.approx(16 * 256 / e2e / 2)
    assert p.gpu_s_per_1k_tokens == pytest.approx(1000 * 2 * e2e / (16 * 256))


def test_tp_degrees_and_bad_requests():
    assert tp_degrees(ZOO["llama-3-8b"], 8) == [1, 2, 4, 8]
    assert tp_degrees(ZOO["tiny"], 8) == [1, 2]  # 6 heads, 2 kv heads, MLP 520
    with pytest.raises(PlanError, match="max_seq_len"):
        inference_tradeoff(roofline_run.composer(), ZOO["llama-2-7b"], 4096, 256, GpuMemory(80 * GIB, "t"))
    with pytest.raises(SloError):
        parse_slo("ttft=fast", ("ttft",))
    with pytest.raises(SloError):
        parse_slo("latency=1s", ("ttft",))
    assert parse_seconds("500ms") == 0.5 and parse_seconds("2") == 2.0 and parse_seconds("1.5min") == 90.0
