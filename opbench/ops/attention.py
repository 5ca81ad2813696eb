"""Attention: softmax(Q K^T / sqrt(d)) V with GQA, causal masking and sliding windows.

Causal masks are aligned bottom-right, as in decode and chunked prefill: query i of q_len sits at
position ctx - q_len + i, ctx being its sequence's context length (kv_len, or for a decode batch
of different lengths each sequence's own), and sees the keys at or before it (the last `window` of
them when a sliding window is set). Keys past a sequence's context are cache slots it does not use.

Inputs are laid out (batch, heads, seq, head_dim); k and v carry kv_heads heads, v of value_dim
when it differs (multi-head latent attention's prefill: q and k 192 wide, v 128). Attention sinks
(gpt-oss): a learned logit per head joins every query's softmax as one more column that has no
value, so the weights over the keys sum to less than one. The forward pass
returns O; the backward pass ("bwd") returns (dQ, dK, dV) for a random dO, its forward done once
when the case is prepared.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

from opbench.ops.dtypes import DType
from opbench.ops.base import (
    OpFamily,
    all_of,
    allow_recompiles,
    high_precision,
    installed,
    needs_cuda,
    needs_triton_gpu,
)


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    q_len: int
    kv_len: int  # keys in each sequence's cache (the longest context when kv_len_min is set)
    causal: int  # 1: causal, 0: every query sees every key
    window: int  # 0: no sliding window
    kv_len_min: int = 0  # 0: every context is kv_len; else contexts spread evenly from kv_len_min to kv_len
    value_dim: int = 0  # v's head width; 0: head_dim
    sinks: int = 0  # 1: a learned logit per query head in every softmax (attention sinks)

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"attention: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.window and not self.causal:
            raise ValueError("attention: a sliding window needs causal attention")
        if self.kv_len_min and not 1 <= self.kv_len_min <= self.kv_len:
            raise ValueError(f"attention: kv_len_min {self.kv_len_min} must lie in [1, kv_len {self.kv_len}]")
        if self.causal and self.q_len > min(context_lens(self)):
            raise ValueError(f"attention: causal with q_len {self.q_len} > a context of {min(context_lens(self))}"
                             " keys: the first queries would see no key")


def shape_id(s: AttentionShape) -> str:
    keys = f"{s.kv_len_min}..{s.kv_len}" if s.kv_len_min else f"{s.kv_len}"
    tail = ("c" if s.causal else "") + (f"w{s.window}" if s.window else "") + ("s" if s.sinks else "")
    dims = f"d{s.head_dim}" + (f"v{s.value_dim}" if s.value_dim else "")
    return f"b{s.batch}h{s.heads}kv{s.kv_heads}{dims}q{s.q_len}k{keys}{tail}"


def v_dim(s) -> int:
    """v's (and the output's) head width."""
    return s.value_dim or s.head_dim


def context_lens(s: AttentionShape) -> list[int]:
    """Each sequence's context length: kv_len, or spread evenly from kv_len_min (first) to kv_len (last)."""
    if not s.kv_len_min or s.batch == 1:
        return [s.kv_len] * s.batch
    span = s.kv_len - s.kv_len_min
    return [s.kv_len_min + span * i // (s.batch - 1) for i in range(s.batch)]


def _sum_min(lo: int, hi: int, cap: int) -> int:
    """sum of min(p + 1, cap) for p in [lo, hi] (0 <= lo)."""
    if hi < lo:
        return 0
    split = min(hi, cap - 1)  # p <= split: the term is p + 1; above it, cap
    total = 0
    if split >= lo:
        total += (lo + 1 + split + 1) * (split - lo + 1) // 2
    if hi > max(split, lo - 1):
        total += cap * (hi - max(split + 1, lo) + 1)
    return total


def _pairs(q_len: int, ctx: int, causal: int, window: int) -> int:
    """Query-key pairs of one head of one sequence with `ctx` keys."""
    if not causal:
        return q_len * ctx
    # query positions ctx - q_len .. ctx - 1; position p sees min(p + 1, window) keys
    return _sum_min(ctx - q_len, ctx - 1, window if window else ctx)


def attended_pairs(s: AttentionShape) -> int:
    """Query-key pairs one head computes over the whole batch: batch x q_len x avg_kv."""
    return sum(_pairs(s.q_len, ctx, s.causal, s.window) for ctx in context_lens(s))


def avg_kv(s: AttentionShape) -> float:
    """Mean number of keys each query attends."""
    return attended_pairs(s) / (s.batch * s.q_len)


def flops(s: AttentionShape, pass_: str = "fwd") -> int:
    """2 x heads x (head_dim + value_dim) x (batch x q_len x avg_kv): QK^T and PV, 2 FLOPs a
    multiply-add each (4 x heads x head_dim x ... when v is as wide as k). The backward recomputes
    QK^T and adds dV, dP, dQ, dK: 2.5 x forward."""
    fwd = 2 * s.heads * (s.head_dim + v_dim(s)) * attended_pairs(s)
    return fwd if pass_ == "fwd" else fwd * 5 // 2


def kv_rows_read(s: AttentionShape) -> int:
    """Keys (and values) a kernel must read per kv head, over the batch: each sequence's whole
    context, or with a window only the window's reach."""
    if s.window:
        return sum(min(ctx, s.window + s.q_len - 1) for ctx in context_lens(s))
    return sum(context_lens(s))


def bytes_moved(s: AttentionShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: Q and O (heads), K and V (kv_heads) once each; decode thus reads the whole KV cache.
    bwd: Q, O, dO read and dQ written; K, V read and dK, dV written."""
    widths = s.head_dim + v_dim(s)  # Q and O; K and V
    once = (s.batch * s.heads * s.q_len + s.kv_heads * kv_rows_read(s)) * widths
    return (once if pass_ == "fwd" else 2 * once) * dtype.bytes


def visible(s: AttentionShape, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (batch, 1, q_len, kv_len), True where a query sees a key; batch 1 when all contexts are equal."""
    lens = context_lens(s)
    ctx = torch.tensor(lens if len(set(lens)) > 1 else lens[:1], device=device).view(-1, 1, 1, 1)
    pos = torch.arange(s.q_len, device=device).view(1, 1, -1, 1) + ctx - s.q_len
    key = torch.arange(s.kv_len, device=device).view(1, 1, 1, -1)
    keep = key < ctx
    if s.causal:
        keep = keep & (key <= pos)
    if s.window:
        keep = keep & (key > pos - s.window)
    return keep.expand(ctx.shape[0], 1, s.q_len, s.kv_len)  # without a causal mask, no term has q_len rows


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: AttentionShape,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, in the inputs' precision: a masked softmax of the scaled scores times V, with
    each head's sink logit (heads,) as one more softmax column when given. One sequence at a time,
    so that the scores of a long prefill fit in memory."""
    group = s.heads // s.kv_heads
    keep = visible(s, q.device)
    outs = []
    for b in range(s.batch):
        kb, vb = k[b].repeat_interleave(group, 0), v[b].repeat_interleave(group, 0)
        scores = (q[b] @ kb.transpose(-1, -2)) * s.head_dim ** -0.5
        scores = scores.masked_fill(~keep[b if keep.shape[0] > 1 else 0], float("-inf"))
        outs.append(softmax_with_sinks(scores, sinks) @ vb)
    return torch.stack(outs)


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dimension of (heads, q, keys) scores, with each head's sink logit as a
    column of its own that is dropped afterwards; None: the plain softmax."""
    if sinks is None:
        return torch.softmax(scores, -1)
    column = sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]


def inputs(s: AttentionShape, dtype: DType, pass_: str, device: str) -> dict:
    """q, k, v (and dO for the backward); kv_lens (int32) for a batch of different context lengths,
    whose cache slots past each context hold random values that must not count."""
    def randn(heads: int, length: int, width: int = s.head_dim) -> torch.Tensor:
        return torch.randn(s.batch, heads, length, width, device=device, dtype=dtype.torch)

    inp = {"shape": s, "q": randn(s.heads, s.q_len), "k": randn(s.kv_heads, s.kv_len),
           "v": randn(s.kv_heads, s.kv_len, v_dim(s))}
    if s.sinks:  # learned sinks sit about where the scores do
        inp["sinks"] = torch.randn(s.heads, device=device, dtype=torch.float32)
    if s.kv_len_min:
        inp["kv_lens"] = torch.tensor(context_lens(s), device=device, dtype=torch.int32)
    if pass_ == "bwd":
        inp["do"] = randn(s.heads, s.q_len, v_dim(s))
    return inp


def reference(inp: dict, dtype: DType, pass_: str):
    """attention_math in high precision; for the backward, (dQ, dK, dV) by autograd through it."""
    s = inp["shape"]
    q, k, v = (high_precision(inp[n]).detach() for n in "qkv")
    sinks = high_precision(inp["sinks"]) if s.sinks else None
    if pass_ == "fwd":
        return attention_math(q, k, v, s, sinks)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        out = attention_math(q, k, v, s, sinks)
    return torch.autograd.grad(out, (q, k, v), high_precision(inp["do"]))


ATTENTION = OpFamily(
    name="attention", shape_type=AttentionShape, flops=flops, bytes=bytes_moved, inputs=inputs,
    reference=reference, dtypes=("bf16", "fp16", "fp32"), shape_id=shape_id,
)


# How a backend's forward becomes a case --------------------------------------------------------------

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _case(forward: Forward, inp: dict, pass_: str) -> Callable:
    """fwd: the forward on the inputs. bwd: the forward once, here, then each call runs the backward
    alone through the saved graph and returns (dQ, dK, dV)."""
    if pass_ == "fwd":
        q, k, v = inp["q"], inp["k"], inp["v"]
        return lambda: forward(q, k, v)
    q, k, v = (inp[n].detach().requires_grad_() for n in "qkv")
    out = forward(q, k, v)
    do = inp["do"]
    return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)


