"""Cases: the distinct (op, shape, dtype, pass) of the selected plans (the fused kernels that may replace
some of their calls included), crossed with backends."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from opbench.ops import FAMILIES, get_family
from opbench.ops.backends import backend_filter
from opbench.spec.plan import Plan


@dataclass(frozen=True)
class Case:
    op: str
    shape: object  # the family's shape record
    dtype: str
    pass_: str
    backend: str
    roles: tuple[str, ...]  # "model/phase/role" for every plan call this case serves

    @property
    def key(self) -> tuple:
        """Identity without the backend: what compose looks a measurement up by."""
        return (self.op, self.shape, self.dtype, self.pass_)

    @property
    def id(self) -> str:
        return f"{get_family(self.op).id_of(self.shape)}-{self.dtype}-{self.pass_}-{self.backend}"


def case_dtype(op: str, dtype: str, weights: str = "") -> str | None:
    """The dtype an op runs in for a workload of `dtype` and weight format `weights` ("" for weights in
    the workload dtype): the format for the quantized linear layers' ops, else as the family decides;
    unmeasured ops keep the workload's."""
    if op not in FAMILIES:
        return dtype
    family = get_family(op)
    if family.weight_format:
        return weights if weights in family.dtypes else None
    return family.case_dtype(dtype)


def build_cases(plans: Iterable[Plan], op: str, backends: Iterable[str] | None = None) -> list[Case]:
    """One case per distinct (shape, dtype, pass) of `op` in the plans and per backend, in plan order.

    `backends`: patterns (opbench.ops.backends) of the backends to keep; None keeps every one.
    """
    family = get_family(op)
    roles: dict[tuple, list[str]] = {}
    for p in plans:
        dtype = case_dtype(op, p.workload.dtype, p.workload.weights)
        if dtype is None:
            continue
        for call in p.all_calls:
            if call.op != op:
                continue
            role = f"{p.model.name}/{p.workload.phase}/{call.role}"
            seen = roles.setdefault((call.shape, dtype, call.pass_), [])
            if role not in seen:
                seen.append(role)
    wanted = list(filter(backend_filter(backends), family.backends))
    return [Case(op, shape, dtype, pass_, b, tuple(r))
            for (shape, dtype, pass_), r in roles.items() for b in wanted]
