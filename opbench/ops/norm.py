"""Norms and the residual add over rows of the residual stream, RowsShape(tokens, width = hidden).

rmsnorm      y = x / sqrt(mean(x^2) + eps) * weight
layernorm    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias
add          the residual add, out = x + residual. Its backward sums the gradient that skips the
             branch and the one the branch hands back: the same add, on gradients.
add_rmsnorm  h = x + residual, y = rmsnorm(h), returning (y, h): the residual add fused with the
             RMSNorm after it, as inference stacks run them (vLLM's fused_add_rms_norm, flash-attn's
             prenorm residual). Its backward gives one gradient for both x and residual.
Backward passes take the output gradients dy (and dh) and give the gradients of x and the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opbench.ops.dtypes import DType
from opbench.ops.base import OpFamily, high_precision, needs_compile_gpu, needs_flash_attn, needs_triton_gpu
from opbench.ops.tokenwise import Grads, RowsShape, autograd_pass, compiled, eager_and_compiled, reference

EPS = 1e-6


def _rows(shape: RowsShape, dtype: DType, device: str) -> torch.Tensor:
    return torch.randn(shape.tokens, shape.width, device=device, dtype=dtype.torch)


def _weight(shape: RowsShape, dtype: DType, device: str) -> torch.Tensor:
    return torch.randn(shape.width, device=device, dtype=dtype.torch)


# Formulas: the references, written independently of every backend ----------------------------------

def rms_norm_formula(x, weight):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS) * weight


def layer_norm_formula(x, weight, bias):
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + EPS) * weight + bias


def add_rms_norm_formula(x, residual, weight):
    h = x + residual
    return rms_norm_formula(h, weight), h


RMS_GRADS = Grads(outputs=("dy",), wrt=("x", "weight"))
LN_GRADS = Grads(outputs=("dy",), wrt=("x", "weight", "bias"))
ADD_RMS_GRADS = Grads(outputs=("dy", "dh"), wrt=("x", "residual", "weight"))


# Work of one call (T tokens, W width, b bytes an element) ------------------------------------------

def rms_norm_flops(shape: RowsShape, pass_: str = "fwd") -> int:
    """Per element: fwd 4 (square and sum, scale, weight); bwd 9 (normalise, weight x dy, weight
    gradient multiply-add, row dot product multiply-add, dx = (w dy - xhat c) rstd)."""
    return (4 if pass_ == "fwd" else 9) * shape.tokens * shape.width


def rms_norm_bytes(shape: RowsShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: x and weight read, y written: (2TW + W) b. bwd: x, dy, weight read; dx, dweight written:
    (3TW + 2W) b. Per-row statistics (4 bytes a row) are left out."""
    t, w = shape.tokens, shape.width
    return (2 * t * w + w if pass_ == "fwd" else 3 * t * w + 2 * w) * dtype.bytes


def layer_norm_flops(shape: RowsShape, pass_: str = "fwd") -> int:
    """Per element: fwd 7 (sum, centre, square and sum, scale, weight, bias); bwd 13 (normalise 2,
    weight x dy, weight gradient 2, bias gradient, two row sums 3, dx 4)."""
    return (7 if pass_ == "fwd" else 13) * shape.tokens * shape.width


