"""`opbench ...` (also `python -m opbench`): look at models and plans, compare and report runs."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from opbench.analyze import compare, report, session
from opbench.measure import peaks, selftest
from opbench.analyze.charts import ReportError
from opbench.analyze.compose import MissingMeasurement
from opbench.spec.models import ZOO, ConfigError, get_model
from opbench.analyze.runs import RunError
from opbench.measure.selection import PROFILES
from opbench.text import table_lines
from opbench.ops import get_family
from opbench.ops.collective import is_collective
from opbench.ops.dtypes import get_dtype
from opbench.spec.workload import WORKLOAD_SYNTAX, PlanError, parse_workload
from opbench.spec.plan import plan


def _models(args) -> None:
    header = ("name", "hidden", "layers", "heads", "kv", "head_dim", "ffn", "vocab", "max_seq", "extra")
    rows = [header]
    for m in ZOO.values():
        extra = [m.norm, m.activation]
        if m.sliding_window:
            extra.append(f"window {m.sliding_window}")
        if m.experts > 1:
            extra.append(f"{m.experts} experts, top-{m.experts_per_token}")
        rows.append((m.name, m.hidden, m.layers, m.heads, m.kv_heads, m.head_dim, m.ffn_hidden, m.vocab,
                     m.max_seq_len, ", ".join(extra)))
    print("\n".join(table_lines(rows)))


def _plan(args) -> None:
    p = plan(get_model(args.model), parse_workload(args.workload, args.dtype))
    if args.json:
        json.dump(p.to_dict(), sys.stdout, indent=1)
        print()
        return
    w = p.workload
    kinds = ", ".join(f"{n} {kind}" for kind, n in p.kinds().items())
    print(f"{p.name}: {p.model.layers} layers ({kinds}); per GPU at tp={w.tp}"
          + (f", ep={w.ep} ({w.gpus} GPUs)" if w.ep > 1 else "") + (f", routing skew {w.skew:g}" if w.skew else ""))
    rows = [("role", "op", "pass", "count", "layers", "shape")]
    details: dict[tuple, list[str]] = {}  # what a shape derives (ragged rows per expert, all-to-all splits)
    for c in p.calls:
        shape = " ".join(f"{k}={v}" for k, v in asdict(c.shape).items())
        rows.append((c.role, c.op, c.pass_, c.count, f"{c.layers} {c.kind}" if c.scope == "layer" else "model",
                     shape))
        if get_family(c.op).describe is not None:
            roles = details.setdefault((c.op, c.shape), [])
            roles += [c.role] if c.role not in roles else []
    print("\n".join(table_lines(rows)))
    for (op, shape), roles in details.items():
        family = get_family(op)
        text = family.describe(shape)
        if is_collective(op):
            dtype = get_dtype(family.case_dtype(w.dtype))
            text += f"; S = {family.bytes(shape, dtype, 'fwd')} B in {dtype.name} (the busiest rank's buffer)"
        print(f"{', '.join(roles)} ({op} {family.id_of(shape)}): {text}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opbench",
        description="LLM operator micro-benchmarks. Run the suite with `pytest bench/ --benchmark-json=results.json`;"
                    " these commands inspect what it plans and read what it measured.",
        epilog="profiles: " + "; ".join(f"{p.name}: {p.about}" for p in PROFILES.values()))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("models", help="list the built-in model zoo").set_defaults(func=_models)
    p = sub.add_parser("plan", help="print the op calls of each kind of decoder layer plus embedding and LM head")
    p.add_argument("model", help="a zoo name or a Hugging Face config.json path")
    p.add_argument("workload", help=f"{WORKLOAD_SYNTAX}, e.g. decode:b=32,s=4096,tp=8")
    p.add_argument("--dtype", default="bf16", help="workload dtype: bf16, fp16, fp32, tf32, fp8 (default bf16)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)
    for command in (compare, report, peaks, session, selftest):
        command.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0  # compare: 1 on a regression
    except (ConfigError, PlanError, RunError, ReportError, MissingMeasurement) as error:
        parser.exit(2, f"opbench: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
