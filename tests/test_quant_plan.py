"""Quantized weights in the workload grammar, the plan, the cases, the work formulas, the skip reasons, the
memory and estimates, and the quantization view."""

import json

import pytest
import torch

from opbench.analyze.compose import Composer
from opbench.analyze.estimate import fewest_gpus, idealized_runtime, memory
from opbench.analyze.quantization import DECODE_BATCHES, format_rows
from opbench.analyze.report import _quantization_html
from opbench.analyze.session import compose_session
from opbench.cli import main
from opbench.measure.cases import build_cases, case_dtype
from opbench.measure.selection import PROFILES, select
from opbench.measure.summary import quantization_lines
from opbench.ops import act_quant, dequant, get_family, scaled_gemm, wgemm
from opbench.ops.dtypes import get_dtype
from opbench.spec.models import ZOO
from opbench.spec.plan import plan
from opbench.spec.workload import PlanError, Workload, parse_workload
from tests.planned_runs import op_records, write_run

GIB = 2**30


# The grammar and the plan -----------------------------------------------------------------------------------

def test_w_key_parses_labels_and_round_trips():
    w = parse_workload("decode:b=4,s=200,w=int4")
    assert (w.weights, w.dtype) == ("int4", "bf16") and w.label == "decode:b=4,s=200,tp=1,w=int4"
    assert parse_workload(w.label) == w
    assert parse_workload("decode:b=4,s=200").weights == ""
    for text, error in (("decode:b=1,s=8,w=int3", "unknown weight format 'int3'"),
                        ("train:b=1,s=8,w=int4", "frozen"),
                        ("finetune:b=1,s=8,w=int4", "QLoRA's NF4"),
                        ):
        with pytest.raises(PlanError, match=error):
            parse_workload(text)
    with pytest.raises(PlanError, match="int4 weights take bf16 activations"):
        parse_workload("decode:b=1,s=8,w=int4", "fp16")


def test_plan_emits_each_formats_ops_for_the_decoder_linears_only():
    model = ZOO["tiny-q"]

    def ops(text):
        return [(c.role, c.op, c.pass_, c.count) for c in plan(model, parse_workload(text)).calls
                if c.op in ("gemm", "wgemm", "scaled_gemm", "act_quant", "dequant")]

    assert ops("decode:b=4,s=200,w=int8") == [
        ("attn.qkv", "wgemm", "fwd", 1), ("attn.o", "wgemm", "fwd", 1), ("mlp.gate_up", "wgemm", "fwd", 1),
        ("mlp.down", "wgemm", "fwd", 1), ("lm_head", "gemm", "fwd", 1)]  # the LM head stays bf16
    block = ops("prefill:b=1,s=64,w=fp8-block")
    assert block[:2] == [("attn.qkv.act_quant", "act_quant", "fwd", 1), ("attn.qkv", "scaled_gemm", "fwd", 1)]
    assert [o for _, o, _, _ in block].count("act_quant") == 4  # before each fp8 GEMM of the layer
    qlora = ops("finetune:b=1,s=64,w=nf4")
    assert qlora[:3] == [("attn.qkv.dequant", "dequant", "fwd", 2),  # forward, and again for dgrad
                         ("attn.qkv", "gemm", "fwd", 1), ("attn.qkv", "gemm", "dgrad", 1)]
    assert not any(role == "attn.qkv" and p == "wgrad" for role, _, p, _ in qlora)  # frozen base
    assert ("lora.attn.qkv.a", "gemm", "wgrad", 1) in qlora  # the bf16 adapters train
    with pytest.raises(PlanError, match="mixture of experts"):
        plan(ZOO["tiny-moe"], parse_workload("decode:b=1,s=8,w=int4"))


def test_cases_run_in_the_weight_format():
    p = plan(ZOO["tiny-q"], parse_workload("decode:b=4,s=200,w=int4"))
    cases = build_cases([p], "wgemm", ["torch"])
    assert [c.id for c in cases] == ["4x512x256-int4-fwd-torch", "4x256x256-int4-fwd-torch",
                                     "4x768x256-int4-fwd-torch", "4x256x384-int4-fwd-torch"]
    assert build_cases([p], "gemm", ["torch"])[0].dtype == "bf16"  # the LM head
    assert build_cases([plan(ZOO["tiny-q"], parse_workload("decode:b=4,s=200"))], "wgemm") == []


