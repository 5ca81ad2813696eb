"""`opbench idealized RUN --model M`: HELM's idealized runtime of a model, in the file HELM reads.

HELM (Liang et al. 2022, section 4.9; crfm-helm's metrics/efficiency_metrics.py) prices a request of
p prompt tokens and o output tokens from a table per model deployment, as in its
efficiency_data/inference_idealized_runtimes.json:

    {"meta/llama-3-8b": {"runtime_per_output_token": s,
                         "runtime_for_prompt_tokens": {"1": s, "16": s, ..., "1920": s}}}

and looks a request up so: the smallest profiled prompt length k >= p, its runtime scaled by p / k
(beyond the largest, the largest scaled likewise), plus runtime_per_output_token x (o - 1) when
o > 0, plus "overhead" where the entry has one (the denoised form, inference_denoised_runtimes.json,
whose prompt lengths are 1, 256, 512, 1024 and 1536). `helm_runtime` does exactly that.

Beside the file, the per-configuration form: the same table for each configuration on the
trade-off's frontier (opbench.analyze.tradeoff), with its cost-aware variant, GPU-seconds (runtime x
GPUs / batch: a request's share of the GPUs), and dollars at a price per GPU-hour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from opbench.analyze.compose import Composer
from opbench.analyze.estimate import idealized_runtime
from opbench.analyze.tradeoff import InferenceConfig, gpu_memory, inference_tradeoff
from opbench.spec.models import ModelConfig, get_model
from opbench.spec.plan import plan
from opbench.spec.workload import PlanError, Workload
from opbench.text import format_seconds, table_lines, write_file

# The prompt lengths of HELM's two inference files, as they list them.
IDEALIZED_PROMPT_TOKENS = (1, 16, 32, 64, 128, 192, 256, 320, 384, 428, 472, 512, 576, 640, 704, 768, 832, 896, 960,
                           1024, 1152, 1280, 1408, 1536, 1664, 1792, 1920)
DENOISED_PROMPT_TOKENS = (1, 256, 512, 1024, 1536)
FORMS = ("idealized", "denoised")

# HELM's names (organization/model) of the zoo's base models; HELM looks an entry up by the request's model
# deployment, so a deployment named otherwise (a hosting provider's), or any other model, needs --name.
HELM_NAMES = {"llama-2-7b": "meta/llama-2-7b", "llama-2-13b": "meta/llama-2-13b", "llama-2-70b": "meta/llama-2-70b",
              "llama-3-8b": "meta/llama-3-8b", "llama-3-70b": "meta/llama-3-70b",
              "mistral-7b": "mistralai/mistral-7b-v0.1",
              "mixtral-8x7b": "mistralai/mixtral-8x7b-32kseqlen", "gpt-3-175b": "openai/davinci"}


def helm_name(model: ModelConfig, given: str | None = None) -> str:
    if given:
        if "/" not in given:
            raise PlanError(f"HELM name {given!r}: HELM keys its files by organization/model, e.g. meta/llama-3-8b")
        return given
    if model.name in HELM_NAMES:
        return HELM_NAMES[model.name]
    raise PlanError(f"no HELM name known for {model.name!r}: give one with --name ORG/MODEL (the model deployment "
                    "HELM runs, e.g. meta/llama-3-8b)")


def helm_runtime(entry: dict, prompt_tokens: int, output_tokens: int) -> float:
    """A request's runtime as HELM's efficiency metric computes it from one model's entry."""
    table = {int(k): float(v) for k, v in entry["runtime_for_prompt_tokens"].items()}
    keys = sorted(table)
    k = next((key for key in keys if prompt_tokens <= key), keys[-1])
    runtime = table[k] * prompt_tokens / k
    if output_tokens > 0:
        runtime += entry["runtime_per_output_token"] * (output_tokens - 1)
    if entry.get("overhead") is not None:
        runtime += entry["overhead"]
    return runtime


