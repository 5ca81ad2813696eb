"""NF4 dequantization: QLoRA's frozen base weight, 4-bit NormalFloat codes with an fp32 absmax per block
of 64, turned into the activation dtype before a plain GEMM (as bitsandbytes does for a batch of
tokens), once in the forward pass and again for the backward pass's dgrad.

The shape is the weight's (n out, k in); the case dtype the weight format (nf4). The gate compares
with the codebook's values times the absmax in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opbench.ops import packing
from opbench.ops.base import (
    OpFamily,
    all_of,
    high_precision_dtype,
    installed,
    needs_triton_gpu,
)
from opbench.ops.dtypes import DType


@dataclass(frozen=True)
class DequantShape:
    n: int  # out features
    k: int  # in features


def flops(shape: DequantShape, pass_: str = "fwd") -> int:
    """One multiply a weight (code value x absmax)."""
    return shape.n * shape.k


def bytes_moved(shape: DequantShape, dtype: DType, pass_: str = "fwd") -> int:
    """The packed codes and the absmax read, the weight written in the activation dtype."""
    return dtype.weight_bytes(shape.n, shape.k) + dtype.activation.bytes_of(shape.n * shape.k)


def inputs(shape: DequantShape, dtype: DType, pass_: str, device: str) -> dict:
    block = dtype.group_along_k(shape.k)
    codes, absmax = packing.quantize_nf4(torch.randn(shape.n, shape.k, device=device), block)
    return {"codes": codes, "packed": packing.pack_int4(codes).contiguous(), "absmax": absmax, "block": block}


def reference(inp: dict, dtype: DType, pass_: str) -> torch.Tensor:
    return packing.dequantize_nf4(inp["codes"], inp["absmax"], inp["block"]).to(
        high_precision_dtype(inp["codes"].device))


DEQUANT = OpFamily(name="dequant", shape_type=DequantShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                   reference=reference, dtypes=("nf4",), weight_format=True)


def _blocks_fit(shape: DequantShape, dtype: DType, device: str) -> str | None:
    return packing.weight_group(dtype, shape.k)


@DEQUANT.backend("torch", impl="eager torch: unpack the nibbles, index the NF4 table, multiply by the absmax",
                 requires=_blocks_fit)
def torch_dequant(inp: dict, dtype: DType, pass_: str):
    packed, absmax, block = inp["packed"], inp["absmax"], inp["block"]
    table = torch.tensor(dtype.codebook, device=packed.device)
    out = dtype.activation.torch

    def run():
        values = table[packing.unpack_int4(packed).long()]
        return (values * absmax.repeat_interleave(block, 1)).to(out)
    return run


@DEQUANT.backend("triton", impl="opbench/kernels/dequant.py: a byte per lane, both nibbles looked up and scaled",
                 requires=all_of(_blocks_fit, needs_triton_gpu))
def triton_dequant(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.dequant import dequant_nf4

    packed, absmax, block = inp["packed"], inp["absmax"], inp["block"]
    table = torch.tensor(dtype.codebook, device=packed.device)
    out = dtype.activation.torch
    return lambda: dequant_nf4(packed, absmax, table, block, out)


@DEQUANT.backend("bitsandbytes", impl="bitsandbytes.functional.dequantize_4bit (nf4, blocksize 64)",
                 requires=all_of(_blocks_fit, installed("bitsandbytes", "bitsandbytes", "QLoRA's NF4 kernels")))
def bnb_dequant(inp: dict, dtype: DType, pass_: str):
    import bitsandbytes.functional as bnbf

    # the same codes in bitsandbytes' own packing: quantizing the dequantized weight gives them back
    # exactly (each block's absmax element is a code of magnitude 1)
    w = packing.dequantize_nf4(inp["codes"], inp["absmax"], inp["block"]).to(dtype.activation.torch)
    packed, state = bnbf.quantize_4bit(w, blocksize=inp["block"], quant_type="nf4")
    return lambda: bnbf.dequantize_4bit(packed, state, quant_type="nf4")
