"""Quantized weights and activations: packing round-trips exactly, quantization stays within its step,
and torch's own packed layouts (CPU) compute the product of the dequantized weights."""

import pytest
import torch

from opbench.ops import packing
from opbench.ops.dtypes import NF4_CODES, WEIGHT_FORMATS


def test_int4_pack_unpack_round_trips_exactly():
    codes = torch.randint(0, 16, (7, 258), dtype=torch.uint8)
    packed = packing.pack_int4(codes)
    assert packed.shape == (7, 129) and packed.dtype == torch.uint8
    assert torch.equal(packing.unpack_int4(packed), codes)
    # the even element in the low nibble
    assert packing.pack_int4(torch.tensor([[3, 12]], dtype=torch.uint8)).item() == 3 | 12 << 4
    every = torch.arange(256, dtype=torch.uint8).reshape(1, -1)
    assert torch.equal(packing.pack_int4(packing.unpack_int4(every)), every)
    with pytest.raises(ValueError, match="even"):
        packing.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def test_int4_quantization_round_trips_its_own_values():
    torch.manual_seed(0)
    w = torch.randn(33, 256)
    q = packing.quantize_int4(w, 128, torch.float32)
    assert q.codes.shape == (33, 256) and q.scales.shape == q.zeros.shape == (33, 2) and int(q.codes.max()) <= 15
    dq = packing.dequantize_int4(q)
    assert (dq - w.double()).abs().max() <= q.scales.double().max() / 2 + 1e-6  # within half a step
    again = packing.quantize_int4(dq.float(), 128, torch.float32)  # its own grid quantizes to itself
    assert torch.equal(again.codes, q.codes)
    with pytest.raises(ValueError, match="multiple of 128"):
        packing.quantize_int4(torch.randn(4, 192), 128)


def test_int8_and_nf4_round_trip_their_codes():
    torch.manual_seed(1)
    w = torch.randn(17, 192)
    q, s = packing.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    q2, _ = packing.quantize_int8(packing.dequantize_int8(q, s).float())
    assert torch.equal(q2, q)
    codes, absmax = packing.quantize_nf4(w, 64)
    assert absmax.shape == (17, 3)
    dq = packing.dequantize_nf4(codes, absmax, 64)
    assert torch.equal(packing.unpack_int4(packing.pack_int4(codes)), codes)
    codes2, absmax2 = packing.quantize_nf4(dq.float(), 64)
    assert torch.equal(codes2, codes) and torch.allclose(absmax2, absmax)
    assert int(codes.max()) <= 15 and NF4_CODES[7] == 0.0  # an exact zero among the 16 values


@pytest.mark.parametrize("block", [(0, 0), (1, 0), (1, 128), (128, 128)])
def test_fp8_block_scales(block):
    torch.manual_seed(2)
    x = torch.randn(130, 320)
    q, s = packing.quantize_fp8(x, block)
    rows, cols = packing.block_dims(block, 130, 320)
    assert s.shape == (-(-130 // rows), -(-320 // cols))
    assert q.dtype == torch.float8_e4m3fn and float(q.float().abs().max()) == packing.FP8_MAX  # each block's max
    dq = packing.dequantize_fp8(q, s, block)
    assert ((dq - x.double()).norm() / x.double().norm()) < 0.05  # e4m3: 3 mantissa bits


def test_torch_cpu_int4_layout_is_the_dequantized_weight():
    torch.manual_seed(3)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    q = packing.quantize_int4(torch.randn(48, 256) * 0.05, 128, torch.bfloat16)
    y = torch._weight_int4pack_mm_for_cpu(x, packing.torch_int4pack(q, "cpu"), 128,
                                          packing.scales_and_zeros(q, torch.bfloat16))
    ref = x.double() @ packing.dequantize_int4(q).t()
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-2


def test_weight_formats_are_records_with_bits_and_scales():
    int4, int8, nf4 = WEIGHT_FORMATS["int4"], WEIGHT_FORMATS["int8"], WEIGHT_FORMATS["nf4"]
    assert (int4.bits, int4.group_along_k(4096), int4.scale_count(4096, 4096)) == (4, 128, 4096 * 32)
    assert int8.group_along_k(4096) == 4096 and int8.scale_count(4096, 1000) == 4096
    # packed values plus bf16 scale and zero per group of 128
    assert int4.weight_bytes(4096, 4096) == 4096 * 4096 // 2 + 4096 * 32 * 4
    assert nf4.weight_bytes(64, 128) == 64 * 128 // 2 + 64 * 2 * 4  # fp32 absmax per 64
    block = WEIGHT_FORMATS["fp8-block"]
    assert block.weight_bytes(300, 256) == 300 * 256 + 3 * 2 * 4  # partial blocks counted whole
    assert WEIGHT_FORMATS["fp8"].weight_bytes(10, 10) == 100 + 4
