"""End-to-end estimates: training accounting, memory, the HELM export."""

import pytest

from opbench.analyze.compose import Composer
from opbench.analyze.estimate import TrainOptions, estimate, fewest_gpus, idealized_runtime, memory, model_flops_per_token
from opbench.spec.models import ZOO
from opbench.spec.workload import Workload
from opbench.spec.plan import plan

from tests.test_compose import measure_plan

PASS_COST = {"fwd": 1e-6, "dgrad": 2e-6, "wgrad": 3e-6, "bwd": 4e-6}


def composer_for(*plans):
    return Composer([m for p in plans for m in measure_plan(p, lambda c: PASS_COST[c.pass_])])


def layer_sum(p, keep):
    return sum(c.count * PASS_COST[c.pass_] for c in p.calls if c.scope == "layer" and keep(c))


def test_training_step_with_recompute_and_data_parallel_overlap():
    model, w = ZOO["tiny"], Workload("train", 2, 96, dtype="fp32")
    p = plan(model, w)
    composer = composer_for(p)
    base = estimate(composer, model, w)
    model_scope = sum(c.count * PASS_COST[c.pass_] for c in p.calls if c.scope == "model")
    assert base.time_s == pytest.approx(model.layers * layer_sum(p, lambda c: True) + model_scope)

    recompute = estimate(composer, model, w, train=TrainOptions(recompute=True))
    extra_fwd = model.layers * layer_sum(p, lambda c: c.pass_ == "fwd" and c.op != "adamw")
    assert recompute.time_s - base.time_s == pytest.approx(extra_fwd)

    backward = sum(c.count * PASS_COST[c.pass_] * (model.layers if c.scope == "layer" else 1)
                   for c in p.calls if c.pass_ in ("dgrad", "wgrad", "bwd"))
    comm = backward + 1e-3  # longer than the backward: only the excess shows
    sizes = []

    def collective_s(op, size_bytes, world):
        sizes.append((op, size_bytes, world))
        return comm
    overlapped = estimate(composer, model, w, train=TrainOptions(dp=4), collective_s=collective_s)
    assert overlapped.time_s - base.time_s == pytest.approx(1e-3)
    assert sizes[0] == ("allreduce", 2 * model.params, 4)  # bf16 gradients of every parameter
    exposed = estimate(composer, model, w, train=TrainOptions(dp=4, overlap=False), collective_s=collective_s)
    assert exposed.time_s - base.time_s == pytest.approx(comm)
    assert exposed.gpus == 4 and exposed.tokens_per_s_per_gpu == pytest.approx(2 * 96 / exposed.time_s)
    with pytest.raises(ValueError, match="collective model"):
        estimate(composer, model, w, train=TrainOptions(dp=2))


def test_mfu_uses_palm_flops_per_token():
    model, w = ZOO["tiny"], Workload("train", 2, 96, dtype="fp32")
    e = estimate(composer_for(plan(model, w)), model, w, peak_flops=1e12)
    n = model.layers * model.params_per_layer
    per_token = 6 * n + 12 * model.layers * model.heads * model.head_dim * 96
    assert model_flops_per_token(model, 96) == per_token
    assert e.mfu == pytest.approx((2 * 96 / e.time_s) * per_token / 1e12)


def test_llama2_70b_memory_by_hand():
    m = ZOO["llama-2-70b"]
    # per layer: qkv 8192 x 10240 + o 8192 x 8192 + MLP 3 x 8192 x 28672 + two norms of 8192
    per_layer = 83_886_080 + 67_108_864 + 704_643_072 + 16_384
    params = 80 * per_layer + 2 * 32000 * 8192 + 8192
    assert m.params == params == 68_976_648_192
    mem = memory(m, Workload("decode", 1, 4096))
    assert mem.weights_bytes == 2 * params
    assert mem.kv_cache_bytes == 2 * 80 * 8 * 128 * 4096 * 2  # K and V, 80 layers, 8 kv heads, bf16
    mem8 = memory(m, Workload("decode", 1, 4096, tp=8))
    assert mem8.weights_bytes == 2 * params // 8 and mem8.kv_cache_bytes == 2 * 80 * 1 * 128 * 4096 * 2
    train = memory(m, Workload("train", 1, 4096, tp=8))
    per_gpu = 80 * (per_layer // 8) + (32000 // 8) * 8192 * 2 + 8192  # what the optimizer calls update
    assert train.optimizer_bytes == 12 * per_gpu and train.grads_bytes == 2 * per_gpu
    assert train.activations_bytes == 80 * int(4096 * 8192 * (10 + 24 / 8))
    # 138 GB of bf16 weights need two 80 GB GPUs; tp must divide the 64 heads
    assert fewest_gpus(m, Workload("decode", 1, 4096), 80 * 2**30) == 2
    # training: 16 B/param (1.10 TB) plus activations; at tp=16 a GPU needs 69 GB of state and 31 GB of
    # activations, over 90% of 80 GiB, so the fewest is 32
    assert fewest_gpus(m, Workload("train", 1, 4096), 80 * 2**30) == 32


def test_helm_idealized_runtime_format():
    model = ZOO["tiny"]
    plans = [plan(model, Workload(ph, 1, n, dtype="fp32")) for ph, n in [("decode", 256)] +
             [("prefill", p) for p in (1, 16, 32, 64, 128, 256, 512)]]
    composer = composer_for(*plans)
    helm = idealized_runtime(composer, model, dtype="fp32", decode_context=256)
    assert set(helm) == {"runtime_per_output_token", "runtime_for_prompt_tokens"}
    assert list(helm["runtime_for_prompt_tokens"]) == ["1", "16", "32", "64", "128", "256", "512"]  # max_seq 512
    decode = composer.compose(plans[0]).total_s
    assert helm["runtime_per_output_token"] == pytest.approx(decode)
    assert all(isinstance(v, float) and v > 0 for v in helm["runtime_for_prompt_tokens"].values())
