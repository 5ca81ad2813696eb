"""What a run adds up to: every plan's breakdown and estimate, and composition checked against the
units (layer, whole model) that were timed as one."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from opbench.analyze.alphabeta import PROFILES as FABRICS
from opbench.analyze.alphabeta import Fit
from opbench.analyze.compose import EXECUTION_MODES, Composer, MissingMeasurement
from opbench.record import OpCase, UnitCase
from opbench.analyze.estimate import TrainOptions, estimate_from, fewest_gpus, idealized_runtime
from opbench.spec.models import get_model
from opbench.measure.peaks import datasheet_for
from opbench.analyze.runs import Run, RunError, device_label, load_run, used_gpu
from opbench.text import format_seconds
from opbench.measure.summary import composition_lines
from opbench.measure.units import composed_s
from opbench.spec.workload import PHASES, Workload
from opbench.spec.plan import Plan, plan


def compose_session(plans: Iterable[Plan], cases: Iterable[OpCase], units: Iterable[UnitCase] = (),
                    policy: str = "fastest", peak_tflops: dict[str, float] | None = None) -> dict:
    """Every plan composed from the run's op cases, and the units timed whole checked against their
    composition. peak_tflops: the GPU's datasheet dense TFLOP/s per dtype, for MFU (None: no MFU)."""
    cases = list(cases)
    composer, eager = Composer(cases, policy), Composer(cases, "eager")
    out: dict = {"policy": policy, "breakdowns": [], "estimates": [], "validation": [], "missing": []}
    by_name = {}
    for p in plans:
        try:
            breakdown = composer.compose(p)
        except MissingMeasurement as missing:
            out["missing"].append({"plan": p.name, "reason": str(missing)})
            continue
        by_name[p.name] = p
        out["breakdowns"].append(breakdown.to_dict())
        peak = (peak_tflops or {}).get(p.workload.dtype)
        out["estimates"].append(estimate_from(breakdown, peak_flops=peak * 1e12 if peak else None).to_dict())
    for u in units:
        if not u.timed or u.plan not in by_name:
            continue
        try:  # the unit runs torch's eager ops, so it is composed from those backends' cases
            composed = composed_s(eager.compose(by_name[u.plan]), u.unit)
        except MissingMeasurement as missing:
            out["missing"].append({"plan": u.plan, "unit": u.unit, "reason": str(missing)})
            continue
        out["validation"].append({"plan": u.plan, "unit": u.unit, "measured_s": u.median_s, "composed_s": composed,
                                  "error_pct": 100 * (composed - u.median_s) / u.median_s,
                                  "stable": bool(u.stability and u.stability.stable),
                                  "ci_rel": u.stability.ci_rel if u.stability else None})
    return out


# `opbench estimate` and `opbench idealized`: the same composition for any workload, from a saved run ----

def add_command(sub) -> None:
    p = sub.add_parser("estimate", help="compose a workload's breakdown and end-to-end figures from a run")
    p.add_argument("run", help="a run: pytest bench/ --benchmark-json=FILE")
    _model_options(p)
    p.add_argument("--phase", required=True, choices=PHASES, help="prefill, decode, train or finetune (LoRA)")
    p.add_argument("--batch", type=int, default=1, help="sequences (train: the micro-batch); default 1")
    p.add_argument("--context", type=int, required=True,
                   help="prompt length (prefill), context length incl. the new token (decode), sequence length "
                        "(train, finetune)")
    p.add_argument("--lora-rank", type=int, default=16, help="finetune: the adapters' rank (default 16)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="mixtures of experts: the routing's Zipf exponent over the experts (default 0, uniform)")
    p.add_argument("--recompute", action="store_true", help="train: full activation recomputation")
    p.add_argument("--dp", type=int, default=1, help="train: data-parallel replicas (gradient all-reduce)")
    p.add_argument("--no-overlap", action="store_true", help="train: the gradient all-reduce does not overlap "
                                                             "the backward pass")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="memory of one GPU for the fewest-GPUs figure (default: the run's GPU, else 80)")
    p.add_argument("--json", action="store_true", help="print the breakdown and estimate as JSON")
    p.set_defaults(func=_estimate_command)
    p = sub.add_parser("idealized", help="write HELM's idealized runtime (prompt cost by length plus a per-output-"
                                         "token cost) for a model, from a run")
    p.add_argument("run", help="a run: pytest bench/ --benchmark-json=FILE")
    _model_options(p)
    p.add_argument("--decode-context", type=int, default=1024,
                   help="context of the decode step that prices an output token (default 1024)")
    p.add_argument("--cost-aware", action="store_true", help="multiply by the GPUs used (the tp degree)")
    p.add_argument("-o", "--output", help="write the JSON here (default: print it)")
    p.set_defaults(func=_idealized_command)


