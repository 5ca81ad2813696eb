"""HELM's idealized runtime: the file HELM reads, looked up the way HELM's efficiency metric does."""

import json

import pytest

from opbench.analyze.helm import (DENOISED_PROMPT_TOKENS, IDEALIZED_PROMPT_TOKENS, config_runtime, helm_entry,
                                  helm_name, helm_runtime)
from opbench.analyze.tradeoff import InferenceConfig
from opbench.spec.models import ZOO
from opbench.spec.plan import plan
from opbench.spec.workload import PlanError, Workload

from tests import roofline_run


def test_lookup_as_helm_does():
    entry = {"runtime_per_output_token": 0.02,
             "runtime_for_prompt_tokens": {"1": 0.01, "16": 0.016, "32": 0.03, "64": 0.05}}
    # the smallest profiled length k >= p, scaled by p / k, plus (o - 1) output tokens
    assert helm_runtime(entry, 20, 5) == pytest.approx(0.03 * 20 / 32 + 4 * 0.02)
    assert helm_runtime(entry, 32, 1) == pytest.approx(0.03)
    assert helm_runtime(entry, 1, 0) == pytest.approx(0.01)  # no output: the prompt alone
    # beyond the largest: the largest scaled up
    assert helm_runtime(entry, 100, 2) == pytest.approx(0.05 * 100 / 64 + 0.02)
    # the denoised form adds its overhead
    assert helm_runtime({**entry, "overhead": 0.2}, 16, 3) == pytest.approx(0.016 + 2 * 0.02 + 0.2)


def test_the_file_has_helms_shape_and_prompt_lengths():
    composer = roofline_run.composer()
    model = ZOO["llama-3-8b"]
    name = helm_name(model)
    data = {name: helm_entry(composer, model, decode_context=1024)}
    assert list(data) == ["meta/llama-3-8b"]
    entry = json.loads(json.dumps(data))["meta/llama-3-8b"]
    assert set(entry) == {"runtime_per_output_token", "runtime_for_prompt_tokens"}
    assert list(entry["runtime_for_prompt_tokens"]) == [str(p) for p in IDEALIZED_PROMPT_TOKENS]
    prefill_1024 = composer.compose(plan(model, Workload("prefill", 1, 1024))).total_s
    decode = composer.compose(plan(model, Workload("decode", 1, 1024))).total_s
    assert entry["runtime_for_prompt_tokens"]["1024"] == pytest.approx(prefill_1024)
    # HELM's estimate of a request of 1000 prompt and 100 output tokens, from the file alone
    assert helm_runtime(entry, 1000, 100) == pytest.approx(prefill_1024 * 1000 / 1024 + 99 * decode)

    denoised = helm_entry(composer, model, form="denoised", overhead_s=0.1, tp=2, cost_aware=True)
    assert list(denoised["runtime_for_prompt_tokens"]) == [str(p) for p in DENOISED_PROMPT_TOKENS]
    assert denoised["overhead"] == pytest.approx(0.2)  # x 2 GPUs, as every other figure


def test_names():
    assert helm_name(ZOO["llama-2-7b"]) == "meta/llama-2-7b"
    assert helm_name(ZOO["tiny"], "acme/tiny") == "acme/tiny"
    with pytest.raises(PlanError, match="--name"):
        helm_name(ZOO["tiny"])
    with pytest.raises(PlanError, match="organization/model"):
        helm_name(ZOO["tiny"], "tiny")


def test_per_configuration_runtime_and_cost():
    composer = roofline_run.composer()
    model = ZOO["llama-3-8b"]
    c = InferenceConfig(2, 8, "bf16", "graph")
    r = config_runtime({"graph": composer}, model, c, 1024)
    batch_prefill = composer.compose(plan(model, Workload("prefill", 8, 512, tp=2))).total_s
    assert r.entry["runtime_for_prompt_tokens"]["512"] == pytest.approx(batch_prefill)
    # cost-aware: a request's share of two GPUs held by a batch of eight
    assert r.gpu_s(512, 65) == pytest.approx(helm_runtime(r.entry, 512, 65) * 2 / 8)
    assert helm_runtime(r.cost_entry(), 512, 65) == pytest.approx(r.gpu_s(512, 65))
