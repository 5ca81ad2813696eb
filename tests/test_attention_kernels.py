"""The Triton attention kernels (kernels/attention.py) against a float64 reference, under the
interpreter on a CPU (compiled where a GPU is visible), at sizes that are not multiples of the tiles: head_dim 80 and 96 (padded to 128
inside the kernels), 100 queries, 257 keys, GQA ratios 4 and 8, windows shorter than the sequence.

The interpreter computes bf16 dots wrongly, so these tests run fp32 and fp16 only; the kernels take
bf16 alike. fp16 results are compared at fp16's tolerance, fp32 at fp32's.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opbench.kernels.attention import decode_attention, flash_attention, flash_attention_backward
from tests.helpers import twin_autotuner

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # tests/conftest.py sets TRITON_INTERPRET=1 without one


def reference(q, k, v, causal, window=0, kv_lens=None):
    """float64 attention with bottom-right causal alignment, per-sequence contexts and a window."""
    q, k, v = (t.cpu().double() for t in (q, k, v))
    (batch, heads, q_len, head_dim), kv_len = q.shape, k.shape[2]
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    ctx = (kv_lens.cpu().long() if kv_lens is not None else torch.full((batch,), kv_len)).view(-1, 1, 1, 1)
    pos = torch.arange(q_len).view(1, 1, -1, 1) + ctx - q_len
    key = torch.arange(kv_len).view(1, 1, 1, -1)
    keep = key < ctx
    if causal:
        keep = keep & (key <= pos)
    if window:
        keep = keep & (key > pos - window)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, -1) @ v


def rel_err(out, ref):
    return ((out.cpu().double() - ref).norm() / ref.norm()).item()


# (heads, kv_heads, head_dim, q_len, kv_len, causal, window, dtype): one program column per head
_FLASH_CASES = [
    (4, 1, 80, 100, 257, True, 0, torch.float32),  # GQA 4, causal with fewer queries than keys
    (8, 1, 80, 100, 257, True, 64, torch.float16),  # GQA 8 (MQA here), window shorter than the sequence
    (4, 1, 96, 100, 257, False, 0, torch.float16),  # no mask, head_dim 96
    (2, 2, 64, 100, 100, True, 30, torch.float32),  # MHA, square causal with a window, head_dim 64
]


@pytest.mark.parametrize("heads, kv_heads, head_dim, q_len, kv_len, causal, window, dtype", _FLASH_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
def test_flash_attention_forward_and_backward(heads, kv_heads, head_dim, q_len, kv_len, causal, window, dtype):
    torch.manual_seed(0)
    q = torch.randn(1, heads, q_len, head_dim, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(1, kv_heads, kv_len, head_dim, dtype=dtype, device=DEVICE) for _ in range(2))
    o, lse = flash_attention(q, k, v, causal=causal, window=window, return_lse=True)
    assert o.dtype == dtype and o.shape == q.shape
    assert rel_err(o, reference(q, k, v, causal, window)) < TOL[dtype]

    do = torch.randn_like(q)
    grads = flash_attention_backward(do, q, k, v, o, lse, causal=causal, window=window)
    leaves = [t.cpu().double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(reference(*leaves, causal, window), leaves, do.cpu().double())
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert rel_err(got, want) < TOL[dtype], name


def test_flash_attention_reads_strided_inputs():
    """q, k, v as (batch, seq, heads, d) buffers viewed as (batch, heads, seq, d), as models hold them."""
    torch.manual_seed(1)
    q = torch.randn(2, 33, 4, 80, dtype=torch.float32, device=DEVICE).transpose(1, 2)
    k, v = (torch.randn(2, 47, 2, 80, dtype=torch.float32, device=DEVICE).transpose(1, 2) for _ in range(2))
    assert rel_err(flash_attention(q, k, v, causal=True), reference(q, k, v, True)) < 1e-5


# (heads, kv_heads, window, dtype); three sequences of 257 cache slots
_DECODE_CASES = [
    (4, 1, 0, torch.float32),
    (8, 1, 64, torch.float16),
]


@pytest.mark.parametrize("heads, kv_heads, window, dtype", _DECODE_CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("lens", [None, [257, 100, 1]], ids=["full-cache", "ragged"])
def test_decode_attention_split_kv(heads, kv_heads, window, dtype, lens):
    torch.manual_seed(2)
    q = torch.randn(3, heads, 1, 80, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(3, kv_heads, 257, 80, dtype=dtype, device=DEVICE) for _ in range(2))
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE) if lens else None
    want = reference(q, k, v, True, window, kv_lens)
    # 3 slices: uneven ones, and for the 1-key sequence slices that hold no key at all
    for splits in (3, None):
        out = decode_attention(q, k, v, kv_lens=kv_lens, window=window, num_splits=splits)
        assert out.shape == q.shape and out.dtype == dtype
        assert rel_err(out, want) < TOL[dtype], splits


def test_kernels_reject_what_they_do_not_compute():
    q, k = torch.zeros(1, 4, 2, 64, device=DEVICE), torch.zeros(1, 2, 8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="one query"):
        decode_attention(q, k, k)
    with pytest.raises(ValueError, match="needs causal"):
        flash_attention(q, k, k, window=4)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        flash_attention(torch.zeros(1, 3, 2, 64, device=DEVICE), k, k)


# Autotuning keys: on twins of the module's autotuners (tests/helpers.py), on the tuned path under the
# interpreter ------------------------------------------------------------------------------------------

@pytest.fixture
def tunings(monkeypatch):
    """{kernel name: the keys its autotuner tuned for, in order}."""
    import opbench.kernels.attention as A

    twins = {}
    for name in ("_fwd_tuned", "_dkdv_tuned", "_dq_tuned", "_decode_tuned"):
        twins[name] = twin_autotuner(getattr(A, name))
        monkeypatch.setattr(A, name, twins[name])
    monkeypatch.setattr(A, "_interpreted", lambda: False)
    return lambda: {name: list(twin.cache) for name, twin in twins.items()}


# Configs with 128-query tiles pad the 40 queries: the padding rows divide zero by zero, and are never stored.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning",
                            "ignore:divide by zero encountered in log2:RuntimeWarning")
def test_attention_tunes_per_batch_and_window(tunings):
    """Same q_len, kv_len, heads and head_dim; batch 1 and 2, no window and a 24-key window: four
    tunings of each kernel, and the outputs still right."""
    torch.manual_seed(3)
    q_all = torch.randn(2, 2, 40, 32, device=DEVICE)
    k_all, v_all = (torch.randn(2, 1, 70, 32, device=DEVICE) for _ in range(2))
    for batch in (1, 2):
        q, k, v = q_all[:batch], k_all[:batch], v_all[:batch]
        for window in (0, 24):
            o, lse = flash_attention(q, k, v, causal=True, window=window, return_lse=True)
            assert rel_err(o, reference(q, k, v, True, window)) < 1e-5
            flash_attention_backward(torch.randn_like(q), q, k, v, o, lse, causal=True, window=window)
    keys = tunings()
    for name in ("_fwd_tuned", "_dkdv_tuned", "_dq_tuned"):
        assert len(keys[name]) == 4, (name, keys[name])


def test_decode_attention_tunes_per_batch_and_window(tunings):
    torch.manual_seed(4)
    q_all = torch.randn(3, 4, 1, 32, device=DEVICE)
    k_all, v_all = (torch.randn(3, 1, 100, 32, device=DEVICE) for _ in range(2))
    for batch, window in ((2, 0), (3, 0), (3, 40)):
        q, k, v = q_all[:batch], k_all[:batch], v_all[:batch]
        out = decode_attention(q, k, v, window=window, num_splits=2)
        assert rel_err(out, reference(q, k, v, True, window)) < 1e-5
    assert len(tunings()["_decode_tuned"]) == 3, tunings()


# The GPU compilation path, which the interpreter never takes -------------------------------------------

_COMPILE = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import opbench.kernels.attention as A

FP32_POINTERS = {"LSE", "DELTA", "PART_O", "PART_LSE", "SINKS"}
report = {}
V = dict(V_DIM=80, BLOCK_DV=128)  # v as wide as k here
for kernel, meta in [
    (A._attn_fwd, dict(GROUP=4, CAUSAL=True, STORE_LSE=True, HAS_SINKS=False, BLOCK_M=128, BLOCK_N=64, **V)),
    (A._attn_bwd_dkdv, dict(GROUP=4, CAUSAL=True, BLOCK_M=32, BLOCK_N=128, **V)),
    (A._attn_bwd_dq, dict(GROUP=4, CAUSAL=True, BLOCK_M=128, BLOCK_N=32, **V)),
    (A._decode_split, dict(GROUP=4, HAS_LENS=True, BLOCK_H=16, BLOCK_N=64)),
]:
    args = [p.name for p in kernel.params if not p.is_constexpr]
    signature = {n: ("*fp32" if n in FP32_POINTERS else "*i32" if n == "KV_LENS" else "*bf16") if n.isupper()
                 else "fp32" if n.endswith("scale") else "i32" for n in args}
    # what a launch with 16-byte aligned tensors and strides tells the compiler
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(args) if n.isupper() or n.startswith("stride")}
    constexprs = dict(meta, HEAD_DIM=80, BLOCK_D=128, INPUT_PRECISION="ieee")
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 8 if meta.get("BLOCK_M") == 128 else 4, "num_stages": 3})
    ttgir = compiled.asm["ttgir"]
    report[kernel.__name__] = {"mma": "nvidia_mma" in ttgir, "wgmma": "warp_group_dot" in ttgir,
                               "async_copy": "async_copy" in ttgir}
json.dump(report, sys.stdout)
"""


def test_kernels_compile_for_hopper():
    """Compiled for sm90 without a GPU: tensor-core dots (Hopper's warp-group MMA where the tile has the
    64+ rows it needs; the decode tile holds one kv head's 16 query rows) and pipelined loads."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert set(report) == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_decode_split"}
    assert all(features["mma"] for features in report.values()), report
    assert report["_attn_fwd"]["wgmma"] and report["_attn_bwd_dkdv"]["wgmma"] and report["_attn_bwd_dq"]["wgmma"]
    assert report["_attn_fwd"]["async_copy"] and report["_decode_split"]["async_copy"]
