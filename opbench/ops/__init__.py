"""Op families: one module each. get_family() imports a family's module on first use."""

from __future__ import annotations

import importlib

from opbench.ops.base import OpFamily

# op name -> (module, attribute holding its OpFamily)
FAMILIES: dict[str, tuple[str, str]] = {
    "gemm": ("opbench.ops.gemm", "GEMM"),
    "attention": ("opbench.ops.attention", "ATTENTION"),
    "rmsnorm": ("opbench.ops.norm", "RMSNORM"),
    "layernorm": ("opbench.ops.norm", "LAYERNORM"),
    "add": ("opbench.ops.norm", "ADD"),
    "add_rmsnorm": ("opbench.ops.norm", "ADD_RMSNORM"),
    "rotary": ("opbench.ops.rotary", "ROTARY"),
    "swiglu": ("opbench.ops.activation", "SWIGLU"),
    "geglu": ("opbench.ops.activation", "GEGLU"),
    "gelu": ("opbench.ops.activation", "GELU"),
    "embedding": ("opbench.ops.embedding", "EMBEDDING"),
    "cross_entropy": ("opbench.ops.embedding", "CROSS_ENTROPY"),
    "adamw": ("opbench.ops.optim", "ADAMW"),
    "kv_write": ("opbench.ops.kvcache", "KV_WRITE"),
    "paged_attention": ("opbench.ops.paged_attention", "PAGED_ATTENTION"),
    "mla_decode": ("opbench.ops.mla", "MLA_DECODE"),
    "grouped_gemm": ("opbench.ops.grouped_gemm", "GROUPED_GEMM"),
    "fused_moe": ("opbench.ops.fused_moe", "FUSED_MOE"),
    "moe_route": ("opbench.ops.moe_route", "MOE_ROUTE"),
    "moe_permute": ("opbench.ops.moe_permute", "MOE_PERMUTE"),
    "moe_unpermute": ("opbench.ops.moe_unpermute", "MOE_UNPERMUTE"),
    "wgemm": ("opbench.ops.wgemm", "WGEMM"),
    "scaled_gemm": ("opbench.ops.scaled_gemm", "SCALED_GEMM"),
    "act_quant": ("opbench.ops.act_quant", "ACT_QUANT"),
    "dequant": ("opbench.ops.dequant", "DEQUANT"),
    "allreduce": ("opbench.ops.collective", "ALLREDUCE"),
    "allgather": ("opbench.ops.collective", "ALLGATHER"),
    "reducescatter": ("opbench.ops.collective", "REDUCESCATTER"),
    "alltoall": ("opbench.ops.collective", "ALLTOALL"),
    "broadcast": ("opbench.ops.collective", "BROADCAST"),
    "alltoallv": ("opbench.ops.collective", "ALLTOALLV"),
}


def get_family(op: str) -> OpFamily:
    try:
        module, attr = FAMILIES[op]
    except KeyError:
        raise KeyError(f"no measured op family {op!r} (measured: {', '.join(FAMILIES)})") from None
    return getattr(importlib.import_module(module), attr)
