"""MLP activations, RowsShape(tokens, width) with width the activation's output (the MLP's hidden width).

swiglu  silu(gate) x up     of the fused gate/up projection's output [gate | up], (tokens, 2 width)
geglu   gelu(gate) x up     likewise
gelu    gelu(x)             of the up projection's output, (tokens, width)
GELU is the tanh approximation (GPT-2/3, Gemma). The backward takes the output gradient dy and
gives the gradient of the whole input row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from opbench.ops.dtypes import DType
from opbench.ops.base import OpFamily, needs_triton_gpu
from opbench.ops.tokenwise import Grads, RowsShape, eager_and_compiled, reference

GRADS = Grads(outputs=("dy",), wrt=("x",))


def gelu_formula(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def swiglu_formula(x):
    gate, up = x.chunk(2, dim=-1)
    return gate / (1.0 + torch.exp(-gate)) * up


def geglu_formula(x):
    gate, up = x.chunk(2, dim=-1)
    return gelu_formula(gate) * up


def _per_output(shape: RowsShape, pass_: str, fwd: int, bwd: int) -> int:
    return (fwd if pass_ == "fwd" else bwd) * shape.tokens * shape.width


def swiglu_flops(shape: RowsShape, pass_: str = "fwd") -> int:
    """Per output element: fwd 5 (silu(g) = g sigmoid(g): exp, add, divide, multiply; times up);
    bwd 11 (sigmoid and silu again 4, silu' = s (1 + g (1 - s)) 4, dup = dy silu 1, dgate = dy up silu' 2)."""
    return _per_output(shape, pass_, 5, 11)


def geglu_flops(shape: RowsShape, pass_: str = "fwd") -> int:
    """Per output element: fwd 10 (gelu 9, see gelu_flops; times up); bwd 24 (tanh term again 6, gelu 3,
    gelu' 12, dup 1, dgate 2)."""
    return _per_output(shape, pass_, 10, 24)


def gelu_flops(shape: RowsShape, pass_: str = "fwd") -> int:
    """Per element: fwd 9 (x^3 2, times 0.044715, plus x, times sqrt(2/pi), tanh, plus 1, times x,
    times 0.5); bwd 19 (the tanh term again 6, gelu' = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi)
    (1 + 3 0.044715 x^2) 12, times dy)."""
    return _per_output(shape, pass_, 9, 19)


def gated_bytes(shape: RowsShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: gate and up read, the output written: 3TW b. bwd: gate, up and dy read, dgate and dup
    written: 5TW b."""
    return _per_output(shape, pass_, 3, 5) * dtype.bytes


def gelu_bytes(shape: RowsShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: x read, y written: 2TW b. bwd: x and dy read, dx written: 3TW b."""
    return _per_output(shape, pass_, 2, 3) * dtype.bytes


def _rows_and_dy(shape: RowsShape, dtype: DType, pass_: str, device: str, width: int) -> dict:
    inp = {"x": torch.randn(shape.tokens, width, device=device, dtype=dtype.torch)}
    if pass_ == "bwd":
        inp["dy"] = torch.randn(shape.tokens, shape.width, device=device, dtype=dtype.torch)
    return inp


def gated_inputs(shape: RowsShape, dtype: DType, pass_: str, device: str) -> dict:
    """x: the fused [gate | up] row, twice the output's width."""
    return _rows_and_dy(shape, dtype, pass_, device, 2 * shape.width)


def gelu_inputs(shape: RowsShape, dtype: DType, pass_: str, device: str) -> dict:
    return _rows_and_dy(shape, dtype, pass_, device, shape.width)


SWIGLU = OpFamily(name="swiglu", shape_type=RowsShape, flops=swiglu_flops, bytes=gated_bytes, inputs=gated_inputs,
                  reference=reference(swiglu_formula, GRADS))
GEGLU = OpFamily(name="geglu", shape_type=RowsShape, flops=geglu_flops, bytes=gated_bytes, inputs=gated_inputs,
                 reference=reference(geglu_formula, GRADS))
GELU = OpFamily(name="gelu", shape_type=RowsShape, flops=gelu_flops, bytes=gelu_bytes, inputs=gelu_inputs,
                reference=reference(gelu_formula, GRADS))


def torch_swiglu(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def torch_geglu(x):
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def torch_gelu(x):
    return F.gelu(x, approximate="tanh")


def _register(family: OpFamily, eager, *, act: str, gated: bool) -> None:
    """The same backends for each activation: `eager` in torch and compiled, the kernel's `act`."""
    eager_and_compiled(family, eager, GRADS, f"eager torch ({eager.__name__})")

    @family.backend("triton", impl=f"opbench/kernels/activation.py: activation(act={act!r}, gated={gated}) and its backward",
                    requires=needs_triton_gpu)
    def triton_backend(inp: dict, dtype: DType, pass_: str):
        from opbench.kernels.activation import activation, activation_backward

        x = inp["x"]
        if pass_ == "fwd":
            return lambda: activation(x, act=act, gated=gated)
        return lambda: activation_backward(inp["dy"], x, act=act, gated=gated)


_register(SWIGLU, torch_swiglu, act="silu", gated=True)
_register(GEGLU, torch_geglu, act="gelu_tanh", gated=True)
_register(GELU, torch_gelu, act="gelu_tanh", gated=False)
