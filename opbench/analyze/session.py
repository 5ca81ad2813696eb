"""What a run adds up to: every plan's breakdown and estimate, and composition checked against the
units (layer, whole model) that were timed as one."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

from opbench.analyze.alphabeta import PROFILES as FABRICS
from opbench.analyze.alphabeta import Fit
from opbench.analyze.compose import EXECUTION_MODES, POLICIES, Composer, MissingMeasurement
from opbench.record import OpCase, UnitCase
from opbench.analyze.estimate import (TrainOptions, batch_capacity, compose_estimate, estimate_from, fewest_gpus,
                                      kv_cache_elements_per_token_per_gpu)
from opbench.spec.models import get_model
from opbench.measure.peaks import datasheet_for
from opbench.ops.dtypes import WEIGHT_FORMATS
from opbench.analyze.quantization import format_rows
from opbench.analyze.runs import Run, RunError, device_label, load_run, used_gpu
from opbench.text import device_noun, format_flops, format_seconds, positive
from opbench.measure.selection import measure_command
from opbench.measure.summary import composition_lines
from opbench.measure.units import composed_s
from opbench.spec.workload import KV_DTYPES, KV_PAGES, PHASES, Workload
from opbench.spec.plan import Plan, plan


def compose_session(plans: Iterable[Plan], cases: Iterable[OpCase], units: Iterable[UnitCase] = (),
                    policy: str = "fastest", peak_tflops: dict[str, float] | None = None, fused: bool = False) -> dict:
    """Every plan composed from the run's op cases, and the units timed whole checked against their
    composition. peak_tflops: the GPU's datasheet dense TFLOP/s per dtype, for MFU (None: no MFU).
    What could not be composed is listed once: the plans, the ops they lack, one command measuring them."""
    cases, plans = list(cases), list(plans)
    composer, eager = Composer(cases, policy, fused=fused), Composer(cases, "eager", fused=fused)
    out: dict = {"policy": policy, "fused": fused, "breakdowns": [], "estimates": [], "validation": [],
                 "missing": []}
    by_name = {}
    for p in plans:
        try:
            breakdown = composer.compose(p)
        except MissingMeasurement as missing:
            out["missing"].append({"plan": p.name, "ops": list(missing.ops), "reason": str(missing)})
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
            out["missing"].append({"plan": u.plan, "unit": u.unit, "ops": list(missing.ops), "reason": str(missing)})
            continue
        out["validation"].append({"plan": u.plan, "unit": u.unit, "measured_s": u.median_s, "composed_s": composed,
                                  "error_pct": 100 * (composed - u.median_s) / u.median_s,
                                  "stable": bool(u.stability and u.stability.stable),
                                  "ci_rel": u.stability.ci_rel if u.stability else None})
    plans_by_name = {p.name: p for p in plans}
    out["quantization"] = [r.to_dict() for r in format_rows(composer, plans)]
    for what, entries, backends in (("plans", [m for m in out["missing"] if "unit" not in m], ()),
                                    ("units", [m for m in out["missing"] if "unit" in m], ("eager",))):
        if entries:
            ops = list(dict.fromkeys(op for m in entries for op in m["ops"]))
            out[f"measure_{what}"] = measure_command([plans_by_name[m["plan"]] for m in entries], ops, backends)
    return out


# `opbench estimate`: the same composition for any workload, from a saved run (`opbench idealized`: analyze/helm.py) --

def add_command(sub) -> None:
    p = sub.add_parser("estimate", help="compose a workload's breakdown and end-to-end figures from a run")
    p.add_argument("run", help="a run: pytest bench/ --benchmark-json=FILE")
    model_options(p)
    p.add_argument("--phase", required=True, choices=PHASES, help="prefill, decode, train or finetune (LoRA)")
    p.add_argument("--batch", type=positive(int), default=1, help="sequences (train: the micro-batch); default 1")
    p.add_argument("--context", type=positive(int), required=True,
                   help="prompt length (prefill), context length incl. the new token (decode), sequence length "
                        "(train, finetune)")
    p.add_argument("--lora-rank", type=positive(int), default=16, help="finetune: the adapters' rank (default 16)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="mixtures of experts: the routing's Zipf exponent over the experts (default 0, uniform)")
    p.add_argument("--paged", type=int, default=0, choices=KV_PAGES,
                   help="inference: a KV cache in pages of this many tokens (default 0, contiguous)")
    p.add_argument("--kv", default="", choices=KV_DTYPES, help="inference: the KV cache's dtype (fp8; default: the "
                                                                "activations')")
    p.add_argument("--recompute", action="store_true", help="train: full activation recomputation (a second "
                                                            "forward; only each layer's input is kept)")
    p.add_argument("--dp", type=positive(int), default=1, help="train: data-parallel replicas (gradient all-reduce)")
    p.add_argument("--no-overlap", action="store_true", help="train: the gradient all-reduce does not overlap "
                                                             "the backward pass")
    p.add_argument("--gpu-memory-gib", type=positive(float), default=None,
                   help="memory of one GPU for the fewest-GPUs figure (default: the run's GPU, else 80)")
    p.add_argument("--json", action="store_true", help="print the breakdown and estimate as JSON")
    p.set_defaults(func=_estimate_command)


def model_options(p) -> None:
    p.add_argument("--model", required=True, help="a zoo name or a Hugging Face config.json path")
    p.add_argument("--tp", type=positive(int), default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--ep", type=positive(int), default=1,
                   help="mixtures of experts: expert-parallel GPUs, a multiple of --tp (default 1); the all-to-alls "
                        "come from --collectives' fits or the --fabric profile")
    p.add_argument("--dtype", default="bf16", help="workload dtype (default bf16)")
    p.add_argument("--weights", default="", choices=["", *WEIGHT_FORMATS], metavar="FORMAT",
                   help=f"the decoder layers' linear weights: {', '.join(WEIGHT_FORMATS)} (default: in --dtype); "
                        "nf4 with --phase finetune is QLoRA")
    p.add_argument("--policy", default="fastest",
                   help=f"backends to compose from: {', '.join(POLICIES)} (default fastest), or a backend's name "
                        "or glob (sdpa*)")
    p.add_argument("--fuse", action="store_true",
                   help="let the fused kernels the plan allows (residual add + RMSNorm -> add_rmsnorm) replace the "
                        "calls they fuse, where the run measured them; the breakdown names the calls replaced")
    p.add_argument("--collectives", help="a collectives run (torchrun ... pytest collectives/ --benchmark-json=F) "
                                         "whose alpha-beta fits price the all-reduces")
    p.add_argument("--mode", default="graph", choices=EXECUTION_MODES,
                   help="execution mode composed: graph (CUDA graphs, a call costs its device time; default) or eager "
                        "(a call costs at least its measured host launch time, as an eager framework pays)")
    p.add_argument("--fabric", default="h100-nvlink-ring", choices=sorted(FABRICS),
                   help="fabric profile for collectives no fit covers (default h100-nvlink-ring)")


def composer_from_args(args) -> tuple[Run, Composer]:
    run = load_run(args.run)
    if not run.of_kind("op"):
        collectives = run.of_kind("collective")
        raise RunError(f"{run.path} is a collectives run ({len(collectives)} collective cases, no op case); "
                       "give an op run here (pytest bench/ --benchmark-json=FILE) and the collectives run with "
                       "--collectives" if collectives else
                       f"{run.path} holds no op case to compose from (pytest bench/ --benchmark-json=FILE)")
    fits, collectives = [], []
    if args.collectives:
        coll = load_run(args.collectives)
        fits = [Fit(**f) for f in (coll.section.get("collectives") or {}).get("fits", [])]
        collectives = coll.of_kind("collective")
        if not fits:
            raise RunError(f"{args.collectives} holds no alpha-beta fits (opbench.collectives.fits); expected "
                           "a run of `torchrun ... -m pytest collectives/ --benchmark-json=FILE`")
    return run, Composer([*run.measurements, *collectives], args.policy, fits, args.fabric, args.mode, args.fuse)


def _estimate_command(args) -> int:
    run, composer = composer_from_args(args)
    model = get_model(args.model)
    w = Workload(args.phase, args.batch, args.context, tp=args.tp, dtype=args.dtype, lora_rank=args.lora_rank,
                 ep=args.ep, skew=args.skew, weights=args.weights, paged=args.paged, kv_dtype=args.kv)
    sheet = datasheet_for((used_gpu(run.machine_info) or {}).get("name"))
    peak = sheet.matmul_tflops.get(args.dtype) if sheet else None
    train = TrainOptions(recompute=args.recompute, dp=args.dp, overlap=not args.no_overlap)
    breakdown, est = compose_estimate(composer.compose(plan(model, w)), peak_flops=peak * 1e12 if peak else None,
                                      train=train, collective_s=composer.collective_s)
    gpu_bytes = (args.gpu_memory_gib * 2**30 if args.gpu_memory_gib else
                 (used_gpu(run.machine_info) or {}).get("memory_total_bytes") or 80 * 2**30)
    fewest = fewest_gpus(model, w, gpu_bytes, recompute=w.training and args.recompute)
    capacity = None if w.training else batch_capacity(model, w, gpu_bytes)
    if args.json:
        json.dump({"breakdown": breakdown.to_dict(), "estimate": est.to_dict(), "fewest_gpus": fewest,
                   "batch_capacity": capacity}, sys.stdout, indent=1)
        print()
        return 0
    result = {"breakdowns": [breakdown.to_dict()], "estimates": [est.to_dict()], "validation": [], "missing": []}
    noun = device_noun(run.device)
    print(f"from {run.path} ({device_label(run.machine_info, run.device)}), policy {args.policy}, "
          f"execution mode {args.mode}")
    for line in composition_lines(result, run.device):
        print(line)
    if est.mfu is not None:
        print(f"  MFU against the {sheet.name} datasheet's {format_flops(peak * 1e12)} ({args.dtype})")
    print(f"  memory per {noun} {est.memory.total_bytes / 2**30:.4g} GiB; fewest {noun}s that hold it: "
          + (str(fewest) if fewest else "more than any tensor-parallel degree the heads allow")
          + f" (of {gpu_bytes / 2**30:.4g} GiB, 90% usable)")
    if not w.training:
        per_token = kv_cache_elements_per_token_per_gpu(model, w.tp)
        kind = "latent + rotary key (MLA)" if model.mla else "K and V"
        print(f"  KV cache per {noun} {est.memory.kv_cache_bytes / 2**30:.4g} GiB: {per_token} elements ({kind}) "
              f"per token per layer, {w.kv_dtype or 'activation dtype'}" + (f", pages of {w.paged}" if w.paged else "")
              + f"; batch capacity at {w.seq_len} tokens of context: {capacity} sequences per {noun}")
    for c in breakdown.calls:
        if c.source != "measured":
            print(f"  {c.source}: {c.role} {c.op} {c.pass_} {format_seconds(c.time_s)}"
                  + (f" ({c.backend})" if c.backend else ""))
    return 0