def _gqa(s: AttentionShape) -> dict:
    """enable_gqa for torch's attention functions: k and v are read per group, never copied."""
    return {"enable_gqa": True} if s.heads != s.kv_heads else {}


def _torch_2_5(shape, dtype: DType, device: str) -> str | None:
    if TorchVersion(torch.__version__) < (2, 5):
        return f"needs torch >= 2.5 for enable_gqa (GQA without copying K and V); this is torch {torch.__version__}"
    return None


def _one_context(what: str) -> Callable:
    def requires(s: AttentionShape, dtype: DType, device: str) -> str | None:
        if s.kv_len_min:
            return f"{what} takes one context length for the whole batch, not one per sequence"
        return None
    return requires


def _decode_only(what: str) -> Callable:
    def requires(s: AttentionShape, dtype: DType, device: str) -> str | None:
        if s.q_len != 1:
            return f"{what} is measured on decode shapes only (one new token per sequence; q_len is {s.q_len})"
        return None
    return requires


def _half_only(what: str) -> Callable:
    def requires(s: AttentionShape, dtype: DType, device: str) -> str | None:
        return f"{what} runs fp16/bf16 only" if dtype.bits > 16 else None
    return requires


# torch scaled_dot_product_attention, one backend forced at a time ------------------------------------

