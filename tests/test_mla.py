"""Multi-head latent attention: the absorbed decode kernel against a float64 reference under the
interpreter (latent 512 + 64 and an odd latent, contexts of one token and not multiples of the page,
shuffled pages, fp8), absorbed and non-absorbed forms giving the same output, prefill attention with
q/k 192 and v 128 wide, the FLOP and byte formulas by hand, DeepSeek-V3's plan, KV memory and figures."""

import pytest
import torch

from opbench.analyze.estimate import batch_capacity, fewest_gpus, kv_cache_bytes
from opbench.kernels.mla import mla_decode
from opbench.ops import get_family
from opbench.ops.attention import AttentionShape, attention_math
from opbench.ops.dtypes import get_dtype
from opbench.ops.mla import MLADecodeShape, bytes_moved, flops, inputs, mla_math, reference
from opbench.spec.models import ZOO
from opbench.spec.plan import plan
from opbench.spec.workload import Workload, parse_workload

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # tests/conftest.py sets TRITON_INTERPRET=1 without one
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def rel_err(out, ref):
    return ((out.cpu().double() - ref.cpu()).norm() / ref.norm()).item()


# (batch, heads, latent, rope, kv_len, kv_len_min, page, fp8, dtype)
_CASES = [
    (3, 5, 512, 64, 45, 1, 16, 0, torch.float32),  # DeepSeek's rows; contexts 1..45 in shuffled pages of 16
    (2, 17, 512, 64, 70, 0, 64, 0, torch.float16),  # FlashMLA's 64-token pages; 17 heads: a part head tile
    (2, 6, 80, 16, 33, 0, 0, 0, torch.float32),  # tiny-mla's odd latent, contiguous
    (2, 6, 512, 64, 50, 9, 32, 1, torch.float16),  # fp8 cache with one scale
]


