"""Weight-only quantized GEMM (W8A16, W4A16): y[M, N] = x[M, K] @ dequant(W)[N, K]^T, the linear layers
of a model served with int8 or int4 weights and bf16 activations.

The case dtype is the weight format (opbench.ops.dtypes.WEIGHT_FORMATS): int8 with one scale per output
channel, int4 with a scale and a zero per group of 128 inputs (GPTQ / AWQ). The activations and the
output travel in the format's activation dtype. The weights are quantized and packed once, outside the
timing, in the layout each backend takes; the gate compares with x @ W^T of the dequantized weights in
float64, so it checks the kernel, not the quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opbench.ops import packing
from opbench.ops.base import OpFamily, all_of, high_precision_dtype, installed, needs_cuda, needs_triton_gpu, probe
from opbench.ops.dtypes import DType


@dataclass(frozen=True)
class WGemmShape:
    m: int  # tokens
    n: int  # out features
    k: int  # in features


def flops(shape: WGemmShape, pass_: str = "fwd") -> int:
    """2MNK, those of the dense GEMM: the dequantization is not counted as work."""
    return 2 * shape.m * shape.n * shape.k


def bytes_moved(shape: WGemmShape, dtype: DType, pass_: str = "fwd") -> int:
    """Activations read and output written in the activation dtype; the weight read packed at its
    storage bits with its scales and zeros at theirs. At decode sizes the weight is nearly all of it."""
    act = dtype.activation
    return act.bytes_of(shape.m * shape.k) + dtype.weight_bytes(shape.n, shape.k) + act.bytes_of(shape.m * shape.n)


def inputs(shape: WGemmShape, dtype: DType, pass_: str, device: str) -> dict:
    """x in the activation dtype; W quantized from a random float weight, kept in every form a backend
    takes (codes, scales, zeros), on `device`."""
    act = dtype.activation.torch
    x = torch.randn(shape.m, shape.k, device=device, dtype=act)
    w = torch.randn(shape.n, shape.k, device=device) * 0.05
    inp = {"x": x}
    if dtype.zero_bits:  # int4: groups with zeros
        q = packing.quantize_int4(w, dtype.group_along_k(shape.k), act)
        inp.update(int4=q, packed=packing.pack_int4(q.codes))
    else:  # int8: one scale a row
        q, scales = packing.quantize_int8(w)
        inp.update(q=q, scales=scales.to(act))
    return inp


def dequantized(inp: dict) -> torch.Tensor:
    """W as the kernels see it, in float64 (the scales as stored, in the activation dtype)."""
    if "int4" in inp:
        return packing.dequantize_int4(inp["int4"])
    return packing.dequantize_int8(inp["q"], inp["scales"])


def reference(inp: dict, dtype: DType, pass_: str) -> torch.Tensor:
    x = inp["x"]
    hp = high_precision_dtype(x.device)
    return x.to(hp) @ dequantized(inp).to(hp).t()


WGEMM = OpFamily(name="wgemm", shape_type=WGemmShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                 reference=reference, dtypes=("int8", "int4"), weight_format=True)


def _groups_fit(shape: WGemmShape, dtype: DType, device: str) -> str | None:
    return packing.weight_group(dtype, shape.k)


def _torch_packed(shape: WGemmShape, dtype: DType, device: str) -> str | None:
    """What torch's packed kernels need of this build, device and shape; the kernel is tried once on
    a tiny weight, since whether a device has it depends on the build."""
    reason = _groups_fit(shape, dtype, device)
    if reason:
        return reason
    if not dtype.zero_bits:
        if not hasattr(torch, "_weight_int8pack_mm"):
            return f"torch {torch.__version__} has no torch._weight_int8pack_mm"
        if device == "cpu" and shape.k % 16:  # torch 2.13's CPU kernel crashes the process on such rows
            return f"torch's CPU int8 kernel needs K a multiple of 16 (K={shape.k})"
        failed = probe(("int8pack", device), lambda: torch_packed(inputs(WGemmShape(1, 16, 32), dtype, "fwd", device),
                                                                  dtype, "fwd")())
        return f"torch._weight_int8pack_mm does not run on {device} here ({failed})" if failed else None
    name = "_weight_int4pack_mm_for_cpu" if device == "cpu" else "_weight_int4pack_mm"
    if not hasattr(torch, name):
        return f"torch {torch.__version__} has no torch.{name}"
    if packing.inner_k_tiles(shape.k) is None:
        return f"torch's int4 layout needs K a multiple of 32 (K={shape.k})"
    if device == "cpu" and shape.n % 16:
        return f"torch's CPU int4 layout needs N a multiple of 16 (N={shape.n})"
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 0):
        return "torch._weight_int4pack_mm needs an Ampere or newer GPU (tinygemm)"
    failed = probe(("int4pack", device), lambda: torch_packed(inputs(WGemmShape(1, 16, 128), dtype, "fwd", device),
                                                              dtype, "fwd")())
    return f"torch.{name} does not run on {device} here ({failed})" if failed else None


@WGEMM.backend("torch", impl="torch._weight_int8pack_mm (int8); torch._weight_int4pack_mm / its CPU variant "
                             "_weight_int4pack_mm_for_cpu (int4, tinygemm's tiled layout)", requires=_torch_packed)
def torch_packed(inp: dict, dtype: DType, pass_: str):
    x = inp["x"]
    if "int4" not in inp:
        q, scales = inp["q"], inp["scales"]
        return lambda: torch._weight_int8pack_mm(x, q, scales)
    w = inp["int4"]
    packed = packing.torch_int4pack(w, x.device)
    sz = packing.scales_and_zeros(w, x.dtype)
    mm = torch._weight_int4pack_mm_for_cpu if x.device.type == "cpu" else torch._weight_int4pack_mm
    return lambda: mm(x, packed, w.group, sz)


@WGEMM.backend("triton", impl="opbench/kernels/wgemm.py: dequantize-in-the-loop GEMM, split-K at M <= 64",
               requires=all_of(_groups_fit, needs_triton_gpu))
def triton_wgemm(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.wgemm import wgemm_int4, wgemm_int8

    x = inp["x"]
    if "int4" not in inp:
        q, scales = inp["q"], inp["scales"]
        return lambda: wgemm_int8(x, q, scales)
    w, packed = inp["int4"], inp["packed"]
    return lambda: wgemm_int4(x, packed, w.scales, w.zeros, w.group)



def _torchao_configs():
    """torchao's weight-only configs by their names across versions (newer: *Config classes)."""
    import torchao.quantization as tq

    if hasattr(tq, "Int4WeightOnlyConfig"):
        return tq.Int8WeightOnlyConfig, tq.Int4WeightOnlyConfig
    return tq.int8_weight_only, tq.int4_weight_only


@WGEMM.backend("torchao", impl="torchao.quantization.quantize_ (int8 / int4 weight-only; int4: tinygemm, group "
                               "as the format's), on a bf16 nn.Linear holding the dequantized weight",
               requires=all_of(_groups_fit, installed("torchao", "torchao", "its weight-only quantized linear"),
                               needs_cuda))
def torchao_linear(inp: dict, dtype: DType, pass_: str):
    from torchao.quantization import quantize_

    x = inp["x"]
    # The dequantized weight lies on the format's grid, so torchao's own min-max quantization of it
    # finds the same codes (up to the rounding of scales and zeros in bf16): the gate still holds.
    linear = torch.nn.Linear(x.shape[1], dequantized(inp).shape[0], bias=False, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        linear.weight.copy_(dequantized(inp).to(x.dtype))
    int8_config, int4_config = _torchao_configs()
    quantize_(linear, int4_config(group_size=dtype.group_along_k(x.shape[1])) if dtype.zero_bits else int8_config())
    return lambda: linear(x)
