"""The quantization view: for one model, each weight format's decode step (batch 1 to 64) and prefill time
side by side with its memory, composed from one run's cases.

A run that measured a model in some weight format (plans with `w=`) gets one row per format and one for
its weights in the workload dtype; decode batches the run did not measure are interpolated or modeled
by the composer, and each row says how many of its calls were measured.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from opbench.analyze.compose import Composer, MissingMeasurement
from opbench.analyze.estimate import memory
from opbench.spec.plan import Plan, plan
from opbench.spec.workload import PlanError, Workload

DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class FormatRow:
    model: str
    weights: str  # the weight format, "" for weights in the workload dtype
    dtype: str  # the workload (activation) dtype
    context: int  # the decode steps' context length
    prompt_tokens: int  # the prefill's tokens (batch x prompt)
    decode_s: dict[int, float]  # batch -> one decode step
    prefill_s: float | None
    weights_bytes: int  # per GPU
    memory_bytes: int  # per GPU at decode batch 1 (weights and KV cache)
    measured_calls: int  # of the composed calls, those measured (the rest interpolated or modeled)
    calls: int

    @property
    def label(self) -> str:
        return self.weights or self.dtype

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decode_s"] = {str(b): t for b, t in self.decode_s.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FormatRow:
        return cls(**{**d, "decode_s": {int(b): t for b, t in d["decode_s"].items()}})


def format_rows(composer: Composer, plans: Iterable[Plan]) -> list[FormatRow]:
    """One row per (model, weight format) of the plans' models that have a plan with a weight format, the
    model's plain weights first; decode at the context of its plans' decodes, prefill at their prompt."""
    plans = list(plans)
    rows = []
    for name in dict.fromkeys(p.model.name for p in plans if p.workload.weights):
        mine = [p for p in plans if p.model.name == name]
        model = mine[0].model
        dtype = next(p.workload.dtype for p in mine if p.workload.weights)
        decodes = [p.workload for p in mine if p.workload.phase == "decode"]
        prefills = [p.workload for p in mine if p.workload.phase == "prefill"]
        context = max((w.seq_len for w in decodes), default=min(2048, model.max_seq_len))
        prompt = max(prefills, key=lambda w: w.batch * w.seq_len, default=None)
        formats = ["", *dict.fromkeys(p.workload.weights for p in mine if p.workload.weights)]
        for weights in formats:
            row = _row(composer, model, dtype, weights, context, prompt)
            if row is not None:
                rows.append(row)
    return rows


def _row(composer: Composer, model, dtype: str, weights: str, context: int,
         prompt: Workload | None) -> FormatRow | None:
    decode_s, measured, calls = {}, 0, 0
    try:
        for batch in DECODE_BATCHES:
            b = composer.compose(plan(model, Workload("decode", batch, context, dtype=dtype, weights=weights)))
            decode_s[batch] = b.total_s
            measured += sum(c.source == "measured" for c in b.calls)
            calls += len(b.calls)
    except (MissingMeasurement, PlanError):
        return None
    prefill_s = None
    if prompt is not None:
        try:
            w = Workload("prefill", prompt.batch, prompt.seq_len, dtype=dtype, weights=weights)
            b = composer.compose(plan(model, w))
            prefill_s = b.total_s
            measured += sum(c.source == "measured" for c in b.calls)
            calls += len(b.calls)
        except (MissingMeasurement, PlanError):
            pass
    mem = memory(model, Workload("decode", 1, context, dtype=dtype, weights=weights))
    return FormatRow(model.name, weights, dtype, context, prompt.batch * prompt.seq_len if prompt else 0, decode_s,
                     prefill_s, mem.weights_bytes, mem.total_bytes, measured, calls)
