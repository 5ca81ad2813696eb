"""Training configurations: ZeRO stages 0-3, optimizer offload to the CPU, activation recomputation,
tensor and data parallelism; each one's step time, memory per GPU and MFU for a model and a global batch.

Memory follows the ZeRO paper (Rajbhandari et al. 2020, arXiv 1910.02054, section 3 and figure 1):
with mixed-precision Adam, Psi parameters per tensor-parallel shard and N_d data-parallel replicas,
  stage 0 (plain data parallelism)  2 Psi + 2 Psi + 12 Psi
  stage 1 (optimizer states)        2 Psi + 2 Psi + 12 Psi / N_d
  stage 2 (+ gradients)             2 Psi + (2 Psi + 12 Psi) / N_d
  stage 3 (+ parameters)            (2 Psi + 2 Psi + 12 Psi) / N_d
bytes of parameters, gradients and optimizer state (fp32 master weights, momentum and variance).
Activations: opbench.analyze.estimate.memory (Korthikanti et al. 2022), or with full recomputation
only each layer's input (2 s b h bytes) plus one layer's working set while it is recomputed.

Time: one micro-batch's forward and backward are composed from the run (opbench.analyze.compose);
the data-parallel collectives come from the collective fits or the fabric profile:
  stage 0   all-reduce of the gradients once a step, hidden behind the last backward where it fits
  stage 1   reduce-scatter of the gradients once a step (hidden likewise), all-gather of the updated
            parameters after the optimizer step
  stage 2   reduce-scatter every micro-batch, hidden behind its backward; all-gather after the step
  stage 3   every layer's parameters all-gathered before its forward and again before its backward
            (and before its recomputation), its gradients reduce-scattered after its backward, each
            overlapped with a layer's compute (prefetch): a layer costs the larger of the two
The optimizer step runs on each GPU's shard (stage >= 1) or, offloaded, on the CPU: gradients down
and parameters up over the host link, the step at the host's memory bandwidth, nothing overlapped.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache

from opbench.analyze.compose import Breakdown, Composer
from opbench.analyze.estimate import memory, model_flops_per_token, trained_params
from opbench.analyze.pareto import Choice, Slo, choose, pareto_front, parse_seconds
from opbench.analyze.runs import Run, device_label, used_gpu
from opbench.analyze.tradeoff import (GpuMemory, _gib, choice_dict, choice_lines, measured_dtypes,
                                      provenance_lines, tp_degrees)
from opbench.ops import get_family
from opbench.ops.dtypes import DTYPES, get_dtype
from opbench.ops.tokenwise import ParamsShape
from opbench.spec.models import ModelConfig
from opbench.spec.plan import plan
from opbench.spec.workload import PlanError, Workload
from opbench.text import format_seconds, table_lines

ZERO_STAGES = (0, 1, 2, 3)
ADAM_STATE_BYTES = 12  # per parameter: fp32 master weight, momentum and variance
GRAD_BYTES = 2  # per parameter: 16-bit gradients
# Offloaded optimizer steps run in the host's memory: about 300 GB/s achieved on a two-socket DDR5
# server, shared by its 8 GPUs. An assumption, said so in the output; no case measures host memory.
HOST_MEMORY_GBPS_PER_GPU = 40.0
DEFAULT_HOST_LINK_GBPS = 25.0  # PCIe 4.0 x16 as achieved, where neither a measurement nor a datasheet says
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class ZeroMemory:
    """Bytes per GPU (host_bytes: per GPU, in the host's memory)."""
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    gathered_bytes: int = 0  # stage 3: two layers' full parameters in flight (the current and the prefetched)
    host_bytes: int = 0  # offloaded optimizer state

    @property
    def model_states_bytes(self) -> int:
        """What the ZeRO paper's formula counts: parameters, gradients and optimizer state."""
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_states_bytes + self.activations_bytes + self.gathered_bytes


def zero_memory(model: ModelConfig, w: Workload, stage: int, dp: int, *, offload: bool = False,
                recompute: bool = False) -> ZeroMemory:
    """Memory per GPU of one training configuration; w is the micro-batch's workload (its tp, dtype)."""
    if stage not in ZERO_STAGES:
        raise PlanError(f"ZeRO stage {stage}: known stages are {', '.join(map(str, ZERO_STAGES))}")
    psi = trained_params(model, w)  # the parameters of one tensor-parallel shard
    params, grads, states = DTYPES[w.dtype].bytes * psi, GRAD_BYTES * psi, ADAM_STATE_BYTES * psi
    if stage >= 1:
        states //= dp
    if stage >= 2:
        grads //= dp
    if stage >= 3:
        params //= dp
    host = 0
    if offload:
        host, states = states, 0
    if recompute:  # each layer's input kept, and one layer's activations while its forward runs again
        sbh = w.seq_len * w.batch * model.hidden
        one_layer = memory(model, w).activations_bytes // model.layers
        activations = model.layers * 2 * sbh + one_layer
    else:
        activations = memory(model, w).activations_bytes
    gathered = 2 * DTYPES[w.dtype].bytes * (model.params_per_layer // w.tp) if stage == 3 and dp > 1 else 0
    return ZeroMemory(params, grads, states, activations, gathered, host)


@dataclass(frozen=True)
class TrainConfig:
    tp: int
    dp: int
    zero: int  # 0: plain data parallelism; 1, 2, 3: ZeRO stages
    offload: bool  # optimizer state and step on the CPU
    recompute: bool  # full activation recomputation
    micro_batch: int  # sequences per GPU per forward-backward

    @property
    def gpus(self) -> int:
        return self.tp * self.dp

    @property
    def label(self) -> str:
        extra = "".join((" offload" if self.offload else "", " recompute" if self.recompute else ""))
        return f"zero-{self.zero} tp={self.tp} dp={self.dp} mb={self.micro_batch}{extra}"


@dataclass(frozen=True)
class TrainPoint:
    config: TrainConfig
    global_batch: int  # sequences per optimizer step
    seq_len: int
    memory: ZeroMemory
    fits: bool
    step_s: float | None = None
    compute_s: float | None = None  # forward and backward of every micro-batch
    comm_exposed_s: float | None = None  # data-parallel communication not hidden behind compute
    optimizer_s: float | None = None  # the step itself, with offload transfers
    mfu: float | None = None
    sources: dict[str, int] | None = None

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.config.micro_batch * self.config.dp)

    @property
    def gpu_s_per_step(self) -> float:
        return self.config.gpus * self.step_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.global_batch * self.seq_len / self.step_s / self.config.gpus

    def figures(self) -> dict[str, float]:
        return {"step": self.step_s}

    def to_dict(self) -> dict:
        out = {"config": asdict(self.config), "label": self.config.label, "gpus": self.config.gpus,
               "grad_accum": self.grad_accum, "memory": asdict(self.memory),
               "memory_per_gpu_bytes": self.memory.total_bytes, "fits": self.fits, "step_s": self.step_s,
               "compute_s": self.compute_s, "comm_exposed_s": self.comm_exposed_s, "optimizer_s": self.optimizer_s,
               "mfu": self.mfu, "sources": self.sources}
        if self.step_s is not None:
            out.update(gpu_s_per_step=self.gpu_s_per_step, tokens_per_s_per_gpu=self.tokens_per_s_per_gpu)
        return out


@dataclass(frozen=True)
class MicroTimes:
    """One micro-batch composed, split by what each part of a step does with it."""
    fwd_layer_s: float  # one layer's forward
    bwd_layer_s: float  # one layer's dgrad, wgrad and backward calls
    model_s: float  # embedding, head, loss: forward and backward
    optimizer_params: tuple[int, ...]  # the parameter counts of the plan's AdamW calls, over the whole model
    sources: dict[str, int]


def split_micro(b: Breakdown) -> MicroTimes:
    layer_fwd = layer_bwd = model_s = 0.0
    optim: list[int] = []
    calls = b.plan.calls
    for ct, call in zip(b.calls, calls):
        if call.op == "adamw":  # run once a step, on a shard: priced apart
            optim.append(call.shape.params * call.count * (b.plan.model.layers if call.scope == "layer" else 1))
            continue
        t = ct.count * ct.time_s
        if ct.scope == "model":
            model_s += t
        elif ct.pass_ == "fwd":
            layer_fwd += t
        else:
            layer_bwd += t
    sources = {k: v for k, v in b.sources().items()}
    return MicroTimes(layer_fwd, layer_bwd, model_s, tuple(optim), sources)


@dataclass(frozen=True)
class HostLink:
    gbps: float
    source: str


def host_link(run: Run, override_gbps: float | None) -> HostLink:
    from opbench.measure.peaks import datasheet_for, measured_peaks

    if override_gbps:
        return HostLink(override_gbps, "given")
    peaks = measured_peaks(run.of_kind("peak"), run.device, device_label(run.machine_info, run.device))
    rates = [r for r in ((peaks.h2d_gbps, peaks.d2h_gbps) if peaks else ()) if r]
    if rates:
        return HostLink(min(rates), "measured (the slower direction of the run's host-device copies)")
    sheet = datasheet_for((used_gpu(run.machine_info) or {}).get("name"))
    if sheet:
        return HostLink(sheet.host_link_gbps, f"datasheet {sheet.name}")
    return HostLink(DEFAULT_HOST_LINK_GBPS, "assumed (PCIe 4.0 x16): the run measured no host-device copy")


@dataclass(frozen=True)
class Peak:
    flops_per_s: float | None
    source: str


def training_peak(run: Run, dtype: str, override_tflops: float | None) -> Peak:
    from opbench.measure.peaks import datasheet_for, measured_peaks

    if override_tflops:
        return Peak(override_tflops * 1e12, "given")
    sheet = datasheet_for((used_gpu(run.machine_info) or {}).get("name"))
    if sheet and dtype in sheet.matmul_tflops:
        return Peak(sheet.matmul_tflops[dtype] * 1e12, f"the {sheet.name} datasheet's dense {dtype}")
    peaks = measured_peaks(run.of_kind("peak"), run.device, device_label(run.machine_info, run.device))
    if peaks and dtype in peaks.matmul_tflops:
        return Peak(peaks.matmul_tflops[dtype] * 1e12, f"the run's measured {dtype} matmul peak")
    return Peak(None, "no peak: no datasheet for the device and no measured matmul peak")


class TrainingModel:
    """Prices training configurations of one model from a composer (memoized by what each part needs)."""

    def __init__(self, composer: Composer, model: ModelConfig, seq_len: int, dtype: str, link: HostLink,
                 peak: Peak):
        self.composer, self.model, self.seq_len, self.dtype = composer, model, seq_len, dtype
        self.link, self.peak = link, peak
        self.micro = lru_cache(maxsize=None)(self._micro)
        self.collective = lru_cache(maxsize=None)(composer.collective_s)

    def workload(self, tp: int, micro_batch: int) -> Workload:
        return Workload("train", micro_batch, self.seq_len, tp=tp, dtype=self.dtype)

    def _micro(self, tp: int, micro_batch: int) -> MicroTimes:
        return split_micro(self.composer.compose(plan(self.model, self.workload(tp, micro_batch))))

    def _adamw_s(self, params: int) -> float:
        return self.composer.time("adamw", ParamsShape(max(1, params)), self.dtype, "fwd")[0]

    def evaluate(self, c: TrainConfig, global_batch: int, usable_bytes: float) -> TrainPoint:
        w = self.workload(c.tp, c.micro_batch)
        mem = zero_memory(self.model, w, c.zero, c.dp, offload=c.offload, recompute=c.recompute)
        if mem.total_bytes > usable_bytes:
            return TrainPoint(c, global_batch, self.seq_len, mem, False)
        m, layers = self.micro(c.tp, c.micro_batch), self.model.layers
        accum = global_batch // (c.micro_batch * c.dp)
        bwd_layer = m.bwd_layer_s + (m.fwd_layer_s if c.recompute else 0.0)
        psi = sum(m.optimizer_params)  # this shard's parameters
        elt = DTYPES[self.dtype].bytes
        grad_bytes, param_bytes = GRAD_BYTES * psi, elt * psi
        ar = lambda op, size: self.collective(op, int(size), c.dp) if c.dp > 1 else 0.0  # noqa: E731
        backward_s = layers * bwd_layer + m.model_s / 2  # the model-scope calls split evenly: an estimate
        comm = 0.0
        if c.zero == 3:
            per_layer = self.model.params_per_layer // c.tp  # one layer's parameters on this shard
            gather, scatter = ar("allgather", elt * per_layer), ar("reducescatter", GRAD_BYTES * per_layer)
            fwd = max(m.fwd_layer_s, gather)
            bwd = max(bwd_layer, gather * (2 if c.recompute else 1) + scatter)
            rest = psi - layers * per_layer  # embeddings and head: gathered and scattered without overlap
            rest_comm = 2 * ar("allgather", elt * rest) + ar("reducescatter", GRAD_BYTES * rest)
            micro_s = layers * (fwd + bwd) + m.model_s + rest_comm
            compute = accum * (layers * (m.fwd_layer_s + bwd_layer) + m.model_s)
            comm = accum * micro_s - compute
            step_compute = compute
        else:
            step_compute = accum * (layers * (m.fwd_layer_s + bwd_layer) + m.model_s)
            if c.zero == 0:
                comm = max(0.0, ar("allreduce", grad_bytes) - backward_s)
            elif c.zero == 1:
                comm = max(0.0, ar("reducescatter", grad_bytes) - backward_s) + ar("allgather", param_bytes)
            else:  # stage 2: every micro-batch's gradients reduce-scattered behind its backward
                comm = accum * max(0.0, ar("reducescatter", grad_bytes) - backward_s) + ar("allgather", param_bytes)
        shard = psi // c.dp if c.zero >= 1 else psi
        if c.offload:  # gradients down, the step in host memory, parameters up; nothing overlapped
            link_s = (GRAD_BYTES + elt) * shard / (self.link.gbps * 1e9)
            adam_bytes = get_family("adamw").bytes(ParamsShape(shard), get_dtype("fp32"), "fwd")
            optimizer = link_s + adam_bytes / (HOST_MEMORY_GBPS_PER_GPU * 1e9)
        else:
            optimizer = self._adamw_s(shard)
        step = step_compute + comm + optimizer
        mfu = None
        if self.peak.flops_per_s:
            tokens_per_s = global_batch * self.seq_len / step
            mfu = tokens_per_s * model_flops_per_token(self.model, self.seq_len) / (self.peak.flops_per_s * c.gpus)
        return TrainPoint(c, global_batch, self.seq_len, mem, True, step, step_compute, comm, optimizer, mfu,
                          m.sources)


def _stages(dp: int) -> list[tuple[int, bool]]:
    """(ZeRO stage, offload) pairs worth pricing. Without data parallelism nothing is sharded, so the
    stages are one; only offloading changes anything there (ZeRO-Offload's single-GPU setting, stage 2)."""
    if dp == 1:
        return [(0, False), (2, True)]
    return [(0, False)] + [(z, o) for z in ZERO_STAGES[1:] for o in (False, True)]


def _powers_of_two(limit: int) -> list[int]:
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    return out


@dataclass(frozen=True)
class TrainingTradeoff:
    model: ModelConfig
    global_batch: int
    seq_len: int
    dtype: str
    gpu: GpuMemory
    link: HostLink
    peak: Peak
    points: tuple[TrainPoint, ...]

    @property
    def fitting(self) -> list[TrainPoint]:
        return [p for p in self.points if p.fits]

    @property
    def frontier(self) -> list[TrainPoint]:
        return pareto_front(self.fitting, lambda p: p.step_s, lambda p: p.gpu_s_per_step)

    def choose(self, slo: Slo) -> Choice[TrainPoint]:
        return choose(self.fitting, slo, TrainPoint.figures, lambda p: (p.gpu_s_per_step, p.config.gpus))

    def sources(self) -> dict[str, int]:
        seen: dict[tuple, dict[str, int]] = {}
        for p in self.fitting:
            seen[(p.config.tp, p.config.micro_batch)] = p.sources or {}
        out: dict[str, int] = {}
        for s in seen.values():
            for k, v in s.items():
                out[k] = out.get(k, 0) + v
        return out


def training_tradeoff(composer: Composer, model: ModelConfig, *, global_batch: int, seq_len: int, max_gpus: int,
                      gpu: GpuMemory, dtype: str, link: HostLink, peak: Peak, max_tp: int = 8) -> TrainingTradeoff:
    if seq_len > model.max_seq_len:
        raise PlanError(f"sequence length {seq_len} exceeds {model.name}'s max_seq_len {model.max_seq_len}")
    tm = TrainingModel(composer, model, seq_len, dtype, link, peak)
    points = []
    for tp in (t for t in tp_degrees(model, max_tp) if t <= max_gpus):
        for dp in _powers_of_two(max_gpus // tp):
            if global_batch % dp:
                continue
            for (zero, offload), recompute in itertools.product(_stages(dp), (False, True)):
                for mb in (b for b in MICRO_BATCHES if (global_batch // dp) % b == 0):
                    p = tm.evaluate(TrainConfig(tp, dp, zero, offload, recompute, mb), global_batch, gpu.usable_bytes)
                    points.append(p)
                    if not p.fits:
                        break  # memory grows with the micro-batch
    return TrainingTradeoff(model, global_batch, seq_len, dtype, gpu, link, peak, tuple(points))


# Text ------------------------------------------------------------------------------------------------

def train_rows(points) -> list[tuple]:
    rows = [("configuration", "GPUs", "accum", "step", "compute", "comm exposed", "optimizer", "tok/s/GPU",
             "MFU", "GPU-s/step", "mem/GPU", "states/GPU", "fits")]
    for p in points:
        if p.step_s is None:
            rows.append((p.config.label, p.config.gpus, p.grad_accum, "-", "-", "-", "-", "-", "-", "-",
                         _gib(p.memory.total_bytes), _gib(p.memory.model_states_bytes), "no"))
            continue
        rows.append((p.config.label, p.config.gpus, p.grad_accum, format_seconds(p.step_s),
                     format_seconds(p.compute_s), format_seconds(p.comm_exposed_s), format_seconds(p.optimizer_s),
                     f"{p.tokens_per_s_per_gpu:.4g}", "-" if p.mfu is None else f"{p.mfu:.1%}",
                     f"{p.gpu_s_per_step:.4g}", _gib(p.memory.total_bytes), _gib(p.memory.model_states_bytes),
                     "yes"))
    return rows


def stage_rows(t: TrainingTradeoff) -> list[tuple]:
    """Per ZeRO stage (and offload): the fewest GPUs that hold it, and its fastest configuration."""
    rows = [("stage", "fewest GPUs", "there: memory/GPU (states + activations)", "fastest within max GPUs",
             "step", "MFU", "memory/GPU")]
    for zero, offload in _stages(2):
        mine = [p for p in t.points if p.config.zero == zero and p.config.offload == offload]
        fit = [p for p in mine if p.fits]
        name = f"zero-{zero}" + (" offload" if offload else "")
        if not fit:
            least = min(mine, key=lambda p: p.memory.total_bytes, default=None)
            rows.append((name, "none fits", f"at least {_gib(least.memory.total_bytes)}" if least else "-",
                         "-", "-", "-", "-"))
            continue
        few = min(fit, key=lambda p: (p.config.gpus, p.step_s))
        fast = min(fit, key=lambda p: (p.step_s, p.config.gpus))
        rows.append((name, f"{few.config.gpus} ({few.config.label})",
                     f"{_gib(few.memory.total_bytes)} ({_gib(few.memory.model_states_bytes)} + "
                     f"{_gib(few.memory.activations_bytes + few.memory.gathered_bytes)})",
                     fast.config.label, format_seconds(fast.step_s),
                     "-" if fast.mfu is None else f"{fast.mfu:.1%}", _gib(fast.memory.total_bytes)))
    return rows


def assumptions(t: TrainingTradeoff) -> list[str]:
    return [f"GPU memory {_gib(t.gpu.bytes)} ({t.gpu.source}), 90% usable; model states by the ZeRO paper's "
            f"2 + 2 + {ADAM_STATE_BYTES} bytes per parameter (sharded per stage), activations per Korthikanti et "
            "al. with attention scores never materialised",
            f"{t.dtype} mixed precision, AdamW; global batch {t.global_batch} sequences of {t.seq_len} tokens; "
            "data-parallel degrees and micro-batches in powers of two that divide it",
            "data-parallel collectives overlap the backward pass as the stage allows (see opbench/analyze/"
            "training.py); tensor-parallel all-reduces are the plan's own calls",
            f"offload: host link {t.link.gbps:g} GB/s ({t.link.source}); the CPU's AdamW at "
            f"{HOST_MEMORY_GBPS_PER_GPU:g} GB/s of host memory per GPU (assumed); nothing overlapped",
            f"MFU: PaLM's 6N + 12 L H Q T model FLOPs per token against {t.peak.source}"]


def command(args, run: Run, composer: Composer, model: ModelConfig, gpu: GpuMemory) -> int:
    measured = measured_dtypes(composer)
    dtype = (args.dtypes or [])[0] if args.dtypes else ("bf16" if "bf16" in measured or not measured
                                                        else measured[0])
    t = training_tradeoff(composer, model, global_batch=args.global_batch, seq_len=args.seq, max_gpus=args.max_gpus,
                          gpu=gpu, dtype=dtype, link=host_link(run, args.host_gbps),
                          peak=training_peak(run, dtype, args.peak_tflops), max_tp=args.max_tp)
    slo = Slo({"step": parse_seconds(args.step_time)}) if args.step_time else None
    if args.json:
        json.dump({"kind": "training", "model": model.name, "run": str(run.path),
                   "device": device_label(run.machine_info, run.device), "global_batch": t.global_batch,
                   "seq_len": t.seq_len, "dtype": t.dtype, "max_gpus": args.max_gpus,
                   "provenance": provenance_lines(run, composer, t.sources()), "assumptions": assumptions(t),
                   "configurations": [p.to_dict() for p in t.points],
                   "frontier": [p.config.label for p in t.frontier],
                   "slo": choice_dict(t.choose(slo), TrainPoint.to_dict) if slo else None}, sys.stdout, indent=1)
        print()
        return 0
    lines = [f"opbench tradeoff --train: {model.name}, global batch {t.global_batch} x {t.seq_len} tokens, "
             f"at most {args.max_gpus} GPUs"]
    lines += ["  " + s for s in provenance_lines(run, composer, t.sources())]
    lines += ["  assumed: " + s for s in assumptions(t)]
    fit = t.fitting
    lines.append(f"  {len(t.points)} configurations: {len(fit)} fit, {len(t.points) - len(fit)} do not "
                 "(never proposed)")
    if any(p.mfu is not None and p.mfu > 1 for p in fit):
        lines.append(f"  note: MFU above 100%: the composed times rest on rates above {t.peak.source} (a peak search "
                     "on a busy CPU falls short of what its GEMMs reach); give --peak-tflops for a truer denominator")
    lines.append("ZeRO stages:")
    lines += table_lines(stage_rows(t), indent="  ")
    front = t.frontier
    lines.append(f"Pareto frontier, step time against GPU-seconds per step ({len(front)} configurations):")
    lines += table_lines(train_rows(front), indent="  ")
    if args.all:
        lines.append("every configuration:")
        lines += table_lines(train_rows(t.points), indent="  ")
    if slo is not None:
        lines += choice_lines(t.choose(slo), lambda p: p.config.label, TrainPoint.figures,
                              lambda p: f"{p.config.gpus} GPUs, {p.gpu_s_per_step:.4g} GPU-s/step, "
                                        f"{_gib(p.memory.total_bytes)}/GPU")
    print("\n".join(lines))
    return 0
