"""`opbench tradeoff RUN --model M`: responsiveness against resources over deployment configurations.

For inference, every configuration (tensor-parallel degree, batch, dtype, execution mode) is composed
from the run at a prompt of P tokens and an output of O tokens: time to first token (TTFT), time per
output token (TPOT), tokens/s per GPU, GPU-seconds and joules per 1,000 output tokens, memory per GPU
and whether it fits. The Pareto frontier is end-to-end latency (TTFT + (O - 1) x TPOT) against
GPU-seconds per 1,000 output tokens; with an SLO the cheapest configuration that meets it is named.
`--train` does the same for training configurations (opbench.analyze.training).

The serving model here is static batching: a batch of B requests is prefilled together, then decoded
together, each decode step at the batch's mean context. `opbench simulate` models continuous batching.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from opbench.analyze.compose import Breakdown, Composer, SOURCES
from opbench.analyze.estimate import memory
from opbench.analyze.pareto import Choice, Slo, SloError, choose, pareto_front, parse_slo
from opbench.analyze.runs import Run, device_label, used_gpu
from opbench.ops.dtypes import DTYPES
from opbench.spec.models import ModelConfig, get_model
from opbench.spec.plan import plan, shard
from opbench.spec.workload import PlanError, Workload
from opbench.text import format_seconds, table_lines

DEFAULT_GPU_MEMORY_BYTES = 80 * 2**30  # an 80 GB card, where the run does not say (a CPU run)
USABLE_MEMORY = 0.9  # as fewest_gpus: the rest is left to the framework's workspace and fragmentation
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
INFERENCE_SLO = ("ttft", "tpot", "e2e")


@dataclass(frozen=True)
class GpuMemory:
    bytes: int
    source: str  # where the figure comes from: the run's GPU, the command line, or an assumption

    @property
    def usable_bytes(self) -> float:
        return USABLE_MEMORY * self.bytes


def gpu_memory(run: Run, override_gib: float | None) -> GpuMemory:
    if override_gib:
        return GpuMemory(int(override_gib * 2**30), "given")
    measured = (used_gpu(run.machine_info) or {}).get("memory_total_bytes")
    if measured:
        return GpuMemory(int(measured), f"the run's GPU ({device_label(run.machine_info, run.device)})")
    return GpuMemory(DEFAULT_GPU_MEMORY_BYTES, "assumed: the run records no GPU memory")


def tp_degrees(model: ModelConfig, max_tp: int) -> list[int]:
    """Tensor-parallel degrees up to max_tp that shard the model's heads and MLP evenly."""
    out = []
    for tp in range(1, max_tp + 1):
        try:
            shard(model, tp)
        except PlanError:
            continue
        out.append(tp)
    return out


def measured_dtypes(composer: Composer) -> list[str]:
    """The dtypes the run timed GEMMs in: the weight formats a configuration can be composed in."""
    found = {m.dtype for m in composer.measurements if m.op == "gemm"}
    return [d for d in DTYPES if d in found]


def has_host_times(composer: Composer) -> bool:
    """Whether eager composition differs from graph composition: only calls with a host launch time do."""
    return any(m.host_s is not None for m in composer.measurements)


def _sources(*breakdowns: Breakdown) -> dict[str, int]:
    out = dict.fromkeys(SOURCES, 0)
    for b in breakdowns:
        for k, v in b.sources().items():
            out[k] += v
    return out


# Inference -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InferenceConfig:
    tp: int
    batch: int  # requests prefilled and decoded together
    dtype: str  # weights, activations and KV cache (one dtype until storage formats are a workload field)
    mode: str  # graph (CUDA graphs: device time) or eager (at least the host launch time per call)

    @property
    def gpus(self) -> int:
        return self.tp

    @property
    def label(self) -> str:
        return f"tp={self.tp} b={self.batch} {self.dtype} {self.mode}"


