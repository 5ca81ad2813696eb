"""Paged and fp8 KV caches: the block table's gather and the paged write round-trip, the Triton paged
split-KV decode kernel against a float64 reference under the interpreter (fp32 and fp16: the
interpreter computes bf16 wrongly) at odd shapes, the workload keys, the plan and the KV memory."""

import math

import pytest
import torch

from opbench.analyze.estimate import batch_capacity, kv_cache_bytes, memory
from opbench.kernels.paged_attention import paged_decode_attention
from opbench.ops import get_family
from opbench.ops.attention import AttentionShape, attention_math
from opbench.ops.dtypes import get_dtype
from opbench.ops.kvcache import KVWriteShape, paged_slots
from opbench.ops.paged_attention import (PagedAttentionShape, bytes_moved, gather, inputs, quantize_fp8, reference,
                                         shuffled_block_table)
from opbench.spec.models import ZOO
from opbench.spec.plan import plan
from opbench.spec.workload import PlanError, Workload, parse_workload

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # tests/conftest.py sets TRITON_INTERPRET=1 without one
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def rel_err(out, ref):
    return ((out.cpu().double() - ref.cpu()).norm() / ref.norm()).item()


def test_block_table_is_every_page_once_shuffled():
    table = shuffled_block_table(3, 5, "cpu")
    assert table.dtype == torch.int32 and sorted(table.flatten().tolist()) == list(range(15))
    assert table.flatten().tolist() != list(range(15))  # an allocator's order, not the sequences'
    assert torch.equal(table, shuffled_block_table(3, 5, "cpu"))  # seeded: the same for every backend


