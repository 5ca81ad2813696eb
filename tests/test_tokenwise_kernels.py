"""The token-wise Triton kernels (kernels/norm.py, rotary.py, activation.py, cross_entropy.py) against
the op families' references, on random inputs at odd widths and row counts that fill no block.

On a machine without a GPU they run under TRITON_INTERPRET=1 (tests/conftest.py). The interpreter
computes bf16 arithmetic wrongly, so the kernels are tested in fp32 and fp16 only.
"""

import pytest
import torch

from kernels.activation import activation, activation_backward
from kernels.cross_entropy import cross_entropy, cross_entropy_backward
from kernels.norm import layer_norm, layer_norm_backward, rms_norm, rms_norm_backward
from kernels.rotary import rotary
from opbench.dtypes import get_dtype
from opbench.ops import activation as act_ops
from opbench.ops import embedding, norm
from opbench.ops import rotary as rotary_ops
from opbench.ops.tokenwise import RotaryShape
from opbench.timing import check

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WIDTHS = (4095, 5120, 14336)
DTYPES = {"fp32": 1e-5, "fp16": 3e-3}  # relative error (Frobenius) allowed


def _randn(*shape, dtype: str):
    return torch.randn(*shape, device=DEVICE, dtype=get_dtype(dtype).torch)


def _grads(formula, args: dict, wrt: tuple[str, ...], cotangents: tuple):
    """Gradients of formula(**args) in float64 with respect to `wrt`, by autograd."""
    args = _double(args)
    leaves = {k: args[k].requires_grad_() for k in wrt}
    out = formula(**args)
    outs = out if isinstance(out, tuple) else (out,)
    return torch.autograd.grad(outs, tuple(leaves.values()), tuple(c.double() for c in cotangents))


def _double(args: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()}


def _assert_close(out, ref, tol):
    verdict = check(out, ref, tol)
    assert verdict.passed, verdict.as_dict()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", zip((3, 5, 7), WIDTHS))