@dataclass(frozen=True)
class InferencePoint:
    config: InferenceConfig
    prompt_tokens: int
    output_tokens: int
    memory_per_gpu_bytes: int
    fits: bool
    ttft_s: float | None = None  # None where the configuration does not fit (not composed)
    tpot_s: float | None = None
    energy_j_per_1k_tokens: float | None = None  # all GPUs; None unless every call's energy was measured
    sources: dict[str, int] | None = None  # calls of the prefill and decode plans by source

    @property
    def e2e_s(self) -> float:
        """One request, first token to last: TTFT + (O - 1) x TPOT."""
        return self.ttft_s + (self.output_tokens - 1) * self.tpot_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.config.batch * self.output_tokens / self.e2e_s / self.config.gpus

    @property
    def gpu_s_per_1k_tokens(self) -> float:
        """GPU time the batch holds, prefill included, per 1,000 output tokens."""
        return 1000 * self.config.gpus * self.e2e_s / (self.config.batch * self.output_tokens)

    def figures(self) -> dict[str, float]:
        return {"ttft": self.ttft_s, "tpot": self.tpot_s, "e2e": self.e2e_s}

    def to_dict(self, gpu_hour_usd: float | None = None) -> dict:
        out = {"config": asdict(self.config), "label": self.config.label, "gpus": self.config.gpus,
               "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
               "memory_per_gpu_bytes": self.memory_per_gpu_bytes, "fits": self.fits,
               "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": None, "tokens_per_s_per_gpu": None,
               "gpu_s_per_1k_tokens": None, "energy_j_per_1k_tokens": self.energy_j_per_1k_tokens,
               "sources": self.sources}
        if self.ttft_s is not None:
            out.update(e2e_s=self.e2e_s, tokens_per_s_per_gpu=self.tokens_per_s_per_gpu,
                       gpu_s_per_1k_tokens=self.gpu_s_per_1k_tokens)
            if gpu_hour_usd is not None:
                out["usd_per_1m_tokens"] = self.gpu_s_per_1k_tokens * 1000 / 3600 * gpu_hour_usd
        return out


def prefill_workload(c: InferenceConfig, prompt: int) -> Workload:
    return Workload("prefill", c.batch, prompt, tp=c.tp, dtype=c.dtype)


def decode_workload(c: InferenceConfig, prompt: int, output: int) -> Workload:
    """The batch's decode steps at their mean context: contexts from prompt + 1 (the second output
    token) to prompt + output - 1 (the last), spread evenly, average the (O - 1) steps."""
    last = prompt + max(output - 1, 1)
    return Workload("decode", c.batch, last, tp=c.tp, dtype=c.dtype, min_context=min(prompt + 1, last))


def memory_workload(c: InferenceConfig, prompt: int, output: int) -> Workload:
    """What must be held at the end: every sequence's KV cache at prompt + output tokens."""
    return Workload("decode", c.batch, prompt + output, tp=c.tp, dtype=c.dtype)


def evaluate_inference(composers: dict[str, Composer], model: ModelConfig, config: InferenceConfig,
                       prompt: int, output: int, mem: GpuMemory) -> InferencePoint:
    need = memory(model, memory_workload(config, prompt, output)).total_bytes
    if need > mem.usable_bytes:
        return InferencePoint(config, prompt, output, need, False)
    composer = composers[config.mode]
    prefill = composer.compose(plan(model, prefill_workload(config, prompt)))
    decode = composer.compose(plan(model, decode_workload(config, prompt, output)))
    energy = None
    if prefill.energy_j is not None and decode.energy_j is not None:  # one GPU's joules, times the GPUs
        batch_j = config.gpus * (prefill.energy_j + (output - 1) * decode.energy_j)
        energy = 1000 * batch_j / (config.batch * output)
    return InferencePoint(config, prompt, output, need, True, prefill.total_s, decode.total_s, energy,
                          _sources(prefill, decode))


@dataclass(frozen=True)
class InferenceTradeoff:
    model: ModelConfig
    prompt_tokens: int
    output_tokens: int
    gpu: GpuMemory
    points: tuple[InferencePoint, ...]
    eager_same: bool  # eager composition equals graph composition here (no host times): eager left out

    @property
    def fitting(self) -> list[InferencePoint]:
        return [p for p in self.points if p.fits]

    @property
    def frontier(self) -> list[InferencePoint]:
        return pareto_front(self.fitting, lambda p: p.e2e_s, lambda p: p.gpu_s_per_1k_tokens)

    def choose(self, slo: Slo) -> Choice[InferencePoint]:
        return choose(self.fitting, slo, InferencePoint.figures, lambda p: p.gpu_s_per_1k_tokens)

    def sources(self) -> dict[str, int]:
        out = dict.fromkeys(SOURCES, 0)
        for p in self.fitting:
            for k, v in (p.sources or {}).items():
                out[k] += v
        return out