def test_smoke_profile_runs_quantized_workloads_once_in_bf16():
    sel = select(profile="smoke", device="cpu")
    quantized = [p.name for p in sel.plans if p.workload.weights]
    assert quantized == ["tiny-q/decode:b=4,s=200,tp=1,w=int8/bf16", "tiny-q/decode:b=4,s=200,tp=1,w=int4/bf16",
                         "tiny-q/prefill:b=2,s=96,tp=1,w=int4/bf16"]
    assert ("tiny-q", "decode:b=4,s=200,w=int4") in PROFILES["smoke"].pairs
    # fp32 given: the profile's quantized workloads are left out, not an error
    assert not [p for p in select(profile="smoke", device="cpu", dtypes=["fp32"]).plans if p.workload.weights]


# Work, by hand ----------------------------------------------------------------------------------------------

def test_flops_and_bytes_by_hand():
    int4, int8 = get_dtype("int4"), get_dtype("int8")
    s = wgemm.WGemmShape(16, 4096, 4096)
    assert wgemm.flops(s) == 2 * 16 * 4096 * 4096  # the dense GEMM's
    # x and y in bf16; 4-bit weights; a bf16 scale and a bf16 zero per 128 inputs of each row
    assert wgemm.bytes_moved(s, int4) == 16 * 4096 * 2 + 4096 * 4096 // 2 + 4096 * 32 * (2 + 2) + 16 * 4096 * 2
    assert wgemm.bytes_moved(s, int8) == 16 * 4096 * 2 + 4096 * 4096 + 4096 * 2 + 16 * 4096 * 2
    fp8_block, fp8_row = get_dtype("fp8-block"), get_dtype("fp8-row")
    g = scaled_gemm.ScaledGemmShape(256, 512, 384)
    assert scaled_gemm.flops(g) == 2 * 256 * 512 * 384
    # a: 1 B each and an fp32 scale per 128 of a row; b: 1 B each and one per 128 x 128 block; y bf16
    assert scaled_gemm.bytes_moved(g, fp8_block) == (256 * 384 + 256 * 3 * 4) + (512 * 384 + 4 * 3 * 4) + 256 * 512 * 2
    assert scaled_gemm.bytes_moved(g, fp8_row) == (256 * 384 + 256 * 4) + (512 * 384 + 512 * 4) + 256 * 512 * 2
    assert scaled_gemm.bytes_moved(g, get_dtype("fp8")) == (256 * 384 + 4) + (512 * 384 + 4) + 256 * 512 * 2
    a = act_quant.ActQuantShape(10, 4096)
    assert act_quant.bytes_moved(a, fp8_block) == 10 * 4096 * 2 + 10 * 4096 + 10 * 32 * 4
    assert act_quant.bytes_moved(a, fp8_row) == 10 * 4096 * 2 + 10 * 4096 + 10 * 4
    assert act_quant.flops(a) == 2 * 10 * 4096
    d = dequant.DequantShape(4096, 4096)
    assert dequant.bytes_moved(d, get_dtype("nf4")) == 4096 * 4096 // 2 + 4096 * 64 * 4 + 4096 * 4096 * 2
    assert dequant.flops(d) == 4096 * 4096


# Combinations that cannot run skip with their reason -----------------------------------------------------------

def test_int4_group_not_dividing_k_skips_with_its_reason():
    shape, int4 = wgemm.WGemmShape(4, 320, 192), get_dtype("int4")  # 192 is no multiple of 128
    reason = "int4 groups of 128 inputs need K a multiple of 128 (K=192)"
    for backend in ("torch", "triton"):
        assert wgemm.WGEMM.backends[backend].requires(shape, int4, "cpu") == reason
    assert wgemm.WGEMM.backends["torch"].requires(wgemm.WGemmShape(4, 40, 256), int4, "cpu") == \
        "torch's CPU int4 layout needs N a multiple of 16 (N=40)"
    assert wgemm.WGEMM.backends["triton"].requires(wgemm.WGemmShape(4, 48, 256), int4, "cpu").startswith(
        "Triton kernels are timed on GPUs only")
    assert dequant.DEQUANT.backends["torch"].requires(dequant.DequantShape(8, 96), get_dtype("nf4"), "cpu") == \
        "nf4 groups of 64 inputs need K a multiple of 64 (K=96)"


