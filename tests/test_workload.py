import pytest

from opbench.spec.models import ZOO
from opbench.ops.attention import AttentionShape
from opbench.ops.collective import CollectiveShape
from opbench.ops.grouped_gemm import GroupedGemmShape
from opbench.spec.workload import PlanError, Workload, parse_workload
from opbench.spec.plan import plan


def gemms(p):
    """{(role, pass): (m, n, k)} of a plan's GEMM calls."""
    return {(c.role, c.pass_): (c.shape.m, c.shape.n, c.shape.k) for c in p.calls if c.op == "gemm"}


def only(p, op):
    calls = [c for c in p.calls if c.op == op]
    assert len({c.shape for c in calls}) == 1, calls
    return calls[0]


# Llama-3-8B: hidden 4096, 32 heads, 8 kv heads, head_dim 128, MLP 14336 (gated), vocab 128256.
def test_llama3_8b_prefill_tp1():
    p = plan(ZOO["llama-3-8b"], Workload("prefill", batch=1, seq_len=2048))
    assert gemms(p) == {
        ("attn.qkv", "fwd"): (2048, (32 + 2 * 8) * 128, 4096),  # 6144
        ("attn.o", "fwd"): (2048, 4096, 4096),
        ("mlp.gate_up", "fwd"): (2048, 2 * 14336, 4096),
        ("mlp.down", "fwd"): (2048, 4096, 14336),
        ("lm_head", "fwd"): (1, 128256, 4096),  # logits of the last position only
    }
    assert only(p, "attention").shape == AttentionShape(1, 32, 8, 128, 2048, 2048, 1, 0)
    assert not [c for c in p.calls if c.op == "allreduce"]


def test_llama3_8b_prefill_tp8():
    p = plan(ZOO["llama-3-8b"], Workload("prefill", batch=2, seq_len=1024, tp=8))
    assert gemms(p) == {
        ("attn.qkv", "fwd"): (2048, (4 + 2 * 1) * 128, 4096),  # 32/8 heads, 8/8 kv heads
        ("attn.o", "fwd"): (2048, 4096, 512),
        ("mlp.gate_up", "fwd"): (2048, 2 * 1792, 4096),
        ("mlp.down", "fwd"): (2048, 4096, 1792),
        ("lm_head", "fwd"): (2, 16032, 4096),  # 128256 / 8
    }
    assert only(p, "attention").shape == AttentionShape(2, 4, 1, 128, 1024, 1024, 1, 0)
    reduces = {c.role: c for c in p.calls if c.op == "allreduce"}
    assert set(reduces) == {"tp.allreduce.embed", "tp.allreduce.attn", "tp.allreduce.mlp"}
    assert reduces["tp.allreduce.attn"].shape == CollectiveShape(2048 * 4096 * 2, 8)  # bf16 activations
    assert reduces["tp.allreduce.attn"].count == 1