def _model_options(p) -> None:
    p.add_argument("--model", required=True, help="a zoo name or a Hugging Face config.json path")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--ep", type=int, default=1,
                   help="mixtures of experts: expert-parallel GPUs, a multiple of --tp (default 1); the all-to-alls "
                        "come from --collectives' fits or the --fabric profile")
    p.add_argument("--dtype", default="bf16", help="workload dtype (default bf16)")
    p.add_argument("--policy", default="fastest",
                   help="backends to compose from: fastest (default), vendor, triton, eager, or one backend's name")
    p.add_argument("--collectives", help="a collectives run (torchrun ... pytest collectives/ --benchmark-json=F) "
                                         "whose alpha-beta fits price the all-reduces")
    p.add_argument("--mode", default="graph", choices=EXECUTION_MODES,
                   help="execution mode composed: graph (CUDA graphs, a call costs its device time; default) or eager "
                        "(a call costs at least its measured host launch time, as an eager framework pays)")
    p.add_argument("--fabric", default="h100-nvlink-ring", choices=sorted(FABRICS),
                   help="fabric profile for collectives no fit covers (default h100-nvlink-ring)")


def _composer(args) -> tuple[Run, Composer]:
    run = load_run(args.run)
    fits = []
    if args.collectives:
        section = load_run(args.collectives).section.get("collectives") or {}
        fits = [Fit(**f) for f in section.get("fits", [])]
        if not fits:
            raise RunError(f"{args.collectives} holds no alpha-beta fits (opbench.collectives.fits); expected "
                           "a run of `torchrun ... -m pytest collectives/ --benchmark-json=FILE`")
    return run, Composer(run.measurements, args.policy, fits, args.fabric, args.mode)


def _estimate_command(args) -> int:
    run, composer = _composer(args)
    model = get_model(args.model)
    w = Workload(args.phase, args.batch, args.context, tp=args.tp, dtype=args.dtype, lora_rank=args.lora_rank,
                 ep=args.ep, skew=args.skew)
    breakdown = composer.compose(plan(model, w))
    sheet = datasheet_for((used_gpu(run.machine_info) or {}).get("name"))
    peak = sheet.matmul_tflops.get(args.dtype) if sheet else None
    train = TrainOptions(recompute=args.recompute, dp=args.dp, overlap=not args.no_overlap)
    est = estimate_from(breakdown, peak_flops=peak * 1e12 if peak else None, train=train,
                        collective_s=composer.collective_s)
    gpu_bytes = (args.gpu_memory_gib * 2**30 if args.gpu_memory_gib else
                 (used_gpu(run.machine_info) or {}).get("memory_total_bytes") or 80 * 2**30)
    fewest = fewest_gpus(model, w, gpu_bytes)
    if args.json:
        json.dump({"breakdown": breakdown.to_dict(), "estimate": est.to_dict(), "fewest_gpus": fewest}, sys.stdout,
                  indent=1)
        print()
        return 0
    result = {"breakdowns": [breakdown.to_dict()], "estimates": [est.to_dict()], "validation": [], "missing": []}
    print(f"from {run.path} ({device_label(run.machine_info, run.device)}), policy {args.policy}, execution mode {args.mode}")
    for line in composition_lines(result):
        print(line)
    if est.mfu is not None:
        print(f"  MFU against the {sheet.name} datasheet's {peak:g} TFLOP/s ({args.dtype})")
    print(f"  memory per GPU {est.memory.total_bytes / 2**30:.4g} GiB; fewest GPUs that hold it: "
          + (str(fewest) if fewest else "more than any tensor-parallel degree the heads allow")
          + f" (of {gpu_bytes / 2**30:.4g} GiB, 90% usable)")
    for c in breakdown.calls:
        if c.source != "measured":
            print(f"  {c.source}: {c.role} {c.op} {c.pass_} {format_seconds(c.time_s)}"
                  + (f" ({c.backend})" if c.backend else ""))
    return 0


def _idealized_command(args) -> int:
    _, composer = _composer(args)
    helm = idealized_runtime(composer, get_model(args.model), tp=args.tp, dtype=args.dtype,
                             decode_context=args.decode_context, cost_aware=args.cost_aware, ep=args.ep)
    text = json.dumps(helm, indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"opbench idealized: wrote {args.output}")
    else:
        print(text)
    return 0