def inference_tradeoff(composer: Composer, model: ModelConfig, prompt: int, output: int, mem: GpuMemory, *,
                       max_tp: int = 8, max_batch: int = BATCHES[-1], dtypes: Sequence[str] | None = None,
                       modes: Sequence[str] = ("graph", "eager")) -> InferenceTradeoff:
    """Every configuration composed (or found not to fit). Batches double from 1 up to max_batch and
    stop at the first that does not fit, for each degree and dtype."""
    if prompt + output > model.max_seq_len:
        raise PlanError(f"prompt {prompt} + output {output} tokens exceed {model.name}'s max_seq_len "
                        f"{model.max_seq_len}")
    composers = {m: composer if m == composer.mode else
                 Composer(composer.measurements, composer.policy, composer.fits.values(), composer.fabric.name, m)
                 for m in modes}
    eager_same = "eager" in composers and "graph" in composers and not has_host_times(composer)
    if eager_same:
        composers.pop("eager")
    points = []
    for dtype in dtypes or measured_dtypes(composer):
        for tp in tp_degrees(model, max_tp):
            for batch in (b for b in BATCHES if b <= max_batch):
                configs = [InferenceConfig(tp, batch, dtype, m) for m in composers]
                evaluated = [evaluate_inference(composers, model, c, prompt, output, mem) for c in configs]
                points += evaluated
                if not any(p.fits for p in evaluated):
                    break  # memory grows with the batch: no larger batch fits either
    return InferenceTradeoff(model, prompt, output, mem, tuple(points), eager_same)


# Text and JSON -----------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def _source_cell(sources: dict[str, int] | None) -> str:
    if not sources:
        return "-"
    return ", ".join(f"{n} {k}" for k, n in sources.items() if n)


def provenance_kind(sources: dict[str, int]) -> str:
    """'measured' when every call composed was measured, 'partly modeled' when some were, else 'modeled'."""
    total = sum(sources.values())
    if total and sources.get("measured") == total:
        return "measured"
    return "partly modeled" if sources.get("measured") else "modeled"


def provenance_lines(run: Run, composer: Composer, sources: dict[str, int]) -> list[str]:
    """What the figures rest on, in words: measured, interpolated or modeled, and from which device."""
    total = sum(sources.values())
    device = device_label(run.machine_info, run.device)
    head = f"from {run.path} ({device}), policy {composer.policy}"
    kind = provenance_kind(sources)
    if kind == "measured":
        return [head, "measured: every op call composed was measured by this run"]
    share = ", ".join(f"{n} {k}" for k, n in sources.items() if n)
    lines = [head, f"{kind.upper()}: of {total} op calls composed, {share}. Modeled calls are a roofline "
                   f"t = max(FLOPs / F, bytes / B) with F and B fitted to this run's measured cases of the same "
                   f"op; read the figures as a model of {device}, not a measurement of these shapes."]
    if composer.fits:
        lines.append("collectives: alpha-beta fits of a measured collectives run")
    else:
        lines.append(f"collectives (tp > 1): modeled from the fabric profile {composer.fabric.name} "
                     f"({composer.fabric.about})")
    return lines


def inference_rows(points: Iterable[InferencePoint], gpu_hour_usd: float | None = None) -> list[tuple]:
    header = ("configuration", "GPUs", "TTFT", "TPOT", "e2e", "tok/s/GPU", "GPU-s/1k tok", "J/1k tok",
              "mem/GPU", "fits")
    if gpu_hour_usd is not None:
        header += ("$/1M tok",)
    rows = [header]
    for p in points:
        if p.ttft_s is None:
            row = (p.config.label, p.config.gpus, "-", "-", "-", "-", "-", "-", _gib(p.memory_per_gpu_bytes), "no")
        else:
            row = (p.config.label, p.config.gpus, format_seconds(p.ttft_s), format_seconds(p.tpot_s),
                   format_seconds(p.e2e_s), f"{p.tokens_per_s_per_gpu:.4g}", f"{p.gpu_s_per_1k_tokens:.4g}",
                   "-" if p.energy_j_per_1k_tokens is None else f"{p.energy_j_per_1k_tokens:.4g}",
                   _gib(p.memory_per_gpu_bytes), "yes")
        if gpu_hour_usd is not None:
            row += ("-" if p.ttft_s is None else f"{p.gpu_s_per_1k_tokens * 1000 / 3600 * gpu_hour_usd:.4g}",)
        rows.append(row)
    return rows