def sdpa_masking(s: AttentionShape) -> str:
    """How SDPA gets this shape's mask:
    none         every query sees every key (non-causal, or one query at the end of its context)
    slice        decode in a sliding window: a view of the window's keys, then all of them visible
    causal       is_causal=True: SDPA aligns it top-left, the same as bottom-right when q_len == kv_len
    lower-right  torch.nn.attention.bias.causal_lower_right, which fused kernels take natively
    mask         an explicit boolean mask (a window over several queries, per-sequence contexts)"""
    if s.kv_len_min:
        return "mask"
    if not s.causal:
        return "none"
    windowed = 0 < s.window < s.kv_len  # a window reaching back past the first key masks nothing
    if s.q_len == 1:
        return "slice" if windowed else "none"
    if windowed:
        return "mask"
    return "causal" if s.q_len == s.kv_len else "lower-right"


def _first_key(s: AttentionShape) -> int:
    """Where SDPA's view of the keys starts: the window's first key for a sliding-window decode, else 0."""
    return s.kv_len - s.window if sdpa_masking(s) == "slice" else 0


def _sdpa_kwargs(s: AttentionShape, device: torch.device | str) -> dict:
    """The keyword arguments that give F.scaled_dot_product_attention this shape's masking and GQA."""
    from torch.nn.attention.bias import causal_lower_right

    masking = sdpa_masking(s)
    kwargs = _gqa(s)
    if masking == "causal":
        kwargs["is_causal"] = True
    elif masking == "lower-right":
        kwargs["attn_mask"] = causal_lower_right(s.q_len, s.kv_len)
    elif masking == "mask":
        kwargs["attn_mask"] = visible(s, device)
    return kwargs


def _sdpa_forward(s: AttentionShape, backend, device: torch.device) -> Forward:
    from torch.nn.attention import sdpa_kernel

    kwargs, first = _sdpa_kwargs(s, device), _first_key(s)

    def forward(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k[:, :, first:], v[:, :, first:], **kwargs)
    return forward


