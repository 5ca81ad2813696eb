"""Training configurations: ZeRO memory by the paper's formula, step time parts, the frontier and the choice."""

import pytest

from opbench.analyze.pareto import Slo
from opbench.analyze.tradeoff import GpuMemory
from opbench.analyze.training import (HostLink, Peak, TrainConfig, TrainingModel, training_tradeoff, zero_memory)
from opbench.spec.models import ZOO
from opbench.spec.workload import Workload

from tests import roofline_run

GIB = 2**30
LLAMA2_7B_PARAMS = 6_738_415_616  # 32 layers x 202,383,360 + 2 x 32000 x 4096 + 4096


def test_zero_memory_of_llama_2_7b_on_8_gpus_by_the_papers_formula():
    model = ZOO["llama-2-7b"]
    assert model.params == LLAMA2_7B_PARAMS
    psi, n = LLAMA2_7B_PARAMS, 8
    w = Workload("train", 1, 4096, dtype="bf16")
    expected = {0: 2 * psi + 2 * psi + 12 * psi,  # 107.8 GB
                1: 2 * psi + 2 * psi + 12 * psi // n,  # 37.1 GB
                2: 2 * psi + (2 * psi + 12 * psi) // n,  # 25.3 GB (integer parts: each divided on its own)
                3: (2 * psi + 2 * psi + 12 * psi) // n}  # 13.5 GB
    for stage, states in expected.items():
        mem = zero_memory(model, w, stage, n)
        assert mem.model_states_bytes == pytest.approx(states, abs=8), stage
    in_gb = [round(zero_memory(model, w, s, n).model_states_bytes / 1e9, 1) for s in range(4)]
    assert in_gb == [107.8, 37.1, 25.3, 13.5]
    # offload moves the optimizer state to the host; recomputation keeps only each layer's input
    off = zero_memory(model, w, 2, n, offload=True)
    assert off.optimizer_bytes == 0 and off.host_bytes == 12 * psi // n
    full, recomputed = zero_memory(model, w, 3, n), zero_memory(model, w, 3, n, recompute=True)
    sbh = 4096 * 4096
    assert full.activations_bytes == 32 * int(sbh * 34)  # 10 + 24 / tp bytes per s b h per layer
    assert recomputed.activations_bytes == 32 * 2 * sbh + sbh * 34


def test_zero_memory_per_gpu_never_grows_with_more_gpus():
    model = ZOO["llama-2-7b"]
    for stage in range(4):
        for tp in (1, 2, 4):
            w = Workload("train", 1, 4096, tp=tp)
            sizes = [zero_memory(model, w, stage, dp).total_bytes for dp in (1, 2, 4, 8, 16, 32)]
            assert sizes == sorted(sizes, reverse=True), (stage, tp)


@pytest.fixture(scope="module")
def tm():
    composer = roofline_run.composer("llama-2-7b", train=True)
    return TrainingModel(composer, ZOO["llama-2-7b"], 2048, "bf16", HostLink(25.0, "test"), Peak(400e12, "test"))


def test_step_time_parts(tm):
    usable = 0.9 * 80 * GIB
    base = tm.evaluate(TrainConfig(1, 8, 1, False, False, 1), 64, usable)
    assert base.fits and base.grad_accum == 8
    m = tm.micro(1, 1)
    assert base.compute_s == pytest.approx(8 * (32 * (m.fwd_layer_s + m.bwd_layer_s) + m.model_s))
    recompute = tm.evaluate(TrainConfig(1, 8, 1, False, True, 1), 64, usable)
    assert recompute.compute_s - base.compute_s == pytest.approx(8 * 32 * m.fwd_layer_s)
    # ZeRO-3: each layer's parameters gathered before its forward and its backward, its gradients
    # reduce-scattered after; a layer costs the larger of its compute and its collectives (prefetch)
    z3 = tm.evaluate(TrainConfig(1, 8, 3, False, False, 1), 64, usable)
    layer = ZOO["llama-2-7b"].params_per_layer
    gather, scatter = tm.collective("allgather", 2 * layer, 8), tm.collective("reducescatter", 2 * layer, 8)
    rest = LLAMA2_7B_PARAMS - 32 * layer  # embeddings and head
    rest_s = 2 * tm.collective("allgather", 2 * rest, 8) + tm.collective("reducescatter", 2 * rest, 8)
    micro = 32 * (max(m.fwd_layer_s, gather) + max(m.bwd_layer_s, gather + scatter)) + m.model_s + rest_s
    assert z3.compute_s == pytest.approx(base.compute_s)
    assert z3.comm_exposed_s == pytest.approx(8 * micro - z3.compute_s)
    assert z3.optimizer_s == pytest.approx(base.optimizer_s)  # both step on an eighth of the parameters
    # offload: the optimizer step costs the host link and host memory instead of the GPU's AdamW
    off = tm.evaluate(TrainConfig(1, 8, 1, True, False, 1), 64, usable)
    shard = LLAMA2_7B_PARAMS // 8
    assert off.optimizer_s == pytest.approx(4 * shard / 25e9 + 28 * shard / 40e9, rel=1e-6)
    assert off.optimizer_s > base.optimizer_s
    assert 0 < base.mfu < 1


def test_training_tradeoff_frontier_choice_and_fit():
    composer = roofline_run.composer("llama-2-7b", train=True)
    t = training_tradeoff(composer, ZOO["llama-2-7b"], global_batch=256, seq_len=2048, max_gpus=32,
                          gpu=GpuMemory(80 * GIB, "test"), dtype="bf16", link=HostLink(25.0, "t"),
                          peak=Peak(400e12, "t"))
    assert all(p.fits for p in t.frontier)
    assert any(not p.fits for p in t.points)  # stage 0 on one GPU: 16 bytes a parameter do not fit
    assert not any(p.fits for p in t.points if p.config.gpus == 1 and not p.config.offload)
    for f in t.frontier:
        assert not any(p.step_s <= f.step_s and p.gpu_s_per_step < f.gpu_s_per_step * (1 - 1e-3)
                       for p in t.fitting)
    fastest = min(p.step_s for p in t.fitting)
    choice = t.choose(Slo({"step": fastest * 4}))
    assert choice.best.step_s <= fastest * 4 and choice.best.fits
    cheapest = min(p.gpu_s_per_step for p in t.fitting if p.step_s <= fastest * 4)
    assert choice.best.gpu_s_per_step == cheapest
    assert max(p.config.gpus for p in t.points) <= 32