def choice_lines(choice: Choice, label, figures, cost_text) -> list[str]:
    """The SLO's verdict in words: the choice, the runner-up and the constraint that binds."""
    lines = [f"SLO {choice.slo}:"]
    if choice.best is None:
        if choice.binding is None:
            return lines + ["  no configuration fits in memory, so none meets it"]
        f = figures(choice.closest)
        got = ", ".join(f"{k} {format_seconds(f[k])}" for k in choice.slo.limits_s)
        return lines + [f"  choice: none; no configuration that fits meets it. {choice.binding} binds: the closest, "
                        f"{label(choice.closest)} ({got}; {cost_text(choice.closest)}), is at "
                        f"{choice.binding_use:.3g}x its {choice.binding} limit"]
    f = figures(choice.best)
    got = ", ".join(f"{k} {format_seconds(f[k])}" for k in choice.slo.limits_s)
    lines.append(f"  choice: {label(choice.best)} ({got}; {cost_text(choice.best)})")
    if choice.runner_up is not None:
        g = figures(choice.runner_up)
        lines.append(f"  runner-up: {label(choice.runner_up)} "
                     f"({', '.join(f'{k} {format_seconds(g[k])}' for k in choice.slo.limits_s)}; "
                     f"{cost_text(choice.runner_up)})")
    else:
        lines.append("  runner-up: none (no other configuration meets it)")
    why = f"  binding: {choice.binding} (the choice uses {choice.binding_use:.0%} of its limit)"
    if choice.cheaper_fail:
        why += ("; every cheaper configuration fails " +
                ", ".join(f"{k} ({n})" for k, n in choice.cheaper_fail.items()))
    return lines + [why]


def choice_dict(choice: Choice, to_dict) -> dict:
    def one(item):
        return to_dict(item) if item is not None else None

    return {"slo_s": choice.slo.limits_s, "choice": one(choice.best), "runner_up": one(choice.runner_up),
            "binding": choice.binding, "binding_use": choice.binding_use, "cheaper_fail": choice.cheaper_fail,
            "closest_if_none": one(choice.closest)}


def inference_assumptions(t: InferenceTradeoff) -> list[str]:
    out = [f"GPU memory {_gib(t.gpu.bytes)} ({t.gpu.source}), {USABLE_MEMORY:.0%} usable; memory per GPU is the "
           f"weights plus every sequence's KV cache at {t.prompt_tokens + t.output_tokens} tokens, in the "
           "configuration's dtype (prefill activations and workspace are not counted)",
           "static batching: a batch's prompts are prefilled together (TTFT), then decoded together, each step "
           "priced at the batch's mean context (TPOT); e2e = TTFT + (O - 1) x TPOT",
           "GPU-s per 1k output tokens counts the prefill: GPUs x e2e / (batch x O) x 1000"]
    if t.eager_same:
        out.append("eager execution is left out: with no host launch time recorded (a CPU run) it equals graph")
    return out


def inference_text(t: InferenceTradeoff, run: Run, composer: Composer, slo: Slo | None, *, show_all: bool,
                   gpu_hour_usd: float | None) -> list[str]:
    lines = [f"opbench tradeoff: {t.model.name}, prompt {t.prompt_tokens} tokens, output {t.output_tokens} tokens"]
    lines += ["  " + s for s in provenance_lines(run, composer, t.sources())]
    lines += ["  assumed: " + s for s in inference_assumptions(t)]
    fit = t.fitting
    lines.append(f"  {len(t.points)} configurations: {len(fit)} fit, {len(t.points) - len(fit)} do not "
                 "(never proposed)")
    front = t.frontier
    lines.append(f"Pareto frontier, end-to-end latency against GPU-seconds per 1k output tokens "
                 f"({len(front)} configurations; modeled figures where the provenance above says so):")
    lines += table_lines(inference_rows(front, gpu_hour_usd), indent="  ")
    if show_all:
        lines.append("every configuration:")
        lines += table_lines(inference_rows(t.points, gpu_hour_usd), indent="  ")
    if slo is not None:
        lines += choice_lines(t.choose(slo), lambda p: p.config.label, InferencePoint.figures,
                              lambda p: f"{p.gpu_s_per_1k_tokens:.4g} GPU-s/1k tok, {_gib(p.memory_per_gpu_bytes)}"
                                        f"/GPU")
    return lines


def inference_json(t: InferenceTradeoff, run: Run, composer: Composer, slo: Slo | None,
                   gpu_hour_usd: float | None) -> dict:
    return {"kind": "inference", "model": t.model.name, "run": str(run.path),
            "device": device_label(run.machine_info, run.device), "prompt_tokens": t.prompt_tokens,
            "output_tokens": t.output_tokens, "provenance": provenance_lines(run, composer, t.sources()),
            "sources": t.sources(), "assumptions": inference_assumptions(t),
            "gpu_memory_bytes": t.gpu.bytes,
            "configurations": [p.to_dict(gpu_hour_usd) for p in t.points],
            "frontier": [p.config.label for p in t.frontier],
            "slo": choice_dict(t.choose(slo), lambda p: p.to_dict(gpu_hour_usd)) if slo else None}


