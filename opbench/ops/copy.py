"""Copy bandwidth: one buffer copied to another on the same device, far larger than the last cache.

Not an op of any plan: the machine's measured memory bandwidth, the peak that memory-bound ops'
GB/s is compared with (extra_info["peak_share"]), recorded in the JSON as opbench.peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opbench.dtypes import DType
from opbench.hardware import last_level_cache_bytes
from opbench.ops.base import OpFamily

COPY_BANDWIDTH = "copy_bandwidth_gbps"  # the peak's name in opbench.peaks


@dataclass(frozen=True)
class CopyShape:
    size_bytes: int  # of the buffer copied


def copy_size(device: str) -> int:
    """A GPU copies 1 GiB (8x or more the L2 of current GPUs), a CPU 4x its last-level cache, at least
    64 MiB: out of cache either way, so the copy measures memory."""
    if device == "cuda":
        return max(2**30, 8 * torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)
    return max(2**26, 4 * last_level_cache_bytes())


def shape_id(shape: CopyShape) -> str:
    return f"{shape.size_bytes / 2**20:g}MiB"


def flops(shape: CopyShape, pass_: str = "fwd") -> int:
    return 0


def bytes_moved(shape: CopyShape, dtype: DType, pass_: str = "fwd") -> int:
    """The buffer read once and written once, as device copy bandwidth is usually quoted."""
    return 2 * shape.size_bytes


def inputs(shape: CopyShape, dtype: DType, pass_: str, device: str) -> dict:
    n = shape.size_bytes // dtype.bytes
    return {"src": torch.randn(n, device=device, dtype=dtype.torch),
            "dst": torch.empty(n, device=device, dtype=dtype.torch)}


def reference(inp: dict, dtype: DType, pass_: str) -> torch.Tensor:
    return inp["src"]  # a copy is exact: compared with the source itself


COPY = OpFamily(name="copy", shape_type=CopyShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                reference=reference, dtypes=("fp32",), shape_id=shape_id, sets_peak=COPY_BANDWIDTH)


@COPY.backend("torch", impl="Tensor.copy_ (a device-to-device cudaMemcpyAsync on CUDA, memcpy on CPU)")
def torch_copy(inp: dict, dtype: DType, pass_: str):
    src, dst = inp["src"], inp["dst"]
    return lambda: dst.copy_(src)