def _torch_can_run(kernel: str) -> Callable:
    """Ask torch whether its `kernel` SDPA kernel takes this case (a one-sequence copy of it); the
    warnings torch gives while answering are the reason when it does not."""
    def requires(s: AttentionShape, dtype: DType, device: str) -> str | None:
        from torch.backends import cuda
        from torch.nn.attention.bias import CausalBias

        check = getattr(cuda, f"can_use_{kernel}_attention", None)
        if check is None:
            return f"this torch ({torch.__version__}) has no {kernel} attention"
        one = dataclasses.replace(s, batch=1)
        probe, kwargs, first = inputs(one, dtype, "fwd", device), _sdpa_kwargs(one, device), _first_key(one)
        mask = kwargs.get("attn_mask")
        if isinstance(mask, CausalBias):
            mask = None  # causal_lower_right hands flash and efficient no mask: they align causal bottom-right
        params = cuda.SDPAParams(probe["q"], probe["k"][:, :, first:], probe["v"][:, :, first:], mask, 0.0,
                                 kwargs.get("is_causal", False), kwargs.get("enable_gqa", False))
        ok, said = _answer_with_warnings(lambda: check(params, True))
        if ok:
            return None
        return f"torch's {kernel} SDPA kernel does not take this case: {'; '.join(said) or 'no reason given'}"
    return requires


def _answer_with_warnings(ask: Callable[[], bool]) -> tuple[bool, list[str]]:
    """ask(), and the distinct warnings it gave: as Python warnings, or as C++ warnings written to stderr
    ("[W... file.cpp:N] Warning: why (function f)"), which is where torch's checks log theirs."""
    with tempfile.TemporaryFile(mode="w+") as err, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            answer = ask()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        logged = re.findall(r"Warning: (.*?)(?: \(function .*\))?$", err.read(), re.MULTILINE)
    said = [str(w.message).splitlines()[0] for w in caught] + logged
    return answer, list(dict.fromkeys(said))


def _sdpa_flash_requires(s: AttentionShape, dtype: DType, device: str) -> str | None:
    if device != "cuda":
        return None  # torch's CPU flash kernel takes every dtype, masks and GQA
    if sdpa_masking(s) == "mask":
        return ("torch SDPA's flash backend takes no attention mask, and this case needs one "
                "(a sliding window over several queries, or per-sequence context lengths)")
    return all_of(_half_only("torch SDPA's flash backend on CUDA"), _torch_can_run("flash"))(s, dtype, device)


@ATTENTION.backend("sdpa-math", impl="F.scaled_dot_product_attention, SDPBackend.MATH (unfused)", requires=_torch_2_5)
def sdpa_math(inp: dict, dtype: DType, pass_: str):
    from torch.nn.attention import SDPBackend

    return _case(_sdpa_forward(inp["shape"], SDPBackend.MATH, inp["q"].device), inp, pass_)


@ATTENTION.backend("sdpa-flash", impl="F.scaled_dot_product_attention, SDPBackend.FLASH_ATTENTION "
                   "(FlashAttention-2 on CUDA, torch's own flash kernel on CPU)",
                   requires=all_of(_torch_2_5, _sdpa_flash_requires))
def sdpa_flash(inp: dict, dtype: DType, pass_: str):
    from torch.nn.attention import SDPBackend

    return _case(_sdpa_forward(inp["shape"], SDPBackend.FLASH_ATTENTION, inp["q"].device), inp, pass_)


@ATTENTION.backend("sdpa-efficient", impl="F.scaled_dot_product_attention, SDPBackend.EFFICIENT_ATTENTION "
                   "(memory-efficient, xFormers-style CUTLASS kernel)",
                   requires=all_of(_torch_2_5, needs_cuda, _torch_can_run("efficient")))
def sdpa_efficient(inp: dict, dtype: DType, pass_: str):
    from torch.nn.attention import SDPBackend

    return _case(_sdpa_forward(inp["shape"], SDPBackend.EFFICIENT_ATTENTION, inp["q"].device), inp, pass_)


@ATTENTION.backend("sdpa-cudnn", impl="F.scaled_dot_product_attention, SDPBackend.CUDNN_ATTENTION (cuDNN fused)",
                   requires=all_of(_torch_2_5, needs_cuda,
                                   _half_only("cuDNN attention"), _torch_can_run("cudnn")))
