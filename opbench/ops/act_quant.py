"""Activation quantization to fp8: the cast of a linear layer's input, with its scales computed from the
data, that real fp8 stacks pay before every fp8 GEMM: per tensor (fp8), per token (fp8-row) or per
group of 128 features of a token (fp8-block).

The case dtype is the weight format whose GEMM the activations feed; its DType's act_block says the
granularity. Outputs: the fp8 values and the fp32 scales; the reference computes both in float64
(the values rounded to fp8 as the cast does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opbench.ops import packing
from opbench.ops.base import (
    OpFamily,
    all_of,
    high_precision_dtype,
    needs_capability,
    needs_triton_gpu,
)
from opbench.ops.dtypes import DType


@dataclass(frozen=True)
class ActQuantShape:
    tokens: int
    features: int  # the linear layer's in features


def scale_count(shape: ActQuantShape, dtype: DType) -> int:
    rows, cols = packing.block_dims(dtype.act_block, shape.tokens, shape.features)
    return -(-shape.tokens // rows) * -(-shape.features // cols)


def flops(shape: ActQuantShape, pass_: str = "fwd") -> int:
    """Two a value: its magnitude compared into the amax, and its division by the scale."""
    return 2 * shape.tokens * shape.features


def bytes_moved(shape: ActQuantShape, dtype: DType, pass_: str = "fwd") -> int:
    """The input read once in the activation dtype, the fp8 values and the scales written."""
    n = shape.tokens * shape.features
    return dtype.activation.bytes_of(n) + dtype.bytes_of(n) + -(-scale_count(shape, dtype) * dtype.scale_bits // 8)


def inputs(shape: ActQuantShape, dtype: DType, pass_: str, device: str) -> dict:
    return {"x": torch.randn(shape.tokens, shape.features, device=device, dtype=dtype.activation.torch)}


def reference(inp: dict, dtype: DType, pass_: str):
    x = inp["x"].to(high_precision_dtype(inp["x"].device))
    rows, cols = x.shape
    scales = packing.block_amax(x, dtype.act_block) / packing.FP8_MAX
    q = (x / packing.expand(scales, dtype.act_block, rows, cols)).clamp(-packing.FP8_MAX, packing.FP8_MAX)
    return q.to(dtype.torch).to(x.dtype), scales


ACT_QUANT = OpFamily(name="act_quant", shape_type=ActQuantShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                     reference=reference, dtypes=("fp8", "fp8-row", "fp8-block"), weight_format=True)


@ACT_QUANT.backend("torch", impl="eager torch: block amax, division, cast (a pass per op)")
def torch_quant(inp: dict, dtype: DType, pass_: str):
    x, block, fp8 = inp["x"], dtype.act_block, dtype.torch
    return lambda: packing.quantize_fp8(x, block, fp8)


def _per_token_groups(shape: ActQuantShape, dtype: DType, device: str) -> str | None:
    if dtype.act_block[0] != 1:
        return "per-tensor scaling needs the whole tensor's amax before any cast: the Triton kernel scales per token"
    return None


@ACT_QUANT.backend("triton", impl="opbench/kernels/act_quant.py: one program per (token, group), amax and cast in "
                                  "one pass", requires=all_of(_per_token_groups, needs_triton_gpu, needs_capability))
def triton_quant(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.act_quant import act_quant

    x, fp8 = inp["x"], dtype.torch
    group = packing.block_dims(dtype.act_block, *x.shape)[1]
    return lambda: act_quant(x, group, fp8)
