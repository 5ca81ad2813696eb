"""The serving simulation: closed forms, Little's law, determinism, chunked prefill, KV capacity, the rate search."""

import json
import statistics

import pytest

from opbench.analyze.pareto import Slo
from opbench.analyze.simulate import (IterationModel, Lengths, Request, ServingConfig, kv_capacity_tokens,
                                      make_requests, parse_range, read_pairs, search_rate, simulate)
from opbench.analyze.tradeoff import GpuMemory
from opbench.spec.models import ZOO
from opbench.spec.plan import plan
from opbench.spec.workload import PlanError, Workload

from tests import roofline_run

GIB = 2**30
MODEL = ZOO["llama-3-8b"]


@pytest.fixture(scope="module")
def composer():
    return roofline_run.composer()


@pytest.fixture(scope="module")
def it(composer):
    return IterationModel(composer, MODEL, ServingConfig(), 4096, exact_tokens=(512,), exact_contexts=(512,))


def composed(composer, phase, batch, length):
    return composer.compose(plan(MODEL, Workload(phase, batch, length))).total_s


def test_one_request_at_a_time_ttft_is_the_prefill_and_tpot_the_decode_step(composer, it):
    p, o = 512, 33
    requests = [Request(1000.0 * i, p, o) for i in range(1, 4)]  # each long done before the next arrives
    r = simulate(requests, it, 10**6)
    prefill = composed(composer, "prefill", 1, p)
    steps = [composed(composer, "decode", 1, p + j) for j in range(1, o)]  # the 2nd..o-th token
    assert r.ttft_s == pytest.approx([prefill] * 3, rel=1e-9)
    assert r.tpot_s == pytest.approx([statistics.fmean(steps)] * 3, rel=1e-6)
    assert r.e2e_s == pytest.approx([prefill + sum(steps)] * 3, rel=1e-6)
    assert r.iterations == 3 * o and r.output_tokens == 3 * o


def test_a_prompt_longer_than_the_token_budget_is_prefilled_in_chunks(composer):
    config = ServingConfig(token_budget=1024, max_seqs=64)
    it = IterationModel(composer, MODEL, config, 4096, exact_tokens=(1024, 476), exact_contexts=(1024, 1500))
    r = simulate([Request(0.0, 1500, 2)], it, 10**6)
    first = it.iteration_s(1024, 0, 0, 0, [(1024, 1024)])
    second = it.iteration_s(476, 1, 0, 0, [(476, 1500)])
    assert r.ttft_s[0] == pytest.approx(first + second)
    # the first chunk's attention is the prefill plan's at 1024 tokens exactly
    assert first == pytest.approx(composed(composer, "prefill", 1, 1024) - it.iteration_s(0, 1, 0, 0, [])
                                  + it.iteration_s(0, 0, 0, 0, []), rel=1e-9)


def test_littles_law_on_a_steady_run(it):
    # capacity: about 256 sequences of 288 tokens each at ~20 ms a step; offer a rate well below it
    lengths = Lengths((200, 300), (32, 96))
    requests = make_requests(3000, 20.0, lengths, seed=7)
    r = simulate(requests, it, 10**6, 20.0)
    w = statistics.fmean(r.e2e_s)
    assert r.mean_in_system == pytest.approx(r.throughput_rps * w, rel=1e-9)  # the bookkeeping, exactly
    assert r.throughput_rps == pytest.approx(20.0, rel=0.08)  # steady: completions keep up with arrivals
    assert r.mean_in_system == pytest.approx(20.0 * w, rel=0.08)  # L = lambda W at the offered rate
    assert r.peak_running < 256


def test_deterministic_for_a_seed(it):
    lengths = Lengths((100, 900), (10, 200))
    a = simulate(make_requests(300, 30.0, lengths, seed=1), it, 10**6, 30.0)
    b = simulate(make_requests(300, 30.0, lengths, seed=1), it, 10**6, 30.0)
    c = simulate(make_requests(300, 30.0, lengths, seed=2), it, 10**6, 30.0)
    assert a == b and a.e2e_s != c.e2e_s
    # the same requests at another rate: same lengths, gaps scaled
    slow = make_requests(300, 15.0, lengths, seed=1)
    fast = make_requests(300, 30.0, lengths, seed=1)
    assert [(x.prompt_tokens, x.output_tokens) for x in slow] == [(x.prompt_tokens, x.output_tokens) for x in fast]
    assert slow[-1].arrival_s == pytest.approx(2 * fast[-1].arrival_s)


def test_kv_capacity_bounds_the_running_batch(composer):
    config = ServingConfig(max_seqs=256)
    gpu = GpuMemory(20 * GIB, "test")  # 18 GiB usable, 15 GiB of weights: about 3 GiB of cache
    tokens = kv_capacity_tokens(MODEL, config, gpu)
    per_token = 2 * 32 * 8 * 128 * 2  # K and V, layers, kv heads, head_dim, bf16
    assert tokens % 16 == 0 and tokens == (int(0.9 * 20 * GIB) - MODEL.params * 2) // (16 * per_token) * 16
    it = IterationModel(composer, MODEL, config, 2048)
    r = simulate(make_requests(200, 1000.0, Lengths((1000, 1000), (24, 24)), seed=3), it, tokens)
    assert r.peak_running == tokens // 1024  # whole requests of 1024 tokens (64 blocks) fit
    with pytest.raises(PlanError, match="more KV cache"):
        simulate([Request(0.0, 4000, 100)], it, 4096)  # a cache of 4096 tokens cannot hold 4100


def test_rate_search_finds_the_boundary(it):
    lengths = Lengths((512, 512), (64, 64))

    def run_at(rate):
        return simulate(make_requests(400, rate, lengths, seed=5), it, 10**6, rate)

    slo = Slo({"ttft": 0.25, "tpot": 0.05})
    found = search_rate(run_at, slo, 90, 1.0)
    assert found.best_rate_per_s is not None
    ok = run_at(found.best_rate_per_s)
    assert ok.ttft.p90 <= 0.25 and ok.tpot.p90 <= 0.05
    above = run_at(found.best_rate_per_s * 1.05)
    assert above.ttft.p90 > 0.25 or above.tpot.p90 > 0.05
    assert found.binding in ("ttft", "tpot")
    impossible = search_rate(run_at, Slo({"ttft": 1e-6}), 90, 1.0)
    assert impossible.best_rate_per_s is None and impossible.binding == "ttft"


def test_lengths(tmp_path):
    assert parse_range("1024") == (1024, 1024) and parse_range("10:20") == (10, 20)
    with pytest.raises(PlanError):
        parse_range("20:10")
    j = tmp_path / "pairs.json"
    j.write_text(json.dumps([[100, 20], [300, 40]]))
    t = tmp_path / "pairs.txt"
    t.write_text("# prompt output\n100 20\n300,40\n")
    assert read_pairs(str(j)).pairs == read_pairs(str(t)).pairs == ((100, 20), (300, 40))
    assert read_pairs(str(j)).max_total == 340
    bad = tmp_path / "bad.txt"
    bad.write_text("100\n")
    with pytest.raises(PlanError):
        read_pairs(str(bad))