# The command ---------------------------------------------------------------------------------------

def add_command(sub) -> None:
    from opbench.analyze.alphabeta import PROFILES as FABRICS

    p = sub.add_parser("tradeoff", help="deployment configurations of a model composed from a run: latency "
                                        "against cost, the Pareto frontier, the cheapest that meets an SLO",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("run", help="a run: pytest bench/ --benchmark-json=FILE")
    p.add_argument("--model", required=True, help="a zoo name or a Hugging Face config.json path")
    p.add_argument("--prompt", type=int, default=1024, help="inference: prompt tokens (default 1024)")
    p.add_argument("--output", type=int, default=256, help="inference: output tokens (default 256)")
    p.add_argument("--slo", help="inference: ttft=DUR,tpot=DUR[,e2e=DUR] (e.g. ttft=500ms,tpot=50ms); "
                                 "training: use --step-time")
    p.add_argument("--max-tp", type=int, default=8, help="largest tensor-parallel degree (default 8, one node)")
    p.add_argument("--max-batch", type=int, default=BATCHES[-1], help="inference: largest batch (default 1024)")
    p.add_argument("--dtype", dest="dtypes", action="append",
                   help="only these dtypes (default: every dtype the run timed GEMMs in); repeatable")
    p.add_argument("--mode", dest="modes", action="append", choices=("graph", "eager"),
                   help="only these execution modes (default both); repeatable")
    p.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU (default: the run's GPU, else 80)")
    p.add_argument("--gpu-hour-usd", type=float, help="price of one GPU-hour, for a dollar column")
    p.add_argument("--all", action="store_true", help="print every configuration, not only the frontier")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--policy", default="fastest", help="backends to compose from (default fastest)")
    p.add_argument("--collectives", help="a collectives run whose alpha-beta fits price the collectives")
    p.add_argument("--fabric", default="h100-nvlink-ring", choices=sorted(FABRICS),
                   help="fabric profile for collectives no fit covers (default h100-nvlink-ring)")
    t = p.add_argument_group("training (--train)")
    t.add_argument("--train", action="store_true", help="training configurations: ZeRO stages, offload, "
                                                        "recomputation, tensor and data parallelism")
    t.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step (default 1024)")
    t.add_argument("--seq", type=int, default=4096, help="training sequence length (default 4096)")
    t.add_argument("--max-gpus", type=int, default=64, help="most GPUs a configuration may use (default 64)")
    t.add_argument("--step-time", help="SLO on the step time, e.g. 30s")
    t.add_argument("--peak-tflops", type=float, help="the GPU's dense TFLOP/s for MFU (default: its datasheet, "
                                                     "else the run's measured matmul peak)")
    t.add_argument("--host-gbps", type=float, help="host-device bandwidth for offload (default: measured, else "
                                                   "the datasheet's, else 25)")
    p.set_defaults(func=_command, mode="graph", fuse=False)  # the first composer's mode; the others derive from it


def _composer(args) -> tuple[Run, Composer]:
    from opbench.analyze import session  # the one place a run and its collective fits become a Composer

    return session.composer_from_args(args)


def _command(args) -> int:
    modes = tuple(dict.fromkeys(args.modes or ("graph", "eager")))
    run, composer = _composer(args)
    model = get_model(args.model)
    mem = gpu_memory(run, args.gpu_memory_gib)
    if args.train:
        from opbench.analyze import training
        if args.slo:
            raise SloError("--slo bounds inference latencies; a training step's SLO is --step-time")
        return training.command(args, run, composer, model, mem)
    slo = parse_slo(args.slo, INFERENCE_SLO) if args.slo else None
    t = inference_tradeoff(composer, model, args.prompt, args.output, mem, max_tp=args.max_tp,
                           max_batch=args.max_batch, dtypes=args.dtypes, modes=modes)
    if args.json:
        json.dump(inference_json(t, run, composer, slo, args.gpu_hour_usd), sys.stdout, indent=1)
        print()
    else:
        print("\n".join(inference_text(t, run, composer, slo, show_all=args.all, gpu_hour_usd=args.gpu_hour_usd)))
    return 0