def helm_entry(composer: Composer, model: ModelConfig, *, tp: int = 1, dtype: str = "bf16", decode_context: int = 1024,
               form: str = "idealized", overhead_s: float = 0.0, cost_aware: bool = False, weights: str = "") -> dict:
    """One model's entry at batch 1: HELM's prompt lengths (those within the model's context), the
    per-token cost of a decode step at decode_context, and in the denoised form the overhead."""
    if form not in FORMS:
        raise PlanError(f"HELM form {form!r}: one of {', '.join(FORMS)}")
    prompts = IDEALIZED_PROMPT_TOKENS if form == "idealized" else DENOISED_PROMPT_TOKENS
    entry = idealized_runtime(composer, model, tp=tp, dtype=dtype, decode_context=decode_context,
                              prompt_tokens=prompts, cost_aware=cost_aware, weights=weights)
    if form == "denoised":
        entry["overhead"] = overhead_s * (tp if cost_aware else 1)
    return entry


# The per-configuration form -------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigRuntime:
    config: InferenceConfig
    entry: dict  # HELM's entry: a request's runtime in this configuration (batch-mates share each step)

    def gpu_s(self, prompt_tokens: int, output_tokens: int) -> float:
        """Cost-aware: the request's share of the GPUs' time, runtime x GPUs / batch."""
        return helm_runtime(self.entry, prompt_tokens, output_tokens) * self.config.gpus / self.config.batch

    def cost_entry(self) -> dict:
        """The entry scaled to GPU-seconds per request, in HELM's shape."""
        scale = self.config.gpus / self.config.batch
        return {"runtime_per_output_token": self.entry["runtime_per_output_token"] * scale,
                "runtime_for_prompt_tokens": {k: v * scale for k, v in self.entry["runtime_for_prompt_tokens"].items()}}


def config_runtime(composers: dict[str, Composer], model: ModelConfig, c: InferenceConfig, decode_context: int,
                   prompt_tokens=IDEALIZED_PROMPT_TOKENS) -> ConfigRuntime:
    """HELM's table for one configuration: the batch's prefill at each prompt length (every request of
    the batch waits for it) and its decode step at decode_context."""
    composer = composers[c.mode]

    def seconds(phase: str, length: int) -> float:
        return composer.compose(plan(model, Workload(phase, c.batch, length, tp=c.tp, dtype=c.dtype))).total_s

    prompts = [p for p in prompt_tokens if p <= model.max_seq_len]
    return ConfigRuntime(c, {"runtime_per_output_token": seconds("decode", min(decode_context, model.max_seq_len)),
                             "runtime_for_prompt_tokens": {str(p): seconds("prefill", p) for p in prompts}})


def frontier_runtimes(composer: Composer, model: ModelConfig, prompt: int, output: int, gpu, decode_context: int,
                      **tradeoff_options) -> list[ConfigRuntime]:
    t = inference_tradeoff(composer, model, prompt, output, gpu, **tradeoff_options)
    modes = {p.config.mode for p in t.frontier}
    composers = {m: composer if m == composer.mode else
                 Composer(composer.measurements, composer.policy, composer.fits.values(), composer.fabric.name, m)
                 for m in modes}
    return [config_runtime(composers, model, p.config, decode_context) for p in t.frontier]


def frontier_rows(runtimes: list[ConfigRuntime], prompt: int, output: int, usd_per_gpu_hour: float | None,
                  shown=(1, 256, 1024, 1920)) -> list[tuple]:
    header = ("configuration", "GPUs", *(f"prompt {p}" for p in shown), "per output token",
              f"runtime p={prompt},o={output}", "GPU-s/request")
    if usd_per_gpu_hour is not None:
        header += ("$/1k requests",)
    rows = [header]
    for r in runtimes:
        table = r.entry["runtime_for_prompt_tokens"]
        row = (r.config.label, r.config.gpus,
               *(format_seconds(table[str(p)]) if str(p) in table else "-" for p in shown),
               format_seconds(r.entry["runtime_per_output_token"]),
               format_seconds(helm_runtime(r.entry, prompt, output)), f"{r.gpu_s(prompt, output):.4g}")
        if usd_per_gpu_hour is not None:
            row += (f"{r.gpu_s(prompt, output) / 3600 * usd_per_gpu_hour * 1000:.4g}",)
        rows.append(row)
    return rows


