"""Quantized weights and activations: quantize, pack, unpack and dequantize, shared by the quantized op
families (wgemm, scaled_gemm, act_quant, dequant) and their tests.

Scales cover blocks of (rows, columns), 0 meaning a whole dimension (opbench.ops.dtypes.DType's
scale_block): one scale per tensor (0, 0), per row (1, 0), per group of a row (1, 128), per square
block (128, 128). A weight is held as a linear layer holds it, (n out, k in).

Packing happens once, outside any timing: what a checkpoint loader does, not what a step pays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opbench.ops.dtypes import NF4_CODES, DType

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
INT4_OFFSET = 8  # codes 0..15 stand for q - 8 (torch's int4pack kernels' convention)


def block_dims(block: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    """The rows and columns one scale covers in a (rows, cols) tensor."""
    return block[0] or rows, block[1] or cols


def expand(scales: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Scales of blocks spread to every element of a (rows, cols) tensor (partial blocks cropped)."""
    br, bc = block_dims(block, rows, cols)
    return scales.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The largest magnitude of each block of a 2-D tensor, (ceil(rows / br), ceil(cols / bc))."""
    rows, cols = x.shape
    br, bc = block_dims(block, rows, cols)
    pr, pc = -(-rows // br) * br, -(-cols // bc) * bc
    padded = torch.nn.functional.pad(x.abs(), (0, pc - cols, 0, pr - rows))
    return padded.reshape(pr // br, br, pc // bc, bc).amax(dim=(1, 3))


# int8, per output channel, symmetric ------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (n, k), scales float32 (n,)): q = round(w / s), s = absmax / 127 of each row."""
    scales = (w.abs().amax(dim=1).float() / 127).clamp_min(1e-8)
    q = torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.double() * scales.double()[:, None]


# int4, groups along k with scales and zeros --------------------------------------------------------------

@dataclass(frozen=True)
class Int4Weight:
    """Codes 0..15 of an (n, k) weight with a scale and a zero per group of `group` inputs: the weight
    is (code - 8) x scale + zero, the convention of torch's int4pack kernels (the zero in the float
    domain); GPTQ's integer zeros convert to it exactly."""
    codes: torch.Tensor  # uint8 (n, k), one code a byte (unpacked)
    scales: torch.Tensor  # (n, k / group)
    zeros: torch.Tensor  # (n, k / group)
    group: int


def quantize_int4(w: torch.Tensor, group: int, dtype: torch.dtype = torch.bfloat16) -> Int4Weight:
    """Asymmetric min-max quantization of each group to 16 levels; scales and zeros stored in `dtype`."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 groups of {group} inputs need k a multiple of {group} (k={k})")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scales = ((hi - lo) / 15).clamp_min(1e-6).to(dtype)
    zeros = (lo + INT4_OFFSET * scales.float()).to(dtype)
    codes = torch.round((g - zeros.float()[..., None]) / scales.float()[..., None]) + INT4_OFFSET
    return Int4Weight(codes.clamp(0, 15).to(torch.uint8).reshape(n, k), scales, zeros, group)


def dequantize_int4(w: Int4Weight) -> torch.Tensor:
    s = w.scales.double().repeat_interleave(w.group, 1)
    z = w.zeros.double().repeat_interleave(w.group, 1)
    return (w.codes.double() - INT4_OFFSET) * s + z


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte along the last dimension (even index in the low nibble): (n, k) -> (n, k / 2)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing 4-bit codes needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (n, k / 2) -> (n, k) codes 0..15."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def scales_and_zeros(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """(k / group, n, 2): the layout torch._weight_int4pack_mm takes."""
    return torch.stack((w.scales.t(), w.zeros.t()), dim=-1).to(dtype).contiguous()


def inner_k_tiles(k: int) -> int | None:
    """The deepest K tiling of torch's int4pack layout that divides k (K a multiple of 16 x tiles)."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


def torch_int4pack(w: Int4Weight, device: torch.device | str) -> torch.Tensor:
    """The codes in the tiled layout of torch's int4 kernels: on CPU from int32 codes, on CUDA from bytes
    packed high nibble first (even index high), as torch's converters take them."""
    tiles = inner_k_tiles(w.codes.shape[1])
    if torch.device(device).type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(w.codes.to(torch.int32).cpu(), tiles)
    c = w.codes.to(device)
    return torch._convert_weight_to_int4pack((c[:, 0::2] << 4 | c[:, 1::2]).contiguous(), tiles)


# NF4 (QLoRA), blocks of a row, absmax scales ------------------------------------------------------------

def quantize_nf4(w: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (n, k), absmax float32 (n, k / block)): each element the nearest NF4 value of
    w / absmax of its block."""
    n, k = w.shape
    if k % block:
        raise ValueError(f"nf4 blocks of {block} need k a multiple of {block} (k={k})")
    absmax = w.float().abs().reshape(n, k // block, block).amax(dim=2).clamp_min(1e-8)
    x = w.float() / absmax.repeat_interleave(block, 1)
    table = torch.tensor(NF4_CODES, device=w.device)
    codes = (x[..., None] - table).abs().argmin(dim=-1).to(torch.uint8)
    return codes, absmax


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, block: int = 64) -> torch.Tensor:
    table = torch.tensor(NF4_CODES, dtype=torch.float64, device=codes.device)
    return table[codes.long()] * absmax.double().repeat_interleave(block, 1)


# fp8 with block scales --------------------------------------------------------------------------------------

def quantize_fp8(x: torch.Tensor, block: tuple[int, int],
                 fp8: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(q fp8, scales float32 per block): scale = amax / 448 of each block, q = x / scale."""
    rows, cols = x.shape
    scales = (block_amax(x.float(), block) / FP8_MAX).clamp_min(1e-12)
    q = (x.float() / expand(scales, block, rows, cols)).clamp(-FP8_MAX, FP8_MAX).to(fp8)
    return q, scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = q.shape
    return q.double() * expand(scales.double(), block, rows, cols)


def weight_group(dtype: DType, k: int) -> str | None:
    """Why an (n, k) weight cannot be stored in `dtype`'s groups along k, or None."""
    group = dtype.group_along_k(k)
    if k % group:
        return f"{dtype.name} groups of {group} inputs need K a multiple of {group} (K={k})"
    return None