@pytest.mark.parametrize("with_residual", (False, True), ids=("plain", "residual"))
def test_rms_norm(rows, width, dtype, with_residual):
    x, residual, w, dy, dh = (_randn(rows, width, dtype=dtype), _randn(rows, width, dtype=dtype),
                              _randn(width, dtype=dtype), _randn(rows, width, dtype=dtype),
                              _randn(rows, width, dtype=dtype))
    tol = DTYPES[dtype]
    out = rms_norm(x, w, eps=norm.EPS, residual=residual if with_residual else None, save_stats=True)
    if with_residual:
        y_ref, h_ref = norm.add_rms_norm_formula(x.double(), residual.double(), w.double())
        _assert_close((out.y, out.residual), (y_ref, h_ref), tol)
        dx, dw = rms_norm_backward(dy, out.residual, w, out.rstd, dresidual=dh)
        dx_ref, dres_ref, dw_ref = _grads(norm.add_rms_norm_formula, {"x": x, "residual": residual, "weight": w},
                                          ("x", "residual", "weight"), (dy, dh))
        _assert_close((dx, dx, dw), (dx_ref, dres_ref, dw_ref), tol)
    else:
        _assert_close(out.y, norm.rms_norm_formula(x.double(), w.double()), tol)
        dx, dw = rms_norm_backward(dy, x, w, out.rstd)
        _assert_close((dx, dw), _grads(norm.rms_norm_formula, {"x": x, "weight": w}, ("x", "weight"), (dy,)), tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", zip((7, 3, 5), WIDTHS))
def test_layer_norm(rows, width, dtype):
    # an offset mean, as real activations have, so that centring matters
    x = _randn(rows, width, dtype=dtype) + 3
    w, b, dy = _randn(width, dtype=dtype), _randn(width, dtype=dtype), _randn(rows, width, dtype=dtype)
    tol = DTYPES[dtype]
    out = layer_norm(x, w, b, eps=norm.EPS, save_stats=True)
    args = {"x": x, "weight": w, "bias": b}
    _assert_close(out.y, norm.layer_norm_formula(**_double(args)), tol)
    _assert_close(layer_norm_backward(dy, x, w, out.mean, out.rstd),
                  _grads(norm.layer_norm_formula, args, ("x", "weight", "bias"), (dy,)), tol)


def test_norm_backward_strided_rows():
    """Rows of a wider buffer (a view with a row stride larger than the width) are read in place."""
    rows, width = 5, 4095
    x = _randn(rows, width + 7, dtype="fp32")[:, :width]
    w, dy = _randn(width, dtype="fp32"), _randn(rows, width + 3, dtype="fp32")[:, :width]
    out = rms_norm(x, w, eps=norm.EPS, save_stats=True)
    _assert_close(out.y, norm.rms_norm_formula(x.double(), w.double()), 1e-5)
    _assert_close(rms_norm_backward(dy, x, w, out.rstd),
                  _grads(norm.rms_norm_formula, {"x": x, "weight": w}, ("x", "weight"), (dy,)), 1e-5)


ACTIVATIONS = {  # kernel arguments -> the family's reference formula
    ("silu", True): act_ops.swiglu_formula,
    ("gelu_tanh", True): act_ops.geglu_formula,
    ("gelu_tanh", False): act_ops.gelu_formula,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", zip((5, 3, 4), WIDTHS))
@pytest.mark.parametrize("act, gated", ACTIVATIONS, ids=("swiglu", "geglu", "gelu"))
def test_activation(act, gated, rows, width, dtype):
    formula = ACTIVATIONS[act, gated]
    x = 2 * _randn(rows, 2 * width if gated else width, dtype=dtype)  # reaches both tails of the activation
    dy = _randn(rows, width, dtype=dtype)
    tol = DTYPES[dtype]
    _assert_close(activation(x, act=act, gated=gated), formula(x.double()), tol)
    _assert_close(activation_backward(dy, x, act=act, gated=gated), _grads(formula, {"x": x}, ("x",), (dy,))[0], tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, vocab", zip((3, 6, 5), WIDTHS))
def test_cross_entropy(rows, vocab, dtype):
    logits = 4 * _randn(rows, vocab, dtype=dtype)  # peaked rows: the online max must track the true one
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    dloss = torch.randn(rows, device=DEVICE)
    tol = DTYPES[dtype]
    loss, lse = cross_entropy(logits, targets)
    assert loss.dtype == lse.dtype == torch.float32
    _assert_close(loss, embedding.cross_entropy_formula(logits.double(), targets), tol)
    _assert_close(lse, torch.logsumexp(logits.double(), dim=-1), tol)
    ref = _grads(embedding.cross_entropy_formula, {"logits": logits, "targets": targets}, ("logits",), (dloss,))[0]
    dlogits = cross_entropy_backward(dloss, logits, targets, lse)
    assert dlogits.dtype == logits.dtype
    _assert_close(dlogits, ref, tol)
    buffer = logits.clone()
    assert cross_entropy_backward(dloss, buffer, targets, lse, inplace=True).data_ptr() == buffer.data_ptr()
    _assert_close(buffer, ref, tol)


ROTARY_SHAPES = (  # (tokens, heads, kv_heads, head_dim, offset): GQA, MQA, MHA; head_dim/2 not a power of 2
    (5, 6, 2, 64, 0),
    (3, 4, 1, 80, 0),
    (7, 3, 3, 96, 0),
    (4, 5, 1, 128, 1999),  # decode: every token at position 1999
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", (0, 1), ids=("neox", "gptj"))
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim, offset", ROTARY_SHAPES)
def test_rotary(tokens, heads, kv_heads, head_dim, offset, interleaved, dtype):
    """q and k as strided views of a fused qkv buffer, against the complex-multiplication (interleaved)
    and rotate-half (NeoX) reference; the conjugate rotation against autograd's backward."""
    shape = RotaryShape(tokens, heads, kv_heads, head_dim, interleaved, offset)
    inp = rotary_ops.inputs(shape, get_dtype(dtype), "bwd", DEVICE)
    assert inp["q"].stride(0) == (heads + 2 * kv_heads) * head_dim  # the kernel reads the views in place
    tol = DTYPES[dtype]
    tables = inp["cos"], inp["sin"], inp["positions"]
    out = tuple(rotary(inp[t], *tables, interleaved=bool(interleaved)) for t in ("q", "k"))
    args = {k: inp[k] for k in ("q", "k", "cos", "sin", "positions", "interleaved")}
    _assert_close(out, rotary_ops.rotary_formula(**_double(args)), tol)
    grads = tuple(rotary(inp[t], *tables, interleaved=bool(interleaved), conjugate=True) for t in ("dq", "dk"))
    _assert_close(grads, _grads(rotary_ops.rotary_formula, args, ("q", "k"), (inp["dq"], inp["dk"])), tol)