def layer_norm_bytes(shape: RowsShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: x, weight, bias read, y written: (2TW + 2W) b. bwd: x, dy, weight read; dx, dweight,
    dbias written: (3TW + 3W) b."""
    t, w = shape.tokens, shape.width
    return (2 * t * w + 2 * w if pass_ == "fwd" else 3 * t * w + 3 * w) * dtype.bytes


def add_flops(shape: RowsShape, pass_: str = "fwd") -> int:
    """One add per element, in either pass."""
    return shape.tokens * shape.width


def add_bytes(shape: RowsShape, dtype: DType, pass_: str = "fwd") -> int:
    """Two rows read, one written: 3TW b, in either pass."""
    return 3 * shape.tokens * shape.width * dtype.bytes


def add_rms_norm_flops(shape: RowsShape, pass_: str = "fwd") -> int:
    """RMSNorm's plus one add per element: fwd 5, bwd 10 (dh joins the gradient through the norm)."""
    return (5 if pass_ == "fwd" else 10) * shape.tokens * shape.width


def add_rms_norm_bytes(shape: RowsShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: x, residual, weight read; y, h written: (4TW + W) b. bwd: dy, dh, h, weight read; dx (the
    gradient of both x and residual) and dweight written: (4TW + 2W) b."""
    t, w = shape.tokens, shape.width
    return (4 * t * w + w if pass_ == "fwd" else 4 * t * w + 2 * w) * dtype.bytes


# Inputs -------------------------------------------------------------------------------------------

def rms_norm_inputs(shape: RowsShape, dtype: DType, pass_: str, device: str) -> dict:
    inp = {"x": _rows(shape, dtype, device), "weight": _weight(shape, dtype, device)}
    if pass_ == "bwd":
        inp["dy"] = _rows(shape, dtype, device)
    return inp


def layer_norm_inputs(shape: RowsShape, dtype: DType, pass_: str, device: str) -> dict:
    inp = {"x": _rows(shape, dtype, device), "weight": _weight(shape, dtype, device),
           "bias": _weight(shape, dtype, device)}
    if pass_ == "bwd":
        inp["dy"] = _rows(shape, dtype, device)
    return inp


def add_inputs(shape: RowsShape, dtype: DType, pass_: str, device: str) -> dict:
    """fwd: the branch's output and the residual stream; bwd: the gradient of the residual stream and
    the one the branch hands back."""
    names = ("x", "residual") if pass_ == "fwd" else ("dy", "dbranch")
    return {name: _rows(shape, dtype, device) for name in names}


def add_rms_norm_inputs(shape: RowsShape, dtype: DType, pass_: str, device: str) -> dict:
    inp = {"x": _rows(shape, dtype, device), "residual": _rows(shape, dtype, device),
           "weight": _weight(shape, dtype, device)}
    if pass_ == "bwd":
        inp.update(dy=_rows(shape, dtype, device), dh=_rows(shape, dtype, device))
    return inp


def add_reference(inp: dict, dtype: DType, pass_: str) -> torch.Tensor:
    a, b = inp.values()
    return high_precision(a) + high_precision(b)


RMSNORM = OpFamily(name="rmsnorm", shape_type=RowsShape, flops=rms_norm_flops, bytes=rms_norm_bytes,
                   inputs=rms_norm_inputs, reference=reference(rms_norm_formula, RMS_GRADS))
LAYERNORM = OpFamily(name="layernorm", shape_type=RowsShape, flops=layer_norm_flops, bytes=layer_norm_bytes,
                     inputs=layer_norm_inputs, reference=reference(layer_norm_formula, LN_GRADS))
ADD = OpFamily(name="add", shape_type=RowsShape, flops=add_flops, bytes=add_bytes, inputs=add_inputs,
               reference=add_reference)
ADD_RMSNORM = OpFamily(name="add_rmsnorm", shape_type=RowsShape, flops=add_rms_norm_flops,
                       bytes=add_rms_norm_bytes, inputs=add_rms_norm_inputs,
                       reference=reference(add_rms_norm_formula, ADD_RMS_GRADS))


# torch and torch.compile ----------------------------------------------------------------------------

def torch_rms_norm(x, weight):
    return F.rms_norm(x, x.shape[-1:], weight, EPS)


def torch_layer_norm(x, weight, bias):
    return F.layer_norm(x, x.shape[-1:], weight, bias, EPS)


def torch_add_rms_norm(x, residual, weight):
    h = x + residual
    return torch_rms_norm(h, weight), h


eager_and_compiled(RMSNORM, torch_rms_norm, RMS_GRADS, "torch.nn.functional.rms_norm")


eager_and_compiled(LAYERNORM, torch_layer_norm, LN_GRADS, "torch.nn.functional.layer_norm")


@ADD.backend("torch", impl="torch.add")
def add_torch(inp: dict, dtype: DType, pass_: str):
    a, b = inp.values()
    return lambda: torch.add(a, b)


@ADD.backend("compile", impl="torch.compile(torch.add)", requires=needs_compile_gpu)
def add_compile(inp: dict, dtype: DType, pass_: str):
    a, b = inp.values()
    add = compiled(torch.add)
    return lambda: add(a, b)


eager_and_compiled(ADD_RMSNORM, torch_add_rms_norm, ADD_RMS_GRADS,
                   "x + residual, then torch.nn.functional.rms_norm (unfused)")


# The suite's Triton kernels: the backward is timed alone, from the statistics its forward saved ------

@RMSNORM.backend("triton", impl="opbench/kernels/norm.py: rms_norm, rms_norm_backward", requires=needs_triton_gpu)
def rmsnorm_triton(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.norm import rms_norm, rms_norm_backward

    x, weight = inp["x"], inp["weight"]
    if pass_ == "fwd":
        return lambda: rms_norm(x, weight, eps=EPS).y
    rstd = rms_norm(x, weight, eps=EPS, save_stats=True).rstd
    return lambda: rms_norm_backward(inp["dy"], x, weight, rstd)


@LAYERNORM.backend("triton", impl="opbench/kernels/norm.py: layer_norm, layer_norm_backward", requires=needs_triton_gpu)
def layernorm_triton(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.norm import layer_norm, layer_norm_backward

    x, weight, bias = inp["x"], inp["weight"], inp["bias"]
    if pass_ == "fwd":
        return lambda: layer_norm(x, weight, bias, eps=EPS).y
    saved = layer_norm(x, weight, bias, eps=EPS, save_stats=True)
    return lambda: layer_norm_backward(inp["dy"], x, weight, saved.mean, saved.rstd)


@ADD_RMSNORM.backend("triton", impl="opbench/kernels/norm.py: rms_norm with a fused residual, rms_norm_backward",
                     requires=needs_triton_gpu)
def add_rmsnorm_triton(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.norm import rms_norm, rms_norm_backward

    x, residual, weight = inp["x"], inp["residual"], inp["weight"]
    if pass_ == "fwd":
        def fused():
            out = rms_norm(x, weight, eps=EPS, residual=residual)
            return out.y, out.residual
        return fused
    saved = rms_norm(x, weight, eps=EPS, residual=residual, save_stats=True)

    def backward():
        dx, dweight = rms_norm_backward(inp["dy"], saved.residual, weight, saved.rstd, dresidual=inp["dh"])
        return dx, dx, dweight  # one gradient serves x and residual
    return backward


# flash-attn's Triton norms (flash_attn.ops.triton.layer_norm); backward: autograd ----------------------

@RMSNORM.backend("flash-attn", impl="flash_attn.ops.triton.layer_norm.rms_norm_fn", requires=needs_flash_attn)
def rmsnorm_flash_attn(inp: dict, dtype: DType, pass_: str):
    from flash_attn.ops.triton.layer_norm import rms_norm_fn

    return autograd_pass(lambda x, weight: rms_norm_fn(x, weight, None, eps=EPS), inp, pass_, RMS_GRADS)


@LAYERNORM.backend("flash-attn", impl="flash_attn.ops.triton.layer_norm.layer_norm_fn", requires=needs_flash_attn)
def layernorm_flash_attn(inp: dict, dtype: DType, pass_: str):
    from flash_attn.ops.triton.layer_norm import layer_norm_fn

    return autograd_pass(lambda x, weight, bias: layer_norm_fn(x, weight, bias, eps=EPS), inp, pass_, LN_GRADS)


@ADD_RMSNORM.backend("flash-attn", impl="flash_attn.ops.triton.layer_norm.rms_norm_fn(residual=..., prenorm=True)",
                     requires=needs_flash_attn)
def add_rmsnorm_flash_attn(inp: dict, dtype: DType, pass_: str):
    from flash_attn.ops.triton.layer_norm import rms_norm_fn

    def fused(x, residual, weight):
        return tuple(rms_norm_fn(x, weight, None, residual=residual, eps=EPS, prenorm=True))
    return autograd_pass(fused, inp, pass_, ADD_RMS_GRADS)