def test_fp8_skips_on_cpu_and_on_a_gpu_without_fp8(monkeypatch):
    shape = scaled_gemm.ScaledGemmShape(16, 64, 256)
    for fmt in ("fp8", "fp8-row", "fp8-block"):
        for backend in ("torch", "triton"):
            reason = scaled_gemm.SCALED_GEMM.backends[backend].requires(shape, get_dtype(fmt), "cpu")
            assert reason in (f"{fmt} matmul needs a CUDA GPU of compute capability 8.9 or newer",
                              "Triton kernels are timed on GPUs only (on CPU the interpreter's timings mean nothing)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100
    assert scaled_gemm.SCALED_GEMM.backends["torch"].requires(shape, get_dtype("fp8-row"), "cuda") == \
        "fp8-row matmul needs compute capability 8.9 or newer (this GPU: 8.0)"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))  # an L40S
    monkeypatch.setattr(scaled_gemm, "probe", lambda key, call: None)  # no GPU here to try the kernel on
    torch_scaled = scaled_gemm.SCALED_GEMM.backends["torch"].requires
    assert torch_scaled(scaled_gemm.ScaledGemmShape(16, 128, 256), get_dtype("fp8-block"), "cuda") == \
        "torch's 128 x 128 block-scaled fp8 GEMM runs on Hopper (sm_90) only"
    assert torch_scaled(shape, get_dtype("fp8-block"), "cuda") == \
        "torch's block-scaled fp8 GEMM needs whole 128 x 128 blocks (N=64, K=256)"
    assert torch_scaled(shape, get_dtype("fp8-row"), "cuda") is None
    monkeypatch.setattr(scaled_gemm, "probe", lambda key, call: "RuntimeError: no rowwise kernel")
    assert torch_scaled(shape, get_dtype("fp8-row"), "cuda") == \
        "torch's scaled GEMM does not take fp8-row scales here (RuntimeError: no rowwise kernel)"
    assert act_quant.ACT_QUANT.backends["triton"].requires(act_quant.ActQuantShape(4, 256), get_dtype("fp8"),
                                                           "cuda").startswith("per-tensor scaling needs")


# Memory and estimates ---------------------------------------------------------------------------------------------

def test_llama3_70b_int4_memory_by_hand():
    m = ZOO["llama-3-70b"]
    w = Workload("decode", 1, 4096, weights="int4")
    # per layer: qkv (64 x 128 + 2 x 8 x 128) x 8192, o 8192 x 8192, gate/up 2 x 28672 x 8192, down 8192 x 28672
    linear = 8192 * (10240 + 8192 + 57344 + 28672)
    per_layer = linear // 2 + linear // 128 * 4  # 4 bits each; a bf16 scale and zero per 128
    rest = 80 * 2 * 8192 + 2 * 128256 * 8192 + 8192  # norms, embedding, LM head, final norm: bf16
    assert memory(m, w).weights_bytes == 80 * per_layer + 2 * rest == 40_569_946_112  # 37.8 GiB
    kv = 2 * 80 * 8 * 128 * 4096 * 2
    assert memory(m, w).total_bytes == 40_569_946_112 + kv
    assert memory(m, Workload("decode", 1, 4096)).weights_bytes == 2 * m.params  # 131 GiB in bf16
    assert fewest_gpus(m, w, 80 * GIB) == 1 and fewest_gpus(m, Workload("decode", 1, 4096), 80 * GIB) == 2
    assert memory(m, Workload("decode", 1, 4096, tp=2, weights="int4")).weights_bytes == 40_569_946_112 // 2


def quantized_run(tmp_path):
    """A run of tiny-q in bf16, int8 and int4 whose calls take their bytes over 100 GB/s."""
    plans = [plan(ZOO["tiny-q"], parse_workload(t)) for t in
             ("prefill:b=2,s=96", "decode:b=4,s=200", "decode:b=4,s=200,w=int8", "decode:b=4,s=200,w=int4",
              "prefill:b=2,s=96,w=int4")]
    records = {}
    for p in plans:  # an OpCall does not hold the plan's weight format: each plan's calls timed apart
        def seconds(call, w=p.workload):
            dtype = get_dtype(case_dtype(call.op, w.dtype, w.weights))
            return 1e-6 + get_family(call.op).bytes(call.shape, dtype, call.pass_) / 1e11
        for r in op_records([p], seconds):
            records.setdefault(r.key, r)
    records = list(records.values())
    return plans, records, write_run(tmp_path / "run.json", records, plans=plans)


