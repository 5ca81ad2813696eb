import pytest

from opbench.measure.cases import build_cases
from opbench.measure.hardware import gpu_info, stable_facts
from opbench.measure.selection import PROFILES, SelectionError, select
from opbench.spec.workload import parse_workload


def test_cpu_defaults_to_smoke_and_gpu_to_default():
    assert select(profile=None, device="cpu").profile.name == "smoke"
    assert select(profile=None, device="cuda").profile.name == "default"


def test_given_models_take_the_profile_workloads_and_vice_versa():
    smoke = PROFILES["smoke"]
    sel = select(profile="smoke", device="cpu", models=["llama-3-8b"], dtypes=["bf16"])
    assert {p.model.name for p in sel.plans} == {"llama-3-8b"}
    workloads = dict.fromkeys(w for _, w in smoke.pairs if parse_workload(w).ep == 1)  # ep: for MoE models only
    assert [p.workload.label for p in sel.plans] == [parse_workload(w).label for w in workloads]
    sel = select(profile="smoke", device="cpu", workloads=["decode:b=1,s=64"], dtypes=["fp16,bf16"])
    assert [(p.model.name, p.workload.phase, p.workload.dtype) for p in sel.plans] == [
        (m, "decode", d) for m in ("tiny", "tiny-alt", "tiny-moe", "tiny-q", "tiny-mla", "tiny-sink")
        for d in ("fp16", "bf16")]


def test_cases_are_distinct_and_list_every_role_they_serve():
    sel = select(profile="smoke", device="cpu", dtypes=["fp32"], backends=["torch"])
    cases = build_cases(sel.plans, "gemm", sel.backends)
    assert len({c.id for c in cases}) == len(cases)
    # prefill b=2,s=96 and train b=2,s=96 share the forward GEMMs of 192 tokens
    qkv = next(c for c in cases if "tiny/prefill/attn.qkv" in c.roles)
    assert "tiny/train/attn.qkv" in qkv.roles and qkv.id == "192x320x192-fp32-fwd-torch"


def test_profile_dtypes_per_model_unless_dtypes_are_given():
    sel = select(profile="smoke", device="cpu")
    assert {(p.model.name, p.workload.dtype) for p in sel.plans} == {
        ("tiny", "fp32"), ("tiny", "bf16"), ("tiny-alt", "fp32"), ("tiny-alt", "fp16"), ("tiny-moe", "fp32"),
        ("tiny-moe", "bf16"), ("tiny-q", "bf16"), ("tiny-mla", "fp32"), ("tiny-sink", "fp32")}
    assert sel.dtypes == ("fp32", "bf16", "fp16")
    sel = select(profile="smoke", device="cpu", dtypes=["bf16"])
    assert {p.workload.dtype for p in sel.plans} == {"bf16"}


def test_unknown_profile():
    with pytest.raises(SelectionError, match="unknown profile 'quick'"):
        select(profile="quick", device="cpu")


def test_machine_comparison_ignores_drifting_facts():
    base = {"machine": "x86_64", "system": "Linux", "release": "6.1", "python_implementation": "CPython",
            "python_version": "3.11.7", "cpu": {"brand_raw": "Xeon", "hz_actual": [2.1e9, 0]},
            "gpu": {"driver": "580.1", "cuda_driver": "13.0",
                    "devices": [{"name": "H100", "uuid": "GPU-1", "app_sm_clock_mhz": 1980, "pcie_gen": 5}]},
            "software": {"torch": "2.13.0"}}
    drifted = {**base, "cpu": {"brand_raw": "Xeon", "hz_actual": [3.0e9, 0]},
               "gpu": {**base["gpu"], "devices": [{"name": "H100", "uuid": "GPU-1", "app_sm_clock_mhz": 1410,
                                                   "pcie_gen": 1}]}}
    assert stable_facts(base) == stable_facts(drifted)
    upgraded = {**base, "gpu": {**base["gpu"], "driver": "590.2"}}
    assert stable_facts(upgraded) != stable_facts(base)


def test_gpu_info_without_nvml_says_why():
    info = gpu_info()
    assert info["available"] or info["reason"]