def sdpa_cudnn(inp: dict, dtype: DType, pass_: str):
    from torch.nn.attention import SDPBackend

    return _case(_sdpa_forward(inp["shape"], SDPBackend.CUDNN_ATTENTION, inp["q"].device), inp, pass_)


# FlexAttention ----------------------------------------------------------------------------------------

@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # Every case is a new static shape, hence a recompile: allow one per case instead of falling back
    # to the (slow, unfused) eager flex_attention after dynamo's default handful.
    allow_recompiles()
    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(s: AttentionShape, kv_lens: torch.Tensor | None, device: torch.device):
    """The block mask of this shape's causal / window / per-sequence-context pattern; None for full attention."""
    from torch.nn.attention.flex_attention import create_block_mask

    if not s.causal and kv_lens is None:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        ctx = kv_lens[b] if kv_lens is not None else s.kv_len
        pos = q_idx + ctx - s.q_len
        keep = kv_idx < ctx
        if s.causal:
            keep = keep & (kv_idx <= pos)
        if s.window:
            keep = keep & (kv_idx > pos - s.window)
        return keep
    return create_block_mask(mask_mod, B=s.batch if kv_lens is not None else None, H=None,
                             Q_LEN=s.q_len, KV_LEN=s.kv_len, device=device)


def _flex_requires(s: AttentionShape, dtype: DType, device: str) -> str | None:
    if device != "cuda":
        # Measured on a 2-core CPU: compiling one shape took ~22 s, and flex has no CPU backward.
        return ("compiled FlexAttention needs a CUDA GPU here: on a CPU torch.compile takes ~20 s per shape "
                "and flex_attention has no CPU backward")
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (compiled FlexAttention generates Triton kernels)"
    return None


@ATTENTION.backend("flex", impl="torch.nn.attention.flex_attention under torch.compile, with causal / "
                   "sliding-window / per-sequence-context block masks",
                   requires=all_of(_torch_2_5, _flex_requires))
def flex(inp: dict, dtype: DType, pass_: str):
    s = inp["shape"]
    block_mask = _flex_block_mask(s, inp.get("kv_lens"), inp["q"].device)
    compiled, gqa = _compiled_flex(), _gqa(s)
    return _case(lambda q, k, v: compiled(q, k, v, block_mask=block_mask, **gqa), inp, pass_)


# flash-attn (FlashAttention-2, and FlashAttention-3's flash_attn_interface) ----------------------------

def _needs_hopper(shape, dtype: DType, device: str) -> str | None:
    if device != "cuda":
        return "FlashAttention-3 needs a Hopper GPU (sm90)"
    major, minor = torch.cuda.get_device_capability()
    return None if major == 9 else f"FlashAttention-3 needs a Hopper GPU (sm90); this GPU is sm{major}{minor}"


def _fa_masking(s: AttentionShape) -> dict:
    """flash-attn aligns causal masks bottom-right; window_size=(left, right) counts keys beside the diagonal."""
    return {"causal": bool(s.causal), "window_size": (s.window - 1, 0) if s.window else (-1, -1)}


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """flash-attn's (batch, seq, heads, head_dim) as a view: head_dim stays contiguous, nothing is copied."""
    return t.transpose(1, 2)


@ATTENTION.backend("fa2", impl="flash_attn.flash_attn_func (FlashAttention-2)",
                   requires=all_of(installed("flash_attn", "flash-attn", "FlashAttention-2's flash_attn"),
                                   needs_cuda, _half_only("flash-attn"),
                                   _one_context("flash_attn_func (fa2-kvcache takes one per sequence)")))
def fa2(inp: dict, dtype: DType, pass_: str):
    from flash_attn import flash_attn_func

    masking = _fa_masking(inp["shape"])
    return _case(lambda q, k, v: _bshd(flash_attn_func(_bshd(q), _bshd(k), _bshd(v), **masking)), inp, pass_)


@ATTENTION.backend("fa2-kvcache", impl="flash_attn.flash_attn_with_kvcache (FlashAttention-2 decode, "
                   "per-sequence cache_seqlens)",
                   requires=all_of(installed("flash_attn", "flash-attn", "FlashAttention-2's flash_attn"),
                                   needs_cuda, _half_only("flash-attn"),
                                   _decode_only("flash_attn_with_kvcache")))
