"""Validation cases: a decoder layer (and a whole small model) timed as one unit at a plan's workload,
so that composition can be checked against it."""

from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from opbench.analyze.compose import Breakdown
from opbench.ops.dtypes import get_dtype
from opbench.ops.base import high_precision, high_precision_dtype
from opbench.measure.reference_layer import (ReferenceLayer, ReferenceModel, kv_cache, layer_inputs, pin_routes,
                                             rope_tables, supported)
from opbench.measure.gate import check, fail_unless_passed
from opbench.measure.runner import finish, timed
from opbench.measure.timing import RunSettings, measure_stream
from opbench.record import UnitCase as Unit
from opbench.spec.plan import Plan, kind_label

WHOLE_MODEL_MAX_PARAMS = 1e9  # whole models are timed only when small (the tiny model on a CPU)
EXCLUDED_MODULES = ("communication", "optimizer")  # one GPU's unit runs neither


@dataclass(frozen=True)
class UnitCase:
    plan: Plan
    unit: str  # "layer", "model", or "layer:KIND" ("layer:full/moe") for a model whose layers differ

    @property
    def id(self) -> str:
        w = self.plan.workload
        return f"{self.plan.model.name}-{w.label}-{w.dtype}-{self.unit}"


def unit_cases(plans) -> list[UnitCase]:
    cases = []
    for p in plans:
        # finetune adds adapters the reference layer lacks; a decode batch of mixed contexts needs
        # per-sequence masks it does not build; expert parallelism needs GPUs to dispatch to; its weights
        # are plain tensors of the workload dtype, never a quantized format; its KV cache is contiguous,
        # in the activations' dtype
        w = p.workload
        if (w.phase == "finetune" or w.min_context or w.ep > 1 or w.weights or w.paged or w.kv_dtype
                or supported(p.model)):
            continue
        kinds = p.model.layer_kinds()
        cases += [UnitCase(p, "layer" if len(kinds) == 1 else f"layer:{kind_label(*kind)}") for kind in kinds]
        if p.model.params <= WHOLE_MODEL_MAX_PARAMS:
            cases.append(UnitCase(p, "model"))
    return cases


def unit_kind(unit: str) -> tuple[str, str] | None:
    """The kind of layer a "layer:KIND" unit times, None for "layer" (the only kind) and "model"."""
    if not unit.startswith("layer:"):
        return None
    attention, _, mlp = unit.removeprefix("layer:").partition("/")
    return attention, mlp


def composed_s(breakdown: Breakdown, unit: str) -> float:
    """What the unit should take by composition: the same calls, without the excluded modules."""
    kind = unit_kind(unit)
    total = 0.0
    for c in breakdown.calls:
        if c.module in EXCLUDED_MODULES or (unit != "model" and c.scope == "model"):
            continue
        if kind is not None and c.kind != kind_label(*kind):
            continue
        total += c.count * c.time_s * (c.layers if unit == "model" else 1)
    return total


def _build(case: UnitCase, dtype: torch.dtype, device: str):
    """The module and a function running it once (forward, or forward and backward in training)."""
    model, w = case.plan.model, case.plan.workload
    train = w.phase == "train"
    if case.unit != "model":
        module = ReferenceLayer(model, w.tp, unit_kind(case.unit)).to(device=device, dtype=dtype)
        inp = layer_inputs(model, w, dtype, device)
        x = inp["x"].requires_grad_(train)
        args = (x, inp["rope"], inp["cache"])

        def forward(m, *a):
            return m(*a)
    else:
        module = ReferenceModel(model, w.tp).to(device=device, dtype=dtype)
        q_len = 1 if w.phase == "decode" else w.seq_len
        tokens = torch.randint(0, module.embed.num_embeddings, (w.batch, q_len), device=device)
        rope = rope_tables(model, torch.arange(w.seq_len - q_len, w.seq_len, device=device), dtype)
        caches = None if train else [kv_cache(model, w, dtype, device) for _ in range(model.layers)]
        args = (tokens, rope, caches)

        def forward(m, *a):
            logits = m(*a, last_only=not train)
            if not train:
                return logits
            return F.cross_entropy(logits.flatten(0, 1).float(), a[0].flatten())

    def run():
        if not train:
            with torch.no_grad():
                return forward(module, *args)
        out = forward(module, *args)
        out.backward(torch.ones_like(out) if out.dim() else None)
        return out
    return module, args, forward, run


def run_unit_case(benchmark, case: UnitCase, settings: RunSettings) -> Unit:
    started = time.perf_counter()
    w = case.plan.workload
    dtype = get_dtype(w.dtype)
    record = Unit(unit=case.unit, plan=case.plan.name, dtype=w.dtype, pass_="fwd+bwd" if w.training else "fwd")
    if not dtype.plain:
        pytest.skip(f"the reference {case.unit} runs torch's eager ops in plain dtypes (no scales, no math "
                    f"mode), not {dtype.name}")
    torch.manual_seed(zlib.crc32(case.id.encode()))
    with measure_stream(settings.device):
        with torch.no_grad():
            module, args, forward, run = _build(case, dtype.torch, settings.device)
            reference = copy.deepcopy(module).to(high_precision_dtype(settings.device))
            out = forward(module, *args)
            pin_routes(module, reference)  # the reference's experts are the unit's, near ties or not
            # a unit chains a dozen ops whose rounding errors add up: four times one op's tolerance
            verdict = check(out, forward(reference, *_upcast(args)), 4 * dtype.tol)
        del reference
        record = replace(record, correct=verdict)
        fail_unless_passed(verdict)
        # one copy: a unit's weights are its own, and the whole layer's working set is what it is
        samples = timed([run], replace(settings.for_units(), l2="warm"), benchmark, started=started)
    return finish(benchmark, record, samples, settings)


def _upcast(value):
    """Tensors inside tuples and lists (rope tables, KV caches) in the reference's precision."""
    if isinstance(value, (tuple, list)):
        return type(value)(_upcast(v) for v in value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return high_precision(value)
    return value