@pytest.mark.parametrize("batch, heads, latent, rope, kv_len, kv_len_min, page, fp8, dtype", _CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
def test_triton_absorbed_decode_against_float64(batch, heads, latent, rope, kv_len, kv_len_min, page, fp8, dtype):
    torch.manual_seed(0)
    s = MLADecodeShape(batch, heads, latent, rope, 192, kv_len, kv_len_min, page, fp8)
    inp = inputs(s, get_dtype("fp32" if dtype == torch.float32 else "fp16"), "fwd", DEVICE)
    want = reference(inp, None, "fwd")
    for splits in (3, None):
        out = mla_decode(inp["q"], inp["cache"], inp["block_table"], inp["kv_lens"], latent, scale=192 ** -0.5,
                         kv_scale=inp.get("kv_scale"), num_splits=splits)
        assert out.shape == (batch, heads, latent) and out.dtype == dtype
        assert rel_err(out, want) < TOL[dtype], splits


def test_torch_backend_passes_the_gate():
    from opbench.measure.gate import check

    family, dtype = get_family("mla_decode"), get_dtype("bf16")
    s = MLADecodeShape(2, 4, 512, 64, 192, 40, 7, 64, 1)
    inp = family.inputs(s, dtype, "fwd", "cpu")
    assert check(family.backends["torch"].prepare(inp, dtype, "fwd")(), family.reference(inp, dtype, "fwd"),
                 dtype.tol).passed


def test_absorbed_and_naive_mla_agree():
    """Per head: k = [c W_UK_h, k_pe], v = c W_UV_h, attention over 192-wide keys and 128-wide values
    (the prefill form) equals attention of [q_nope W_UK_h^T, q_pe] over the cached rows [c, k_pe] with
    values c, then W_UV_h (the absorbed decode form)."""
    torch.manual_seed(1)
    batch, heads, latent, rope, nope, v_dim, ctx = 2, 4, 64, 16, 32, 24, 29
    c = torch.randn(batch, ctx, latent, dtype=torch.float64)
    k_pe = torch.randn(batch, ctx, rope, dtype=torch.float64)
    w_uk = torch.randn(heads, latent, nope, dtype=torch.float64) / latent ** 0.5
    w_uv = torch.randn(heads, latent, v_dim, dtype=torch.float64) / latent ** 0.5
    q_nope = torch.randn(batch, heads, 1, nope, dtype=torch.float64)
    q_pe = torch.randn(batch, heads, 1, rope, dtype=torch.float64)

    k = torch.cat([torch.einsum("bnl,hld->bhnd", c, w_uk), k_pe[:, None].expand(-1, heads, -1, -1)], -1)
    v = torch.einsum("bnl,hld->bhnd", c, w_uv)
    naive = attention_math(torch.cat([q_nope, q_pe], -1), k, v,
                           AttentionShape(batch, heads, heads, nope + rope, 1, ctx, 1, 0, value_dim=v_dim))

    q_absorbed = torch.cat([torch.einsum("bhqd,hld->bhql", q_nope, w_uk), q_pe], -1).squeeze(2)
    s = MLADecodeShape(batch, heads, latent, rope, nope + rope, ctx)
    latent_out = mla_math(q_absorbed, torch.cat([c, k_pe], -1), s)
    absorbed = torch.einsum("bhl,hld->bhd", latent_out, w_uv).unsqueeze(2)
    assert torch.allclose(absorbed, naive, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_flash_attention_with_192_wide_keys_and_128_wide_values(dtype):
    """MLA's prefill on the Triton flash kernels, forward and backward, against float64: 37 queries over
    45 keys, causal, heads as kv heads."""
    from opbench.kernels.attention import flash_attention, flash_attention_backward

    torch.manual_seed(2)
    family = get_family("attention")
    s = AttentionShape(1, 3, 3, 192, 37, 45, 1, 0, value_dim=128)
    inp = family.inputs(s, get_dtype("fp32" if dtype == torch.float32 else "fp16"), "bwd", DEVICE)
    q, k, v, do = inp["q"], inp["k"], inp["v"], inp["do"]
    o, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert o.shape == (1, 3, 37, 128)
    assert rel_err(o, family.reference(inp, None, "fwd")) < TOL[dtype]
    grads = flash_attention_backward(do, q, k, v, o, lse, causal=True)
    for name, got, want in zip(("dq", "dk", "dv"), grads, family.reference(inp, None, "bwd")):
        assert got.shape == want.shape and rel_err(got, want) < TOL[dtype], name


@pytest.mark.parametrize("backend", ["sdpa-math", "others-say-why"])
def test_prefill_attention_with_192_wide_keys_and_128_wide_values(backend):
    from opbench.measure.gate import check

    family, dtype = get_family("attention"), get_dtype("fp32")
    s = AttentionShape(1, 3, 3, 192, 37, 37, 1, 0, value_dim=128)
    if backend == "others-say-why":  # what cannot take a narrower v says so
        assert "v as wide" in family.backends["fa2"].requires(s, dtype, "cuda")
        assert "v as wide" in family.backends["triton-decode"].requires(s, dtype, "cuda")
        assert family.backends["triton"].requires(s, dtype, "cuda") is None or "triton" in str(
            family.backends["triton"].requires(s, dtype, "cuda"))
        return
    for pass_ in ("fwd", "bwd"):
        inp = family.inputs(s, dtype, pass_, "cpu")
        assert inp["v"].shape[-1] == 128
        out = family.backends[backend].prepare(inp, dtype, pass_)()
        assert check(out, family.reference(inp, dtype, pass_), 1e-5).passed, pass_


def test_flops_and_bytes_by_hand():
    """DeepSeek-V3 decode, one sequence of 4096 tokens, 128 heads, contiguous bf16: per head and token
    2 x 576 for the score and 2 x 512 for the value; the 576-wide rows read once for all heads."""
    s = MLADecodeShape(1, 128, 512, 64, 192, 4096)
    assert flops(s) == 128 * 4096 * (2 * 576 + 2 * 512)
    rows = 4096 * 576 * 2
    q_and_out = 128 * (576 + 512) * 2
    table_and_len = (1 + 1) * 4
    assert bytes_moved(s, get_dtype("bf16")) == rows + q_and_out + table_and_len
    fp8 = MLADecodeShape(1, 128, 512, 64, 192, 4096, page=64, kv_fp8_scales=1)
    assert bytes_moved(fp8, get_dtype("bf16")) == 4096 * 576 + q_and_out + (64 + 1) * 4 + 4
    # contexts 1..4096 over 2 sequences: 4097 tokens in all
    assert flops(MLADecodeShape(2, 128, 512, 64, 192, 4096, 1)) == 128 * 4097 * (2 * 576 + 2 * 512)


def test_deepseek_v3_plans_mla():
    model = ZOO["deepseek-v3"]
    decode = plan(model, parse_workload("decode:b=64,s=8192,ep=8"))
    roles = [c.role for c in decode.calls if c.kind == "full/moe"]
    assert roles[:roles.index("attn.o") + 1] == [
        "norm.input", "attn.q_down", "attn.q_norm", "attn.q_up", "attn.kv_down", "attn.kv_norm", "attn.rotary",
        "attn.kv_write", "attn.q_absorb", "attn.core", "attn.v_absorb", "attn.o"]
    calls = {c.role: c for c in decode.calls if c.kind == "full/moe"}
    assert calls["attn.kv_write"].shape.head_dim == 576 and calls["attn.kv_write"].shape.kv_heads == 1
    assert (calls["attn.kv_down"].shape.n, calls["attn.q_up"].shape.n) == (576, 128 * 192)
    absorb = calls["attn.q_absorb"]
    assert absorb.count == 128 and (absorb.shape.n, absorb.shape.k) == (512, 128)
    core = calls["attn.core"]
    assert core.op == "mla_decode"
    assert (core.shape.kv_lora_rank, core.shape.rope_dim, core.shape.heads) == (512, 64, 128)
    prefill = {c.role: c for c in plan(model, parse_workload("prefill:b=1,s=1024")).calls}
    att = prefill["attn.core"].shape
    assert prefill["attn.core"].op == "attention" and (att.head_dim, att.value_dim, att.kv_heads) == (192, 128, 128)
    assert prefill["attn.kv_up"].shape.n == 128 * (128 + 128) and prefill["attn.o"].shape.k == 128 * 128


def test_mla_cache_is_576_elements_a_token_and_shows_in_the_figures():
    model = ZOO["deepseek-v3"]
    assert model.kv_cache_elements_per_token == 576
    w = Workload("decode", 64, 8192, ep=8)
    assert kv_cache_bytes(model, w) == 61 * 576 * 2 * 64 * 8192
    # the same model with ordinary multi-head attention caches 128 heads x (192 + 128) a token
    from dataclasses import replace
    mha = replace(model, name="deepseek-v3-mha", kv_lora_rank=0, q_lora_rank=0, qk_rope_head_dim=0)
    assert kv_cache_bytes(mha, Workload("decode", 64, 8192)) == 61 * 128 * 320 * 2 * 64 * 8192
    gib = 141 * 2**30
    # at ep=32 on 141 GiB GPUs: about a hundred 8192-token sequences beside MLA's weights; with ordinary
    # attention one such sequence alone caches 41 GB, more than its larger weights leave
    one = Workload("decode", 1, 8192, ep=32)
    assert batch_capacity(model, one, gib) >= 100 and batch_capacity(mha, one, gib) == 0
    assert fewest_gpus(model, w, gib) == 32 and fewest_gpus(mha, w, gib) is None


def test_tiny_mla_plans_every_phase():
    for text in ("prefill:b=2,s=96", "decode:b=4,s=200,paged=64,kv=fp8", "train:b=2,s=96"):
        p = plan(ZOO["tiny-mla"], parse_workload(text))
        assert {c.kind for c in p.calls if c.scope == "layer"} == {"full/dense", "full/moe"}


def test_serving_simulation_counts_mla_cache_per_token():
    """opbench simulate's KV capacity: tiny-mla caches 80 + 16 elements a token and layer."""
    from opbench.analyze.simulate import ServingConfig, kv_capacity_tokens
    from opbench.analyze.tradeoff import GpuMemory

    model = ZOO["tiny-mla"]
    gpu = GpuMemory(2**24, "test")
    tokens = kv_capacity_tokens(model, ServingConfig(max_seqs=16, token_budget=64), gpu)
    per_token = 2 * (80 + 16) * 2  # layers, latent + rotary key, bf16
    assert tokens == int((gpu.usable_bytes - model.params * 2) // (16 * per_token)) * 16
