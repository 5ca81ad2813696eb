"""What an op family declares: its shape type, work formulas, inputs, reference and backends.

The harness (opbench/harness.py) does the rest: availability, correctness gate, timing, extra_info.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from opbench.ops.dtypes import DType

PASSES = ("fwd", "dgrad", "wgrad", "bwd")

# prepare(inputs, dtype, pass_) -> a zero-argument callable that does the work once and returns its output(s)
Prepare = Callable[[dict, DType, str], Callable[[], Any]]
# requires(shape, dtype, device) -> why the backend cannot run this case, or None
Requires = Callable[[Any, DType, str], "str | None"]


@dataclass(frozen=True)
class Backend:
    name: str
    prepare: Prepare
    requires: Requires
    impl: str  # what actually runs, for a reader of the JSON


@dataclass
class OpFamily:
    name: str
    shape_type: type
    flops: Callable[[Any, str], int]  # (shape, pass) -> FLOPs of one call
    bytes: Callable[[Any, DType, str], int]  # (shape, dtype, pass) -> bytes moved by one call
    inputs: Callable[[Any, DType, str, str], dict]  # (shape, dtype, pass, device) -> random tensors
    reference: Callable[[dict, DType, str], Any]  # (inputs, dtype, pass) -> output(s) in higher precision
    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")
    shape_id: Callable[[Any], str] = None  # short, stable id of a shape; default: values joined by "x"
    backends: dict[str, Backend] = field(default_factory=dict)
    # workload dtype -> the dtype the op runs in, for workload dtypes not in `dtypes`
    fallbacks: dict[str, str] = field(default_factory=lambda: {"fp8": "bf16", "tf32": "fp32"})
    # what a shape holds but does not show (ragged sizes derived from it), for `opbench plan`; None: nothing
    describe: Callable[[Any], str] | None = None

    def backend(self, name: str, *, impl: str, requires: Requires | None = None):
        """Decorator: register `prepare` as backend `name`."""
        def register(prepare: Prepare) -> Prepare:
            if name in self.backends:
                raise ValueError(f"{self.name}: backend {name!r} registered twice")
            self.backends[name] = Backend(name, prepare, requires or (lambda shape, dtype, device: None), impl)
            return prepare
        return register

    def case_dtype(self, dtype: str) -> str | None:
        """The dtype this op runs in for a workload of `dtype`: the op's own, a fallback, or None."""
        if dtype in self.dtypes:
            return dtype
        fallback = self.fallbacks.get(dtype)
        return fallback if fallback in self.dtypes else None

    def id_of(self, shape) -> str:
        if self.shape_id is not None:
            return self.shape_id(shape)
        return "x".join(str(v) for v in dataclasses.astuple(shape))


def shape_dict(shape) -> dict[str, int]:
    return {k: int(v) for k, v in dataclasses.asdict(shape).items()}


def high_precision_dtype(device: torch.device | str) -> torch.dtype:
    """The reference's precision: float64 on CPU, float32 on GPUs (whose float64 is slow)."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def high_precision(t: torch.Tensor) -> torch.Tensor:
    return t.to(high_precision_dtype(t.device))


# Reasons shared by backends -------------------------------------------------------------------------

def needs_cuda(shape, dtype: DType, device: str) -> str | None:
    return None if device == "cuda" else "needs a CUDA GPU"


def needs_triton_gpu(shape, dtype: DType, device: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device != "cuda":
        return "Triton kernels are timed on GPUs only (on CPU the interpreter's timings mean nothing)"
    return None


def needs_compile_gpu(shape, dtype: DType, device: str) -> str | None:
    if device != "cuda":
        return "torch.compile cases run on GPUs only (on a CPU the compile time would dominate the run)"
    if importlib.util.find_spec("triton") is None:
        return "torch.compile needs triton on GPUs, and triton is not installed"
    return None


def installed(module: str, package: str, what: str = "") -> Requires:
    """Requires that `module` imports; the reason names the package to install (and what of it)."""
    def requires(shape, dtype: DType, device: str) -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed" + (f" ({what})" if what else "")
        return None
    return requires


def needs_flash_attn(shape, dtype: DType, device: str) -> str | None:
    return installed("flash_attn", "flash-attn")(shape, dtype, device) or needs_cuda(shape, dtype, device)


def tf32_needs_cuda(shape, dtype: DType, device: str) -> str | None:
    if dtype.tf32 and device != "cuda":
        return "tf32 math needs an NVIDIA GPU (Ampere or newer)"
    return None


def fp8_needs_sm89(shape, dtype: DType, device: str) -> str | None:
    if dtype.name != "fp8":
        return None
    if device != "cuda":
        return "fp8 matmul needs a CUDA GPU of compute capability 8.9 or newer"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"fp8 matmul needs compute capability 8.9 or newer (this GPU: {major}.{minor})"
    return None


def all_of(*checks: Requires) -> Requires:
    def requires(shape, dtype: DType, device: str) -> str | None:
        for check in checks:
            reason = check(shape, dtype, device)
            if reason:
                return reason
        return None
    return requires