def fa2_kvcache(inp: dict, dtype: DType, pass_: str):
    from flash_attn import flash_attn_with_kvcache

    s = inp["shape"]
    q, k, v = (_bshd(inp[n]) for n in "qkv")
    lens = inp.get("kv_lens")
    seqlens = lens if lens is not None else s.kv_len
    masking = _fa_masking(s)
    return lambda: _bshd(flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, **masking))


@ATTENTION.backend("fa3", impl="flash_attn_interface.flash_attn_func (FlashAttention-3, Hopper)",
                   requires=all_of(installed("flash_attn_interface", "flash-attn", "FlashAttention-3's flash_attn_interface, "
                                              "built from flash-attn's hopper/ folder"),
                                   _needs_hopper, _half_only("FlashAttention-3"),
                                   _one_context("flash_attn_interface.flash_attn_func")))
def fa3(inp: dict, dtype: DType, pass_: str):
    from flash_attn_interface import flash_attn_func

    masking = _fa_masking(inp["shape"])

    def forward(q, k, v):
        out = flash_attn_func(_bshd(q), _bshd(k), _bshd(v), **masking)
        return _bshd(out[0] if isinstance(out, tuple) else out)  # older releases also return the LSE
    return _case(forward, inp, pass_)


# The suite's own Triton kernels (kernels/attention.py) ------------------------------------------------

@ATTENTION.backend("triton", impl="opbench/kernels/attention.py flash_attention / flash_attention_backward, "
                   "autotuned per shape",
                   requires=all_of(needs_triton_gpu, _one_context("the Triton flash-attention kernel "
                                                                  "(triton-decode takes one per sequence)")))
def triton_flash(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.attention import flash_attention, flash_attention_backward

    s = inp["shape"]
    q, k, v = inp["q"], inp["k"], inp["v"]
    masking = {"causal": bool(s.causal), "window": s.window}
    if pass_ == "fwd":
        return lambda: flash_attention(q, k, v, sinks=inp.get("sinks"), **masking)
    o, lse = flash_attention(q, k, v, return_lse=True, sinks=inp.get("sinks"), **masking)
    do = inp["do"]
    return lambda: flash_attention_backward(do, q, k, v, o, lse, **masking)


@ATTENTION.backend("triton-decode", impl="opbench/kernels/attention.py decode_attention: split-KV (flash-decoding) "
                   "with a log-sum-exp reduction kernel",
                   requires=all_of(needs_triton_gpu, _decode_only("the split-KV decode kernel")))
def triton_decode(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.attention import decode_attention

    q, k, v = inp["q"], inp["k"], inp["v"]
    lens, window, sinks = inp.get("kv_lens"), inp["shape"].window, inp.get("sinks")
    return lambda: decode_attention(q, k, v, kv_lens=lens, window=window, sinks=sinks)


# Eager attention in torch: the backend of shapes with sinks -----------------------------------------------

@ATTENTION.backend("torch-eager", impl="attention_math in the inputs' precision: masked softmax with the sink column, "
                   "times V (for shapes with attention sinks, which no fused torch kernel takes)",
                   requires=lambda s, dtype, device: None if s.sinks else
                   "torch-eager serves shapes with attention sinks only (sdpa-math is the unfused kernel "
                   "of the others)")
def eager(inp: dict, dtype: DType, pass_: str):
    s, sinks = inp["shape"], inp.get("sinks")
    return _case(lambda q, k, v: attention_math(q, k, v, s, sinks), inp, pass_)


# What each backend takes beyond plain attention: a value head of its own width (MLA's prefill), sinks.
TAKE_VALUE_DIM = {"torch-eager", "sdpa-math", "sdpa-efficient", "sdpa-cudnn", "flex", "triton"}  # not torch's flash
TAKE_SINKS = {"torch-eager", "triton", "triton-decode"}


def _takes(name: str) -> Callable:
    def requires(s: AttentionShape, dtype: DType, device: str) -> str | None:
        if s.sinks and name not in TAKE_SINKS:
            return f"{name} takes no attention sinks (backends with sinks: {', '.join(sorted(TAKE_SINKS))})"
        if s.value_dim and s.value_dim != s.head_dim and name not in TAKE_VALUE_DIM:
            return f"{name} takes v as wide as q and k only (here {s.value_dim} and {s.head_dim})"
        return None
    return requires


for _name, _backend in list(ATTENTION.backends.items()):
    ATTENTION.backends[_name] = dataclasses.replace(_backend, requires=all_of(_takes(_name), _backend.requires))