def test_paged_write_then_gather_gives_the_contiguous_cache_back():
    """Each sequence's tokens written one by one into its pages at slot table[j // page] * page + j % page,
    then gathered through the table: the contiguous K, token for token, for every page size."""
    torch.manual_seed(0)
    batch, kv_heads, head_dim, kv_len = 3, 2, 8, 37  # 37: no page size divides it
    contiguous = torch.randn(batch, kv_len, kv_heads, head_dim)
    for page in (16, 32, 64):
        per_seq = -(-kv_len // page)
        table = shuffled_block_table(batch, per_seq, "cpu")
        pages = torch.zeros(batch * per_seq, page, kv_heads, head_dim)
        flat = pages.view(-1, kv_heads, head_dim)
        for j in range(kv_len):  # decode steps: one token per sequence, to its own page
            slots = table[:, j // page].long() * page + j % page
            flat.index_copy_(0, slots, contiguous[:, j])
        shape = PagedAttentionShape(batch, kv_heads, kv_heads, head_dim, 1, kv_len, page=page)
        got = gather({"shape": shape, "k_pages": pages, "block_table": table}, "k", torch.float32)
        assert torch.equal(got, contiguous.transpose(1, 2)), page


def test_paged_slots_fill_pages_in_the_allocators_order():
    slots, pages = paged_slots(40, 16, "cpu")
    assert pages == 6 and len(set(slots.tolist())) == 40
    assert [s % 16 for s in slots[:18].tolist()] == list(range(16)) + [0, 1]  # rows of a page, then the next page
    assert len({s // 16 for s in slots.tolist()}) == 3


@pytest.mark.parametrize("shape", [KVWriteShape(37, 2, 24, page=16), KVWriteShape(5, 2, 24, page=64, kv_fp8_scales=2),
                                   KVWriteShape(9, 1, 96, page=32, kv_fp8_scales=1, latent=1)],
                         ids=["paged", "paged-fp8", "mla-latent-fp8"])
def test_paged_write_passes_the_gate_and_catches_a_wrong_slot(shape):
    from opbench.measure.gate import check

    family, dtype = get_family("kv_write"), get_dtype("fp16")
    inp = family.inputs(shape, dtype, "fwd", "cpu")
    out = family.backends["torch"].prepare(inp, dtype, "fwd")()
    assert check(out, family.reference(inp, dtype, "fwd"), dtype.tol).rel_err == 0
    wrong = family.inputs(shape, dtype, "fwd", "cpu")
    wrong["slots"] = wrong["slots"].roll(1)
    out = family.backends["torch"].prepare(wrong, dtype, "fwd")()
    wrong["slots"] = wrong["slots"].roll(-1)
    assert not check(out, family.reference(wrong, dtype, "fwd"), dtype.tol).passed


def test_fp8_quantization_per_head_and_per_tensor():
    x = torch.randn(4, 16, 3, 8) * torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3, 1)
    for per_head in (True, False):
        q, scale = quantize_fp8(x, per_head)
        assert q.dtype == torch.float8_e4m3fn and scale.shape == (3,)
        assert (scale.unique().numel() == 3) == per_head
        back = q.float() * scale.view(3, 1)
        assert rel_err(back, x.double()) < 0.05  # e4m3: 3 mantissa bits


# (batch, heads, kv_heads, head_dim, kv_len, kv_len_min, page, window, fp8 scales, sinks, dtype)
_KERNEL_CASES = [
    (3, 7, 1, 40, 45, 1, 16, 0, 0, 0, torch.float32),  # GQA 7, contexts 1..45: a one-token sequence, part pages
    (2, 14, 2, 64, 70, 0, 32, 0, 0, 0, torch.float16),  # GQA 7, two kv heads, 70 = 2 pages of 32 and a part
    (2, 4, 2, 32, 130, 0, 64, 20, 0, 0, torch.float32),  # a window inside the last pages
    (3, 4, 2, 32, 50, 7, 16, 0, 2, 0, torch.float16),  # fp8, a scale per kv head
    (2, 7, 1, 40, 33, 0, 16, 0, 1, 1, torch.float32),  # fp8 with one scale, and attention sinks
    (2, 4, 2, 32, 29, 0, 0, 0, 2, 0, torch.float32),  # fp8 in a contiguous cache
]


@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, kv_len, kv_len_min, page, window, fp8, sinks, dtype",
                         _KERNEL_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_triton_paged_decode_against_float64(batch, heads, kv_heads, head_dim, kv_len, kv_len_min, page, window,
                                             fp8, sinks, dtype):
    torch.manual_seed(1)
    s = PagedAttentionShape(batch, heads, kv_heads, head_dim, 1, kv_len, window, kv_len_min, page, fp8, sinks)
    inp = inputs(s, get_dtype("fp32" if dtype == torch.float32 else "fp16"), "fwd", DEVICE)
    want = reference(inp, None, "fwd")
    for splits in (3, None):  # uneven slices, some of the one-token sequence's empty
        out = paged_decode_attention(inp["q"], inp["k_pages"], inp["v_pages"], inp["block_table"], inp["kv_lens"],
                                     k_scale=inp.get("k_scale"), v_scale=inp.get("v_scale"), window=window,
                                     sinks=inp.get("sinks"), num_splits=splits)
        assert out.shape == inp["q"].shape and out.dtype == dtype
        assert rel_err(out, want) < TOL[dtype], splits


def test_reference_is_the_contiguous_attention_of_the_gathered_cache():
    """Without fp8 the paged reference is the dense one over the cache laid out in order."""
    s = PagedAttentionShape(2, 6, 2, 16, 1, 40, page=16, kv_len_min=9)
    inp = inputs(s, get_dtype("fp32"), "fwd", "cpu")
    k, v = (gather(inp, n, torch.float64) for n in "kv")
    dense = attention_math(inp["q"].double(), k, v, AttentionShape(2, 6, 2, 16, 1, 40, 1, 0, 9))
    assert torch.allclose(reference(inp, None, "fwd"), dense)


def test_kernel_rejects_an_fp8_cache_without_scales():
    s = PagedAttentionShape(1, 2, 1, 16, 1, 16, page=16, kv_fp8_scales=1)
    inp = inputs(s, get_dtype("fp32"), "fwd", DEVICE)
    with pytest.raises(ValueError, match="k_scale"):
        paged_decode_attention(inp["q"], inp["k_pages"], inp["v_pages"], inp["block_table"], inp["kv_lens"])


def test_bytes_by_hand():
    """b2 h8 kv2 d64, decode over 100 keys in pages of 16 (7 a sequence), bf16 and fp8 with per-head scales."""
    s = PagedAttentionShape(2, 8, 2, 64, 1, 100, page=16)
    q_o = 2 * 2 * 8 * 64 * 2
    tables = 2 * (7 + 1) * 4
    assert bytes_moved(s, get_dtype("bf16")) == q_o + 2 * 2 * 2 * 100 * 64 * 2 + tables
    fp8 = PagedAttentionShape(2, 8, 2, 64, 1, 100, page=16, kv_fp8_scales=2)
    assert bytes_moved(fp8, get_dtype("bf16")) == q_o + 2 * 2 * 2 * 100 * 64 * 1 + tables + 2 * 2 * 4


def test_workload_keys():
    w = parse_workload("decode:b=8,s=1000,paged=32,kv=fp8")
    assert (w.paged, w.kv_dtype) == (32, "fp8")
    assert parse_workload(w.label) == w and w.label.endswith(",paged=32,kv=fp8")
    for bad, what in (("decode:b=1,s=9,paged=24", "paged=24"), ("decode:b=1,s=9,kv=int4", "kv='int4'"),
                      ("train:b=1,s=9,paged=16", "keeps none")):
        with pytest.raises(PlanError, match=what):
            parse_workload(bad)


def test_plan_reads_and_writes_the_cache_as_the_workload_keeps_it():
    calls = {c.role: c for c in plan(ZOO["llama-3-8b"], parse_workload("decode:b=32,s=4096,paged=16,kv=fp8")).calls}
    core, write = calls["attn.core"], calls["attn.kv_write"]
    assert core.op == "paged_attention" and (core.shape.page, core.shape.kv_fp8_scales) == (16, 2)
    assert (write.shape.page, write.shape.kv_fp8_scales) == (16, 2)
    plain = {c.role: c for c in plan(ZOO["llama-3-8b"], parse_workload("decode:b=32,s=4096")).calls}
    assert plain["attn.core"].op == "attention" and plain["attn.kv_write"].shape.page == 0
    prefill = {c.role: c for c in plan(ZOO["llama-3-8b"], parse_workload("prefill:b=1,s=512,paged=64")).calls}
    assert prefill["attn.core"].op == "paged_attention" and prefill["attn.core"].shape.q_len == 512


def test_fp8_halves_the_kv_cache_and_pages_round_up():
    model = ZOO["llama-3-8b"]
    bf16 = Workload("decode", 32, 4096)
    assert memory(model, bf16).kv_cache_bytes == 32 * 4096 * 32 * 2 * 8 * 128 * 2
    assert kv_cache_bytes(model, Workload("decode", 32, 4096, kv_dtype="fp8")) * 2 == kv_cache_bytes(model, bf16)
    # 4000 tokens fill 250 pages of 16 but 63 of 64: the last page's empty slots are held too
    def kv(length, page=0):
        return kv_cache_bytes(model, Workload("decode", 1, length, paged=page))
    assert kv(4000, 16) == kv(4000) and kv(4000, 64) == kv(4032)
    gib = 80 * 2**30
    assert batch_capacity(model, Workload("decode", 1, 4096, kv_dtype="fp8"), gib) >= 2 * batch_capacity(
        model, Workload("decode", 1, 4096), gib) - 1
    assert math.isclose(batch_capacity(model, Workload("decode", 1, 4096), gib),
                        (0.9 * gib - memory(model, bf16).weights_bytes) // (32 * 4096 * 2 * 8 * 128 * 2), abs_tol=1)


_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from opbench.kernels.mla import _mla_decode_split
from opbench.kernels.paged_attention import _paged_decode_split

report = {}
for name, kernel, cache, meta in [
    ("paged-bf16", _paged_decode_split, "*bf16", dict(FP8=False, GROUP=4, HEAD_DIM=128, BLOCK_H=16, BLOCK_N=64,
                                                      BLOCK_D=128)),
    ("paged-fp8", _paged_decode_split, "*fp8e4nv", dict(FP8=True, GROUP=4, HEAD_DIM=128, BLOCK_H=16, BLOCK_N=64,
                                                        BLOCK_D=128)),
    ("mla-bf16", _mla_decode_split, "*bf16", dict(FP8=False, LATENT=512, ROPE=64, BLOCK_H=64, BLOCK_N=32,
                                                  BLOCK_L=512, BLOCK_R=64)),
    ("mla-fp8", _mla_decode_split, "*fp8e4nv", dict(FP8=True, LATENT=512, ROPE=64, BLOCK_H=64, BLOCK_N=32,
                                                    BLOCK_L=512, BLOCK_R=64)),
]:
    args = [p.name for p in kernel.params if not p.is_constexpr]
    kinds = {"Q": "*bf16", "K": cache, "V": cache, "CACHE": cache, "BLOCK_TABLE": "*i32", "KV_LENS": "*i32"}
    signature = {n: kinds.get(n, "*fp32") if n.isupper() else "fp32" if n.endswith("scale") else "i32" for n in args}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(args) if n.isupper() or n.startswith("stride")}
    compiled = triton.compile(ASTSource(kernel, signature, dict(meta, INPUT_PRECISION="ieee"), attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    ttgir = compiled.asm["ttgir"]
    report[name] = {"mma": "nvidia_mma" in ttgir, "wgmma": "warp_group_dot" in ttgir}
json.dump(report, sys.stdout)
"""


def test_paged_and_mla_kernels_compile_for_hopper():
    """Compiled for sm90 without a GPU, bf16 and fp8 caches: the dots on tensor cores (warp-group MMA
    for MLA's 64-head tiles)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert set(report) == {"paged-bf16", "paged-fp8", "mla-bf16", "mla-fp8"}
    assert all(f["mma"] for f in report.values()), report
    assert report["mla-bf16"]["wgmma"], report
