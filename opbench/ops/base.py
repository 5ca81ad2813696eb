"""What an op family declares: its shape type, work formulas, inputs, reference and backends.

The harness (opbench/harness.py) does the rest: availability, correctness gate, timing, extra_info.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from opbench.ops.dtypes import DType, get_dtype

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
    runs_in: str | None = None  # the one dtype the op runs in whatever the workload's (else: `dtypes`)
    # what a shape holds but does not show (ragged sizes derived from it), for `opbench plan`; None: nothing
    describe: Callable[[Any], str] | None = None
    # Its cases run in the workload's weight format (`w=int4`: dtype int4), not in the workload's dtype:
    # the quantized linear layers' ops.
    weight_format: bool = False

    def backend(self, name: str, *, impl: str, requires: Requires | None = None):
        """Decorator: register `prepare` as backend `name`."""
        def register(prepare: Prepare) -> Prepare:
            if name in self.backends:
                raise ValueError(f"{self.name}: backend {name!r} registered twice")
            self.backends[name] = Backend(name, prepare, requires or (lambda shape, dtype, device: None), impl)
            return prepare
        return register

    def case_dtype(self, dtype: str) -> str | None:
        """The dtype this op runs in for a workload of `dtype`: the op's own, the dtype's first
        fallback the op has (fp8 -> bf16, tf32 -> fp32), or None."""
        if self.runs_in is not None:
            return self.runs_in
        if dtype in self.dtypes:
            return dtype
        return next((d for d in get_dtype(dtype).fallbacks if d in self.dtypes), None)

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


# torch.compile ------------------------------------------------------------------------------------------

# Compiles dynamo keeps per function: each case compiles its function at a new static shape, so a run
# needs about one per case of the op (the full profile: a few hundred).
RECOMPILE_LIMIT = 1024


def allow_recompiles() -> None:
    """Raise dynamo's limits on recompiles of one function (default 8) to RECOMPILE_LIMIT: past them
    dynamo silently runs the function eagerly, and a "compile" case would time eager torch."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


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


def needs_capability(shape, dtype: DType, device: str) -> str | None:
    """The dtype's matmul needs a GPU of its minimum compute capability (fp8: 8.9)."""
    if dtype.min_capability is None:
        return None
    need = ".".join(map(str, dtype.min_capability))
    if device != "cuda":
        return f"{dtype.name} matmul needs a CUDA GPU of compute capability {need} or newer"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < dtype.min_capability:
        return f"{dtype.name} matmul needs compute capability {need} or newer (this GPU: {major}.{minor})"
    return None


_PROBED: dict[tuple, str | None] = {}


def probe(key: tuple, call: Callable[[], Any]) -> str | None:
    """Why `call` (a tiny run of a library op) fails here, or None: once per key, for ops whose support
    depends on the build, the device and the dtype in ways no attribute tells (private torch kernels)."""
    if key not in _PROBED:
        try:
            call()
            _PROBED[key] = None
        except Exception as error:  # the library's own words, first line
            _PROBED[key] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}" if str(error) \
                else type(error).__name__
    return _PROBED[key]


def all_of(*checks: Requires) -> Requires:
    def requires(shape, dtype: DType, device: str) -> str | None:
        for check in checks:
            reason = check(shape, dtype, device)
            if reason:
                return reason
        return None
    return requires
