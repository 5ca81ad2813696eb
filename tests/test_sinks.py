"""Attention sinks and alternating windows (gpt-oss): the sink column of the softmax, the eager
backend and the Triton split-KV decode's reduction against float64 (interpreter, fp32 and fp16),
backends that take no sinks saying so, and the window applied to its own kind of layer only."""

import pytest
import torch

from opbench.kernels.attention import decode_attention
from opbench.ops import get_family
from opbench.ops.attention import AttentionShape, softmax_with_sinks
from opbench.ops.dtypes import get_dtype
from opbench.spec.models import ZOO
from opbench.spec.plan import plan
from opbench.spec.workload import parse_workload

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # tests/conftest.py sets TRITON_INTERPRET=1 without one


def test_a_sink_is_a_softmax_column_without_a_value():
    scores = torch.tensor([[[1.0, 2.0, float("-inf")]]], dtype=torch.float64)
    sink = torch.tensor([0.5], dtype=torch.float64)
    weights = softmax_with_sinks(scores, sink)
    e = torch.exp(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    assert torch.allclose(weights[0, 0], torch.cat([e[:2] / e.sum(), torch.zeros(1, dtype=torch.float64)]))
    assert weights.sum() < 1


def test_eager_backend_passes_the_gate_forward_and_backward():
    from opbench.measure.gate import check

    family, dtype = get_family("attention"), get_dtype("fp32")
    s = AttentionShape(2, 6, 2, 32, 40, 40, 1, 16, sinks=1)
    for pass_ in ("fwd", "bwd"):
        inp = family.inputs(s, dtype, pass_, "cpu")
        out = family.backends["torch-eager"].prepare(inp, dtype, pass_)()
        assert check(out, family.reference(inp, dtype, pass_), 1e-5).passed, pass_


def test_backends_without_sinks_say_so():
    family, dtype = get_family("attention"), get_dtype("bf16")
    s = AttentionShape(1, 4, 2, 64, 1, 100, 1, 0, sinks=1)
    for name in ("sdpa-math", "sdpa-flash", "flex", "fa2", "fa2-kvcache"):
        assert "no attention sinks" in family.backends[name].requires(s, dtype, "cuda"), name
    assert family.backends["torch-eager"].requires(AttentionShape(1, 4, 2, 64, 1, 100, 1, 0), dtype, "cpu")


@pytest.mark.parametrize("dtype, window, lens", [(torch.float32, 0, [57, 1, 30]), (torch.float16, 24, None)],
                         ids=["fp32-ragged", "fp16-window"])
def test_triton_decode_with_sinks_against_float64(dtype, window, lens):
    torch.manual_seed(0)
    batch, heads, kv_heads, kv_len = 3, 7, 1, 57  # GQA 7
    s = AttentionShape(batch, heads, kv_heads, 40, 1, kv_len, 1, window, 1 if lens else 0, sinks=1)
    family = get_family("attention")
    inp = family.inputs(s, get_dtype("fp32" if dtype == torch.float32 else "fp16"), "fwd", DEVICE)
    if lens:  # AttentionShape spreads contexts evenly; these are ragged on purpose
        inp["kv_lens"] = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        s = None
    want = _reference(inp, window)
    out = decode_attention(inp["q"], inp["k"], inp["v"], kv_lens=inp.get("kv_lens"), window=window,
                           sinks=inp["sinks"], num_splits=3)
    err = ((out.cpu().double() - want).norm() / want.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_flash_attention_with_sinks_forward_and_backward(dtype):
    """The sink joins the saved log-sum-exp, so the unchanged backward gives the right dq, dk and dv."""
    from opbench.kernels.attention import flash_attention, flash_attention_backward

    torch.manual_seed(3)
    family = get_family("attention")
    s = AttentionShape(1, 7, 1, 40, 37, 53, 1, 20, sinks=1)  # GQA 7, a window, fewer queries than keys
    inp = family.inputs(s, get_dtype("fp32" if dtype == torch.float32 else "fp16"), "bwd", DEVICE)
    q, k, v, sinks, do = inp["q"], inp["k"], inp["v"], inp["sinks"], inp["do"]
    o, lse = flash_attention(q, k, v, causal=True, window=20, sinks=sinks, return_lse=True)
    want = family.reference(inp, None, "fwd")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((o.cpu().double() - want).norm() / want.norm()).item() < tol
    grads = flash_attention_backward(do, q, k, v, o, lse, causal=True, window=20)
    for got, ref in zip(grads, family.reference(inp, None, "bwd")):
        assert ((got.cpu().double() - ref).norm() / ref.norm()).item() < tol


def _reference(inp, window):
    q, k, v = (inp[n].cpu().double() for n in "qkv")
    batch, heads, _, d = q.shape
    kv_len, group = k.shape[2], heads // k.shape[1]
    lens = inp["kv_lens"].cpu().long() if "kv_lens" in inp else torch.full((batch,), kv_len)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    key = torch.arange(kv_len).view(1, 1, 1, -1)
    ctx = lens.view(-1, 1, 1, 1)
    keep = (key < ctx) & ((key > ctx - 1 - window) if window else True)
    scores = (q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(~keep, float("-inf"))
    out = [softmax_with_sinks(scores[b], inp["sinks"].cpu().double()) @ v[b] for b in range(batch)]
    return torch.stack(out)


def test_window_applies_to_its_own_kind_of_layer():
    """tiny-sink: layer 0 in a 64-token window, layer 1 full, both with sinks; gpt-oss-120b: 18 and 18."""
    p = plan(ZOO["tiny-sink"], parse_workload("decode:b=2,s=150"))
    cores = {c.kind: c for c in p.calls if c.role == "attn.core"}
    assert {k: (c.layers, c.shape.window, c.shape.sinks) for k, c in cores.items()} == {
        "window/dense": (1, 64, 1), "full/dense": (1, 0, 1)}
    big = plan(ZOO["gpt-oss-120b"], parse_workload("decode:b=8,s=4096,paged=16"))
    cores = {c.kind: c for c in big.calls if c.role == "attn.core"}
    assert {k: (c.op, c.layers, c.shape.window, c.shape.sinks) for k, c in cores.items()} == {
        "window/moe": ("paged_attention", 18, 128, 1), "full/moe": ("paged_attention", 18, 0, 1)}
    # a prompt no longer than the window is not windowed at all
    short = plan(ZOO["tiny-sink"], parse_workload("prefill:b=1,s=64"))
    assert {c.shape.window for c in short.calls if c.role == "attn.core"} == {0}