def test_estimate_command_reports_4bit_memory_and_fewer_gpus(tmp_path, capsys):
    _, _, path = quantized_run(tmp_path)
    args = ["estimate", str(path), "--model", "llama-3-70b", "--phase", "decode", "--batch", "1", "--context", "4096",
            "--gpu-memory-gib", "80", "--json"]
    assert main(args + ["--weights", "int4"]) == 0
    int4 = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert int4["fewest_gpus"] == 1 and bf16["fewest_gpus"] == 2
    assert int4["estimate"]["memory"]["weights_bytes"] == 40_569_946_112
    assert int4["estimate"]["time_s"] < bf16["estimate"]["time_s"]  # decode moves 4-bit weights
    assert main(args[:-1] + ["--weights", "int4"]) == 0
    text = capsys.readouterr().out
    assert "memory per CPU 39.03 GiB; fewest CPUs that hold it: 1" in text


def test_quantization_view_and_idealized_runtime_per_format(tmp_path):
    plans, records, _ = quantized_run(tmp_path)
    composer = Composer(records)
    rows = format_rows(composer, plans)
    assert [(r.model, r.label) for r in rows] == [("tiny-q", "bf16"), ("tiny-q", "int8"), ("tiny-q", "int4")]
    bf16, int8, int4 = rows
    assert list(int4.decode_s) == list(DECODE_BATCHES) and int4.context == 200 and int4.prompt_tokens == 192
    assert int4.weights_bytes < int8.weights_bytes < bf16.weights_bytes
    assert int4.decode_s[4] < int8.decode_s[4] < bf16.decode_s[4]
    assert int8.prefill_s is None or int8.prefill_s > 0
    result = compose_session(plans, records)
    assert [r["weights"] for r in result["quantization"]] == ["", "int8", "int4"]
    lines = quantization_lines(result["quantization"])
    assert lines[0].startswith("quantization view (tiny-q: decode at context 200, prefill of 192 tokens")
    assert any(" int4 " in f" {line} " for line in lines[2:])
    html = _quantization_html({"quantization": result["quantization"]})
    assert "decode b=64" in html and "int4" in html
    fast = idealized_runtime(composer, ZOO["tiny-q"], weights="int4", decode_context=200, prompt_tokens=(1, 16))
    slow = idealized_runtime(composer, ZOO["tiny-q"], decode_context=200, prompt_tokens=(1, 16))
    assert fast["runtime_per_output_token"] < slow["runtime_per_output_token"]


def test_the_reference_units_leave_quantized_plans_out():
    """The reference layer holds plain weights of the workload dtype: timing it for a w= plan would check
    a quantized composition against an unquantized layer."""
    from opbench.measure.units import unit_cases

    plans = [plan(ZOO["tiny-q"], parse_workload(t)) for t in ("decode:b=4,s=200", "decode:b=4,s=200,w=int4")]
    assert {c.plan.workload.weights for c in unit_cases(plans)} == {""}


def test_a_failing_probe_is_remembered_with_the_librarys_words():
    from opbench.ops import base

    calls = []

    def fail():
        calls.append(1)
        raise RuntimeError("no kernel image for this device\nmore")
    assert base.probe(("test-probe",), fail) == "RuntimeError: no kernel image for this device"
    assert base.probe(("test-probe",), fail) == "RuntimeError: no kernel image for this device" and len(calls) == 1


def test_torch_int8_on_a_cpu_skips_rows_its_kernel_cannot_read():
    # torch 2.13's CPU _weight_int8pack_mm ends the process with a segmentation fault when K is not a
    # multiple of 16: the case must skip with that reason, never reach the kernel
    from opbench.ops.dtypes import get_dtype
    from opbench.ops.wgemm import WGEMM, WGemmShape

    requires = WGEMM.backends["torch"].requires
    assert "multiple of 16" in requires(WGemmShape(4, 192, 520), get_dtype("int8"), "cpu")
    assert requires(WGemmShape(4, 192, 528), get_dtype("int8"), "cpu") is None
