"""The attention family: work formulas, mask semantics, plans, and the backends that run on a CPU."""

import dataclasses
import importlib.util

import pytest
import torch

from opbench.ops.dtypes import get_dtype
from opbench.spec.models import get_model
from opbench.ops.attention import (
    ATTENTION, AttentionShape, attended_pairs, bytes_moved, context_lens, flops, sdpa_masking, shape_id, visible,
)
from opbench.measure.gate import check
from opbench.spec.workload import PlanError, parse_workload
from opbench.spec.plan import plan


def shape(batch=1, heads=1, kv_heads=1, head_dim=16, q_len=8, kv_len=8, causal=1, window=0, kv_len_min=0):
    return AttentionShape(batch, heads, kv_heads, head_dim, q_len, kv_len, causal, window, kv_len_min)


# FLOPs and bytes, against hand-computed values ----------------------------------------------------------

def test_flops_non_causal():
    s = shape(batch=2, heads=4, kv_heads=2, head_dim=64, q_len=10, kv_len=30, causal=0)
    # every query sees all 30 keys: 2 sequences x 10 queries x 30 keys = 600 pairs per head
    # 4 x heads x head_dim x pairs = 4 x 4 x 64 x 600 = 614_400; backward 2.5 x = 1_536_000
    assert attended_pairs(s) == 600
    assert flops(s, "fwd") == 614_400
    assert flops(s, "bwd") == 1_536_000


def test_flops_causal_square_is_about_half():
    s = shape(head_dim=16, q_len=8, kv_len=8)
    # query p sees p + 1 keys: 1 + 2 + ... + 8 = 36 pairs (of 64); 4 x 1 x 16 x 36 = 2304
    assert attended_pairs(s) == 36
    assert flops(s) == 2304


def test_flops_causal_bottom_right_with_fewer_queries():
    s = shape(heads=2, head_dim=8, q_len=3, kv_len=8)
    # bottom-right: the 3 queries sit at positions 5, 6, 7 and see 6, 7, 8 keys = 21 pairs
    # (top-left alignment would give 1 + 2 + 3 = 6); 4 x 2 x 8 x 21 = 1344
    assert attended_pairs(s) == 21
    assert flops(s) == 1344


def test_flops_sliding_window():
    # positions 0..7 see min(p + 1, 3) keys: 1 + 2 + 3 x 6 = 21
    assert attended_pairs(shape(q_len=8, kv_len=8, window=3)) == 21
    # fewer queries: positions 6..9 of 10 each see their last 3 keys: 4 x 3 = 12
    assert attended_pairs(shape(q_len=4, kv_len=10, window=3)) == 12


def test_flops_and_bytes_of_decode():
    s = shape(batch=4, heads=32, kv_heads=8, head_dim=128, q_len=1, kv_len=2048)
    # one query per sequence sees the whole cache: 4 x 2048 = 8192 pairs per head
    # 4 x 32 x 128 x 8192 = 134_217_728 FLOPs
    assert flops(s) == 134_217_728
    # bf16: Q and O are 4 x 32 x 1 x 128 = 16_384 elements each; K and V 8 x (4 x 2048) x 128 = 8_388_608
    # each: (2 x 16_384 + 2 x 8_388_608) x 2 bytes = 33_619_968, the KV cache read dominating
    assert bytes_moved(s, get_dtype("bf16")) == 33_619_968
    windowed = dataclasses.replace(s, window=512)
    # a 512-key window: 4 x 512 pairs per head, and only those 512 rows of K and V are read
    assert flops(windowed) == 4 * 32 * 128 * 4 * 512
    assert bytes_moved(windowed, get_dtype("bf16")) == (2 * 16_384 + 2 * 8 * (4 * 512) * 128) * 2


def test_flops_and_bytes_of_a_decode_batch_of_different_contexts():
    s = shape(batch=4, heads=6, kv_heads=2, head_dim=32, q_len=1, kv_len=200, kv_len_min=40)
    # contexts spread evenly: 40 + 160 x i // 3 for i = 0..3 -> 40, 93, 146, 200 (479 keys in all)
    assert context_lens(s) == [40, 93, 146, 200]
    # 4 x 6 x 32 x 479 = 367_872
    assert flops(s) == 367_872
    # bf16: Q and O 4 x 6 x 32 = 768 elements each; K and V 2 x 479 x 32 = 30_656 each
    # (2 x 768 + 2 x 30_656) x 2 bytes = 125_696
    assert bytes_moved(s, get_dtype("bf16")) == 125_696


