"""`opbench ...` (also `python -m opbench`): look at models and plans, compare and report runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from opbench.analyze import compare, helm, history, report, session, simulate, tradeoff
from opbench.measure import peaks, selftest
from opbench.analyze.charts import ReportError
from opbench.analyze.compose import MissingMeasurement, PolicyError
from opbench.analyze.pareto import SloError
from opbench.spec.models import ZOO, ConfigError, get_model
from opbench.analyze.runs import RunError
from opbench.measure.selection import PROFILES
from opbench.ops import get_family
from opbench.ops.collective import is_collective
from opbench.ops.dtypes import DTYPES, get_dtype
from opbench.text import OutputError, table_lines
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
    for f in p.fusions:
        print(f"fusable: {f.label}")


class Parser(argparse.ArgumentParser):
    """Usage errors in the one-line form of every other error, pointing at the command's help."""

    def error(self, message: str):
        self.exit(2, f"opbench: error: {message} (see {self.prog} --help)\n")


# What a user can get wrong: each is told in one line, never a traceback
USER_ERRORS = (ConfigError, PlanError, RunError, ReportError, MissingMeasurement, PolicyError, OutputError, SloError)
SIGPIPE_STATUS = 128 + 13  # what a shell reports for a program stopped by a closed pipe


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="opbench",
        description="LLM operator micro-benchmarks. Run the suite with `pytest bench/ --benchmark-json=results.json`;"
                    " these commands inspect what it plans and read what it measured.",
        epilog="profiles: " + "; ".join(f"{p.name}: {p.about}" for p in PROFILES.values()))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("models", help="list the built-in model zoo").set_defaults(func=_models)
    p = sub.add_parser("plan", help="print the op calls of each kind of decoder layer plus embedding and LM head")
    p.add_argument("model", help="a zoo name or a Hugging Face config.json path")
    p.add_argument("workload", help=f"{WORKLOAD_SYNTAX}, e.g. decode:b=32,s=4096,tp=8")
    p.add_argument("--dtype", default="bf16", help=f"workload dtype: {', '.join(DTYPES)} (default bf16)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)
    for command in (compare, history, report, peaks, session, tradeoff, simulate, helm, selftest):
        command.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args) or 0  # compare, history: 1 on a regression
        sys.stdout.flush()  # a closed pipe shows here, while its error can still be caught
        return status
    except USER_ERRORS as error:
        parser.exit(2, f"opbench: error: {error}\n")
    except BrokenPipeError:  # `opbench ... | head`: the reader has all it wanted
        # nothing more can reach the pipe, and Python's own flush at exit must not try
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_STATUS


if __name__ == "__main__":
    sys.exit(main())