def test_llama3_8b_decode():
    for tp, heads, kv in ((1, 32, 8), (8, 4, 1)):
        p = plan(ZOO["llama-3-8b"], Workload("decode", batch=8, seq_len=4096, tp=tp))
        g = gemms(p)
        assert g[("attn.qkv", "fwd")] == (8, (heads + 2 * kv) * 128, 4096)
        assert g[("mlp.down", "fwd")] == (8, 4096, 14336 // tp)
        assert g[("lm_head", "fwd")] == (8, 128256 // tp, 4096)
        assert only(p, "attention").shape == AttentionShape(8, heads, kv, 128, 1, 4096, 1, 0)


def test_llama3_8b_train_has_dgrad_and_wgrad():
    p = plan(ZOO["llama-3-8b"], Workload("train", batch=2, seq_len=4096))
    g = gemms(p)
    t = 2 * 4096
    assert g[("attn.qkv", "fwd")] == (t, 6144, 4096)
    assert g[("attn.qkv", "dgrad")] == (t, 4096, 6144)  # tokens x in x out
    assert g[("attn.qkv", "wgrad")] == (4096, 6144, t)  # in x out x tokens
    assert g[("mlp.down", "wgrad")] == (14336, 4096, t)
    assert g[("lm_head", "fwd")] == (t, 128256, 4096)  # training needs every position's logits
    assert g[("lm_head", "wgrad")] == (4096, 128256, t)
    passes = {c.pass_ for c in p.calls if c.op == "attention"}
    assert passes == {"fwd", "bwd"}
    assert {c.op for c in p.calls} >= {"cross_entropy", "adamw", "rotary", "swiglu", "rmsnorm", "add", "embedding"}


# Llama-2-70B: hidden 8192, 64 heads, 8 kv heads, head_dim 128, MLP 28672, vocab 32000.
def test_llama2_70b_prefill_tp1_and_tp8():
    p1 = plan(ZOO["llama-2-70b"], Workload("prefill", batch=1, seq_len=4096))
    assert gemms(p1) == {
        ("attn.qkv", "fwd"): (4096, (64 + 16) * 128, 8192),
        ("attn.o", "fwd"): (4096, 8192, 8192),
        ("mlp.gate_up", "fwd"): (4096, 57344, 8192),
        ("mlp.down", "fwd"): (4096, 8192, 28672),
        ("lm_head", "fwd"): (1, 32000, 8192),
    }
    p8 = plan(ZOO["llama-2-70b"], Workload("prefill", batch=1, seq_len=4096, tp=8))
    assert gemms(p8) == {
        ("attn.qkv", "fwd"): (4096, (8 + 2) * 128, 8192),
        ("attn.o", "fwd"): (4096, 8192, 1024),
        ("mlp.gate_up", "fwd"): (4096, 7168, 8192),
        ("mlp.down", "fwd"): (4096, 8192, 3584),
        ("lm_head", "fwd"): (1, 4000, 8192),
    }


def test_llama2_70b_decode_and_train_tp8():
    d = plan(ZOO["llama-2-70b"], Workload("decode", batch=64, seq_len=2048, tp=8))
    assert gemms(d)[("attn.qkv", "fwd")] == (64, 1280, 8192)
    assert only(d, "attention").shape == AttentionShape(64, 8, 1, 128, 1, 2048, 1, 0)
    t = plan(ZOO["llama-2-70b"], Workload("train", batch=1, seq_len=4096, tp=8))
    g = gemms(t)
    assert g[("attn.o", "dgrad")] == (4096, 1024, 8192)
    assert g[("attn.o", "wgrad")] == (1024, 8192, 4096)
    assert g[("mlp.gate_up", "wgrad")] == (8192, 7168, 4096)
    # Megatron's f/g pair: one all-reduce forward and one backward per row-parallel GEMM.
    attn_reduce = [c for c in t.calls if c.role == "tp.allreduce.attn"]
    assert [c.count for c in attn_reduce] == [2]


def test_kv_heads_replicated_when_fewer_than_gpus():
    p = plan(ZOO["llama-2-70b"], Workload("decode", batch=1, seq_len=128, tp=16))
    assert only(p, "attention").shape.kv_heads == 1 and only(p, "attention").shape.heads == 4


def test_sliding_window_and_moe():
    m = plan(ZOO["mistral-7b"], Workload("prefill", batch=1, seq_len=8192))
    assert only(m, "attention").shape.window == 4096
    short = plan(ZOO["mistral-7b"], Workload("prefill", batch=1, seq_len=1024))
    assert only(short, "attention").shape.window == 0  # a window longer than the sequence changes nothing
    x = plan(ZOO["mixtral-8x7b"], Workload("prefill", batch=1, seq_len=1000))
    g = {c.role: c for c in x.calls if c.op in ("gemm", "grouped_gemm")}
    assert (g["moe.route.router"].shape.n, g["moe.expert.gate_up"].count) == (8, 1)
    # one grouped GEMM over 1000 tokens x top-2 copies, ragged over the 8 experts (tests/test_moe_plan.py)
    assert g["moe.expert.gate_up"].shape == GroupedGemmShape(1000, 8, 2, 1, 2 * 14336, 4096)


def test_finetune_freezes_base_weights_and_adds_adapters():
    p = plan(ZOO["llama-3-8b"], Workload("finetune", batch=1, seq_len=1024, lora_rank=8))
    g = gemms(p)
    assert ("attn.qkv", "wgrad") not in g and ("attn.qkv", "dgrad") in g
    assert g[("lora.attn.qkv.a", "fwd")] == (1024, 8, 4096)
    assert g[("lora.attn.qkv.b", "fwd")] == (1024, 6144, 8)
    assert g[("lora.attn.qkv.a", "wgrad")] == (4096, 8, 1024)


def test_parse_workload():
    w = parse_workload("decode:b=32, s=4096, tp=8", "fp16")
    assert w == Workload("decode", 32, 4096, tp=8, dtype="fp16")
    assert parse_workload(w.label, "fp16") == w


@pytest.mark.parametrize("text, message", [
    ("prefill", "expected PHASE:b=BATCH"),
    ("prefil:b=1,s=2", "unknown phase 'prefil'"),
    ("prefill:b=1", "missing s"),
    ("prefill:b=0,s=2", "batch must be a positive integer"),
    ("prefill:b=1,s=-4", "seq_len must be a positive integer"),
    ("prefill:b=1,s=x", "s must be an integer"),
    ("prefill:b=1,s=2,pp=2", "unknown key 'pp'"),
])
def test_bad_workloads(text, message):
    with pytest.raises(PlanError, match=message):
        parse_workload(text)


@pytest.mark.parametrize("model, workload, message", [
    ("llama-3-8b", Workload("prefill", 1, 128, tp=3), "tp=3 does not divide llama-3-8b's 32 attention heads"),
    ("llama-2-7b", Workload("prefill", 1, 8192), "exceeds llama-2-7b's max_seq_len 4096"),
    ("tiny", Workload("decode", 1, 16, tp=3), "tp=3 neither divides nor is a multiple of tiny.s 2 kv heads"),
])
def test_impossible_plans(model, workload, message):
    with pytest.raises(PlanError, match=message):
        plan(ZOO[model], workload)