def test_backward_bytes_and_flops():
    s = shape(batch=2, heads=4, kv_heads=1, head_dim=64, q_len=100, kv_len=100)
    fp16 = get_dtype("fp16")
    # Q, O, dO read and dQ written (4 x 2 x 4 x 100 x 64 = 204_800); K, V read, dK, dV written
    # (4 x 2 x 1 x 100 x 64 = 51_200): 256_000 elements x 2 bytes
    assert bytes_moved(s, fp16, "bwd") == 512_000
    assert flops(s, "bwd") == flops(s, "fwd") * 5 // 2


# Mask semantics ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [
    shape(q_len=8, kv_len=8),
    shape(q_len=3, kv_len=8),
    shape(q_len=8, kv_len=8, window=3),
    shape(q_len=5, kv_len=37, window=10),
    shape(q_len=5, kv_len=37, causal=0),
    shape(batch=3, q_len=1, kv_len=37, window=10, kv_len_min=5),
    shape(batch=5, q_len=4, kv_len=50, kv_len_min=9),
], ids=shape_id)
def test_visible_mask_matches_the_pair_count(s):
    """The mask the references and SDPA use counts exactly the pairs the FLOP formula counts."""
    mask = visible(s)
    assert int(mask.sum()) * (s.batch // mask.shape[0]) == attended_pairs(s)


def test_visible_mask_is_bottom_right_aligned():
    from torch.nn.attention.bias import causal_lower_right

    s = shape(q_len=3, kv_len=8)
    assert torch.equal(visible(s)[0, 0], causal_lower_right(3, 8)._materialize())
    ragged = shape(batch=2, q_len=2, kv_len=6, kv_len_min=4)
    # sequence 0 has 4 keys: its queries sit at positions 2 and 3; slots 4 and 5 are unused
    assert visible(ragged)[0, 0].int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]


def test_shape_rejects_what_has_no_meaning():
    with pytest.raises(ValueError, match="window needs causal"):
        shape(causal=0, window=4)
    with pytest.raises(ValueError, match="no key"):
        shape(q_len=9, kv_len=8)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        shape(heads=6, kv_heads=4)


# Plans -------------------------------------------------------------------------------------------------

def _attention_calls(model: str, workload: str):
    return [c for c in plan(get_model(model), parse_workload(workload)).calls if c.op == "attention"]


def test_plan_prefill_decode_train():
    (prefill,) = _attention_calls("tiny", "prefill:b=2,s=96")
    assert prefill.shape == AttentionShape(2, 6, 2, 32, 96, 96, 1, 0) and prefill.pass_ == "fwd"
    (decode,) = _attention_calls("tiny", "decode:b=4,s=200")
    assert decode.shape == AttentionShape(4, 6, 2, 32, 1, 200, 1, 0)
    (ragged,) = _attention_calls("tiny", "decode:b=4,s=200,smin=40")
    assert ragged.shape == AttentionShape(4, 6, 2, 32, 1, 200, 1, 0, kv_len_min=40)
    train = _attention_calls("tiny", "train:b=2,s=96")
    assert [c.pass_ for c in train] == ["fwd", "bwd"] and train[0].shape == train[1].shape == prefill.shape


def test_plan_gqa_and_mqa_ratios_and_windows_come_from_the_model():
    (llama3,) = _attention_calls("llama-3-8b", "prefill:b=1,s=2048")
    assert (llama3.shape.heads, llama3.shape.kv_heads, llama3.shape.head_dim) == (32, 8, 128)  # GQA 4
    (sharded,) = _attention_calls("llama-3-70b", "decode:b=32,s=2048,tp=8")
    assert (sharded.shape.heads, sharded.shape.kv_heads) == (8, 1)  # tp 8 leaves one kv head: MQA per GPU
    (mistral,) = _attention_calls("mistral-7b", "prefill:b=1,s=8192")
    assert mistral.shape.window == 4096
    (short,) = _attention_calls("mistral-7b", "decode:b=1,s=2048")
    assert short.shape.window == 0  # a window past the start of the sequence masks nothing


def test_min_context_is_a_decode_setting():
    assert parse_workload("decode:b=8,s=512,smin=64").label == "decode:b=8,s=512,smin=64,tp=1"
    with pytest.raises(PlanError):
        parse_workload("prefill:b=8,s=512,smin=64")
    with pytest.raises(PlanError):
        parse_workload("decode:b=8,s=512,smin=600")


# SDPA masking ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s, how", [
    (shape(causal=0, q_len=5, kv_len=9), "none"),
    (shape(q_len=1, kv_len=9), "none"),
    (shape(q_len=1, kv_len=9, window=4), "slice"),
    (shape(q_len=1, kv_len=9, window=9), "none"),
    (shape(q_len=9, kv_len=9), "causal"),
    (shape(q_len=4, kv_len=9), "lower-right"),
    (shape(q_len=9, kv_len=9, window=4), "mask"),
    (shape(batch=2, q_len=1, kv_len=9, kv_len_min=3), "mask"),
], ids=lambda v: v if isinstance(v, str) else shape_id(v))
def test_sdpa_masking(s, how):
    assert sdpa_masking(s) == how


