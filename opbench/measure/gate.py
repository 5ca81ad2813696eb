"""The correctness gate: an output against its reference, by relative error under a tolerance."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from opbench.record import Gate


def check(out: Any, ref: Any, tol: float) -> Gate:
    """Compare an output (or a tuple of them) with its reference, each upcast to the reference's dtype."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(outs) != len(refs):
        raise ValueError(f"{len(outs)} outputs but {len(refs)} references")
    worst = Gate(0.0, tol)
    for i, (o, r) in enumerate(zip(outs, refs)):
        if tuple(o.shape) != tuple(r.shape):
            return Gate(math.inf, tol, i)
        o = o.to(r.dtype)
        denom = torch.linalg.vector_norm(r).item()
        err = torch.linalg.vector_norm(o - r).item() / (denom if denom > 0 else 1.0)
        if math.isnan(worst.rel_err):
            continue  # a NaN output is the worst; a later output, however close, does not hide it
        if not err <= worst.rel_err:  # NaN compares false: it becomes the worst
            worst = Gate(err, tol, i)
    return worst


def fail_unless_passed(verdict: Gate, where: str = "") -> None:
    """A wrong result fails the case; no time is kept."""
    if not verdict.passed:
        pytest.fail(f"wrong result{where}: relative error {verdict.rel_err:.3g} > tolerance {verdict.tol:g}"
                    f" (output {verdict.worst_output})", pytrace=False)
