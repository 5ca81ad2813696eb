"""A made-up device whose every op takes exactly its roofline time, max(FLOPs / F, bytes / B): cases
written as records for a few plans, so that the composer's fitted roofline recovers F and B and
models any other shape by the same law. Tests of what is composed from a run use it."""

from opbench.analyze.compose import Composer
from opbench.measure.cases import case_dtype
from opbench.ops import get_family
from opbench.ops.base import shape_dict
from opbench.ops.dtypes import get_dtype
from opbench.record import OpCase
from opbench.spec.models import ZOO
from opbench.spec.plan import plan
from opbench.spec.workload import Workload

FLOPS = 400e12  # FLOP/s
BYTES = 2e12  # B/s


def roofline_s(op: str, shape, dtype: str, pass_: str) -> float:
    family = get_family(op)
    return max(family.flops(shape, pass_) / FLOPS, family.bytes(shape, get_dtype(dtype), pass_) / BYTES)


def cases(plans, host_s: float | None = None) -> list[OpCase]:
    out, seen = [], set()
    for p in plans:
        for c in p.calls:
            if c.op not in ("gemm", "attention", "rmsnorm", "layernorm", "swiglu", "geglu", "gelu", "rotary", "add",
                            "kv_write", "embedding", "cross_entropy", "adamw"):
                continue  # collectives: the fabric profile
            dtype = case_dtype(c.op, p.workload.dtype)
            family = get_family(c.op)
            key = (c.op, c.shape, dtype, c.pass_)
            if key in seen:
                continue
            seen.add(key)
            out.append(OpCase(op=c.op, backend="torch", shape=shape_dict(c.shape), dtype=dtype, pass_=c.pass_,
                              flops=family.flops(c.shape, c.pass_),
                              bytes=family.bytes(c.shape, get_dtype(dtype), c.pass_),
                              median_s=roofline_s(c.op, c.shape, dtype, c.pass_), timer="cpu", host_s=host_s))
    return out


def plans_for(model_name: str, dtype: str = "bf16", train: bool = False) -> list:
    """A prefill (compute-bound GEMMs) and a decode (memory-bound) plan, and a training step if asked:
    enough for the fit to see both ceilings of every op."""
    model = ZOO[model_name]
    out = [plan(model, Workload("prefill", 1, 1024, dtype=dtype)),
           plan(model, Workload("decode", 8, 1024, dtype=dtype))]
    if train:
        out.append(plan(model, Workload("train", 1, 2048, dtype=dtype)))
    return out


def composer(model_name: str = "llama-3-8b", dtype: str = "bf16", train: bool = False,
             host_s: float | None = None, mode: str = "graph") -> Composer:
    return Composer(cases(plans_for(model_name, dtype, train), host_s), mode=mode)
