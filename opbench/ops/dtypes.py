"""The dtypes cases run in: storage, the activations beside it, scales, tolerance, math mode and what a
GPU needs to run it.

Every op and module asks a DType what it is (its storage bits, the dtype its activations travel in,
whether scales ride along, the capability its matmul needs, what an op without kernels for it runs
in); none tests a dtype by its name, so a new format is one entry of DTYPES.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    name: str  # short label used in case ids: bf16, fp16, fp32, tf32, fp8
    torch_name: str  # attribute of torch holding the storage dtype
    bits: int  # storage bits of one element: 4-bit weights are half a byte
    tol: float  # relative error (Frobenius norm) the correctness gate accepts
    tf32: bool = False  # fp32 storage with TF32 tensor-core math
    # The dtype activations travel in between ops, where it is not this one: fp8 GEMMs take and
    # write bf16 activations, so the tensors a layer hands on (residual stream, all-reduces, KV
    # cache) stay bf16.
    activations: str | None = None
    # Scales ride along with the values: the values are quantized from higher-precision ones, and a
    # GEMM takes the scales as arguments (torch._scaled_mm, whose only operand layout is "NT").
    scaled: bool = False
    min_capability: tuple[int, int] | None = None  # the CUDA compute capability its matmul needs
    fallback: str | None = None  # what an op without kernels for this dtype runs in instead
    # Quantized formats. Scales cover blocks of (rows, columns) of the weight as a linear layer holds it
    # (out x in), 0 meaning the whole dimension: (0, 0) one scale per tensor, (1, 0) one per output
    # channel, (1, 128) groups of 128 inputs in each row, (128, 128) square blocks. act_block: the same
    # for activations, (1, 0) per token; None where activations are not quantized (weight-only formats).
    scale_block: tuple[int, int] | None = None
    act_block: tuple[int, int] | None = None
    scale_bits: int = 0  # storage bits of one scale (fp32 for fp8 recipes, bf16 for GPTQ-style groups)
    zero_bits: int = 0  # storage bits of one zero point; 0: symmetric, no zeros stored
    codebook: tuple[float, ...] | None = None  # the values a code stands for (NF4), else integers

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.torch_name)

    @property
    def bytes(self) -> int:
        """Bytes of one element, for dtypes of whole bytes; packed formats count with bytes_of()."""
        if self.bits % 8:
            raise ValueError(f"{self.name} packs {self.bits} bits an element: count its bytes with bytes_of()")
        return self.bits // 8

    def bytes_of(self, elements: int) -> int:
        """Bytes of `elements` values in storage, a partial last byte counted whole."""
        return -(-elements * self.bits // 8)

    @property
    def activation(self) -> DType:
        """The dtype of the activations a workload of this dtype passes between ops."""
        return get_dtype(self.activations) if self.activations else self

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """The dtypes an op without kernels for this one runs in, in order of preference."""
        chain, name = [], self.fallback
        while name is not None and name not in chain:
            chain.append(name)
            name = get_dtype(name).fallback
        return tuple(chain)

    @property
    def plain(self) -> bool:
        """torch's eager ops compute in it as stored: no scales to carry, no math mode to set."""
        return not (self.scaled or self.tf32)

    @property
    def quantized(self) -> bool:
        """Values stored with scales: a GEMM over them needs the scales (and zeros, or codebook)."""
        return self.scale_block is not None

    def group_along_k(self, k: int) -> int:
        """Inputs sharing one weight scale in a row: the format's group, or all k of them."""
        return (self.scale_block[1] or k) if self.scale_block else k

    def scale_count(self, n: int, k: int) -> int:
        """Scales of an (n out, k in) weight: one per block, partial blocks counted whole."""
        rows, cols = self.scale_block or (0, 0)
        return -(-n // (rows or n)) * -(-k // (cols or k))

    def weight_bytes(self, n: int, k: int) -> int:
        """An (n, k) weight in storage: packed values plus its scales and zeros at their bits."""
        groups = self.scale_count(n, k)
        return self.bytes_of(n * k) + -(-groups * (self.scale_bits + self.zero_bits) // 8)

    @contextlib.contextmanager
    def math_mode(self):
        """Enable TF32 matmul math only for the tf32 label, so fp32 cases measure true fp32."""
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("bf16", "bfloat16", 16, 1e-2),
    DType("fp16", "float16", 16, 1e-2),
    DType("fp32", "float32", 32, 1e-5),
    DType("tf32", "float32", 32, 2e-3, tf32=True, fallback="fp32"),
    # e4m3 inputs; the reference uses the same quantized inputs, so the error is the output rounding
    # (bf16) plus accumulation order. Its tensor-core matmul came with Ada and Hopper (sm_89, sm_90).
    DType("fp8", "float8_e4m3fn", 8, 2e-2, activations="bf16", scaled=True, min_capability=(8, 9),
          fallback="bf16", scale_block=(0, 0), act_block=(0, 0), scale_bits=32),
)}

# The 16 values of 4-bit NormalFloat (QLoRA, Dettmers et al. 2023): quantiles of a unit normal,
# scaled to [-1, 1], with an exact zero; as bitsandbytes stores them.
NF4_CODES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982753825073, 0.5626170039176941,
             0.7229568362236023, 1.0)

# Weight formats of the linear layers (`w=` of a workload): the storage of the weights, the activations
# beside them in `activations`. The tolerance is the output's error against the GEMM of the dequantized
# weights in float64, so it covers the activations' rounding and the accumulation, not the quantization.
WEIGHT_FORMATS: dict[str, DType] = {d.name: d for d in (
    # W8A16: int8 per output channel, bf16 scales; symmetric
    DType("int8", "int8", 8, 1e-2, activations="bf16", scaled=True, fallback="bf16", scale_block=(1, 0),
          scale_bits=16),
    # W4A16 as GPTQ / AWQ checkpoints store it: groups of 128 inputs, a bf16 scale and zero each
    DType("int4", "uint8", 4, 1e-2, activations="bf16", scaled=True, fallback="bf16", scale_block=(1, 128),
          scale_bits=16, zero_bits=16),
    # QLoRA's frozen base: NF4 codes in blocks of 64 with an fp32 absmax each (bitsandbytes' defaults)
    DType("nf4", "uint8", 4, 1e-2, activations="bf16", scaled=True, fallback="bf16", scale_block=(1, 64),
          scale_bits=32, codebook=NF4_CODES),
    DTYPES["fp8"],  # per tensor
    # per token x per output channel, fp32 scales
    DType("fp8-row", "float8_e4m3fn", 8, 2e-2, activations="bf16", scaled=True, min_capability=(8, 9),
          fallback="bf16", scale_block=(1, 0), act_block=(1, 0), scale_bits=32),
    # DeepSeek-V3's recipe: 128 x 128 weight blocks, 1 x 128 activation groups, fp32 scales
    DType("fp8-block", "float8_e4m3fn", 8, 2e-2, activations="bf16", scaled=True, min_capability=(8, 9),
          fallback="bf16", scale_block=(128, 128), act_block=(1, 128), scale_bits=32),
)}


def get_dtype(name: str) -> DType:
    """A workload dtype, or a weight format (the dtype of the quantized ops' cases)."""
    found = DTYPES.get(name) or WEIGHT_FORMATS.get(name)
    if found is None:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)}; weight formats: "
                         f"{', '.join(WEIGHT_FORMATS)})")
    return found