# Backends that run on a CPU, at shapes the smoke profile does not plan ---------------------------------

_ODD_SHAPES = [
    shape(batch=2, heads=6, kv_heads=2, head_dim=40, q_len=37, kv_len=37, window=10),  # sliding-window prefill
    shape(batch=1, heads=4, kv_heads=1, head_dim=40, q_len=5, kv_len=37),  # chunked prefill, MQA
    shape(batch=2, heads=4, kv_heads=4, head_dim=40, q_len=7, kv_len=19, causal=0),  # no mask
    shape(batch=2, heads=6, kv_heads=2, head_dim=40, q_len=1, kv_len=37, window=10),  # decode in a window
    shape(batch=3, heads=6, kv_heads=2, head_dim=40, q_len=1, kv_len=37, window=10, kv_len_min=5),
]


@pytest.mark.parametrize("backend", ["sdpa-math", "sdpa-flash"])
@pytest.mark.parametrize("s, pass_", [(s, p) for s in _ODD_SHAPES for p in ("fwd", "bwd") if p == "fwd" or s.q_len > 1],
                         ids=lambda v: v if isinstance(v, str) else shape_id(v))
def test_cpu_backends_at_odd_shapes(backend, s, pass_):
    dtype = get_dtype("fp32")
    torch.manual_seed(0)
    inp = ATTENTION.inputs(s, dtype, pass_, "cpu")
    assert ATTENTION.backends[backend].requires(s, dtype, "cpu") is None
    out = ATTENTION.backends[backend].prepare(inp, dtype, pass_)()
    verdict = check(out, ATTENTION.reference(inp, dtype, pass_), dtype.tol)
    assert verdict.passed, verdict


def test_reasons_of_backends_a_cpu_cannot_run():
    s, fp32 = shape(batch=2, heads=4, kv_heads=2, q_len=16, kv_len=16), get_dtype("fp32")

    def reason(backend, at=s, device="cpu"):
        return ATTENTION.backends[backend].requires(at, fp32, device)

    assert "CUDA" in reason("sdpa-efficient") and "CUDA" in reason("sdpa-cudnn")
    assert "CUDA GPU" in reason("flex")
    assert "GPUs only" in reason("triton") and "GPUs only" in reason("triton-decode")
    if importlib.util.find_spec("flash_attn") is None:
        assert "flash-attn is not installed" in reason("fa2")
        assert "flash-attn is not installed" in reason("fa2-kvcache")
    if importlib.util.find_spec("flash_attn_interface") is None:
        assert "flash-attn is not installed" in reason("fa3")
    # What a GPU would be told, as far as it is decided before asking torch or a GPU:
    windowed = dataclasses.replace(s, window=4)
    assert "no attention mask" in reason("sdpa-flash", windowed, "cuda")
    if importlib.util.find_spec("triton") is not None:
        assert "decode shapes only" in reason("triton-decode", s, "cuda")
        ragged = shape(batch=2, q_len=1, kv_len=16, kv_len_min=4)
        assert "one context length" in reason("triton", ragged, "cuda")


def test_reasons_torch_gives_reach_the_skip():
    """torch's SDPA checks log why a kernel does not take a case, as Python warnings or on stderr."""
    import os
    import warnings

    from opbench.ops.attention import _answer_with_warnings

    line = b"[W1121 12:00:00 sdp_utils.cpp:312] Warning: head_dim should be no more than 128 (function operator())\n"

    def ask():
        os.write(2, line)
        warnings.warn("cuDNN attention has been runtime disabled.")
        os.write(2, line)
        return False
    assert _answer_with_warnings(ask) == (False, ["cuDNN attention has been runtime disabled.",
                                                  "head_dim should be no more than 128"])


@pytest.mark.parametrize("s", [shape(q_len=16, kv_len=16), shape(q_len=1, kv_len=16, window=4),
                               shape(q_len=4, kv_len=16), shape(batch=2, heads=2, q_len=1, kv_len=16, kv_len_min=3)],
                         ids=sdpa_masking)
@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn"])
def test_asking_torch_about_its_fused_kernels(kernel, s):
    """The question put to torch builds for every masking; this CPU build's answer is always no."""
    from opbench.ops.attention import _torch_can_run

    assert _torch_can_run(kernel)(s, get_dtype("bf16"), "cpu").startswith(f"torch's {kernel} SDPA kernel does not")