# The command ---------------------------------------------------------------------------------------

def add_command(sub) -> None:
    from opbench.analyze import session

    p = sub.add_parser("idealized", help="write HELM's idealized runtime of a model (its efficiency_data file's "
                                         "shape), or the same per configuration of the trade-off's frontier",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("run", help="a run: pytest bench/ --benchmark-json=FILE")
    session.model_options(p)
    p.add_argument("--name", help="HELM's name of the model (org/model; default for the zoo, e.g. meta/llama-3-8b)")
    p.add_argument("--form", choices=FORMS, default="idealized",
                   help="idealized (HELM's inference_idealized_runtimes.json prompt lengths; default) or denoised "
                        "(inference_denoised_runtimes.json: lengths 1..1536 and an overhead)")
    p.add_argument("--overhead", type=float, default=0.0, metavar="SECONDS",
                   help="denoised form: a fixed cost per request (default 0: opbench composes device time only)")
    p.add_argument("--decode-context", type=int, default=1024,
                   help="context of the decode step that prices an output token (default 1024)")
    p.add_argument("--cost-aware", action="store_true", help="multiply by the GPUs used (the tp degree)")
    p.add_argument("-o", "--output", help="write the JSON here (default: print it)")
    f = p.add_argument_group("per configuration (--frontier)")
    f.add_argument("--frontier", action="store_true", help="the table for every configuration on the trade-off's "
                                                           "frontier at --prompt and --output-tokens, with its cost")
    f.add_argument("--prompt", type=int, default=1024, help="prompt tokens of the trade-off (default 1024)")
    f.add_argument("--output-tokens", type=int, default=256, help="output tokens of the trade-off (default 256)")
    f.add_argument("--gpu-hour-usd", type=float, help="price of one GPU-hour, for dollars per 1k requests")
    f.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU (default: the run's GPU, else 80)")
    p.set_defaults(func=_command)


def _command(args) -> int:
    from opbench.analyze import session

    run, composer = session.composer_from_args(args)
    model = get_model(args.model)
    name = helm_name(model, args.name)
    if args.frontier:
        runtimes = frontier_runtimes(composer, model, args.prompt, args.output_tokens,
                                     gpu_memory(run, args.gpu_memory_gib), args.decode_context)
        data = {"model": name, "prompt_tokens": args.prompt, "output_tokens": args.output_tokens,
                "note": "per configuration of the trade-off's frontier; runtime: a request's latency in HELM's shape; "
                        "cost_aware_gpu_s: its share of the GPUs (runtime x GPUs / batch)",
                "configurations": [{"label": r.config.label, "gpus": r.config.gpus, "batch": r.config.batch,
                                    "runtime": {name: r.entry}, "cost_aware_gpu_s": {name: r.cost_entry()},
                                    "gpu_s_per_request": r.gpu_s(args.prompt, args.output_tokens),
                                    **({"usd_per_request": r.gpu_s(args.prompt, args.output_tokens) / 3600
                                        * args.gpu_hour_usd} if args.gpu_hour_usd is not None else {})}
                                   for r in runtimes]}
        if not args.output:
            print(f"HELM's idealized runtime per configuration of the frontier ({model.name} as {name}; prompt "
                  f"{args.prompt}, output {args.output_tokens}; composed from {run.path}, see `opbench tradeoff` "
                  "for what is modeled):")
            print("\n".join(table_lines(frontier_rows(runtimes, args.prompt, args.output_tokens, args.gpu_hour_usd),
                                        indent="  ")))
            return 0
    else:
        data = {name: helm_entry(composer, model, tp=args.tp, dtype=args.dtype, decode_context=args.decode_context,
                                 form=args.form, overhead_s=args.overhead, cost_aware=args.cost_aware,
                                 weights=args.weights)}
    text = json.dumps(data, indent=1)
    if args.output:
        write_file(args.output, text + "\n")
        print(f"opbench idealized: wrote {args.output} ({name})")
    else:
        print(text)
    return 0
