"""End-to-end estimates from composed breakdowns: latency, throughput, MFU, memory, GPU count, cost,
and the idealized runtime in the HELM form."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from opbench.analyze.compose import Breakdown, CallTime, Composer
from opbench.ops.dtypes import DTYPES, WEIGHT_FORMATS
from opbench.spec.models import ModelConfig
from opbench.spec.workload import PlanError, Workload
from opbench.spec.plan import layer_params_per_gpu, plan

HELM_PROMPT_TOKENS = (1, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048)

# collective_s(op, size_bytes, world) -> seconds: a measured fit or a fabric profile.
CollectiveTime = Callable[[str, int, int], float]


@dataclass(frozen=True)
class TrainOptions:
    recompute: bool = False  # full activation recomputation: every layer's forward runs twice
    dp: int = 1  # data-parallel replicas whose gradients are all-reduced every step
    overlap: bool = True  # gradient all-reduce hidden behind the backward pass where it fits


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""
    weights_bytes: int
    kv_cache_bytes: int
    activations_bytes: int
    grads_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.kv_cache_bytes + self.activations_bytes + self.grads_bytes
                + self.optimizer_bytes)


def memory(model: ModelConfig, w: Workload, recompute: bool = False) -> Memory:
    """Weights at the workload dtype's storage bits (a mixture of experts: every expert's, those of
    the GPU's ep share under expert parallelism); KV cache of batch x length (kv_cache_bytes); in
    training bf16 gradients, fp32 AdamW state with fp32 master weights (12 B/param), and
    stored activations per Korthikanti et al. 2022 (arXiv 2205.05198) with attention scores never
    materialised: s*b*h*(10 + 24/tp) bytes per layer, or with full recomputation each layer's
    input alone, 2*s*b*h, plus the full set of the one layer whose forward is being recomputed.
    With a weight format (w.weights) the decoder layers' linear weights are stored in it, packed, with
    their scales and zeros; embeddings, LM head and norms stay in the workload dtype."""
    dtype = DTYPES[w.dtype]
    tp = w.tp
    weights = dtype.bytes_of(model.params) // tp
    if w.weights:
        weights = quantized_weight_bytes(model, w)
    if model.moe and w.ep > 1:
        layers = sum(layer_params_per_gpu(model, w, model.moe_layer(i)) for i in range(model.layers))
        weights = dtype.bytes_of(layers + model.embedding_params // tp)
    kv = kv_cache_bytes(model, w)
    if not w.training:
        return Memory(weights, kv, 0, 0, 0)
    tokens_hidden = w.seq_len * w.batch * model.hidden
    one_layer = int(tokens_hidden * (10 + 24 / tp))
    activations = model.layers * 2 * tokens_hidden + one_layer if recompute else model.layers * one_layer
    trained = trained_params(model, w)
    return Memory(weights, 0, activations, 2 * trained, 12 * trained)


def linear_weights(model: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of each linear weight of a dense decoder layer: qkv, o, the MLP's (an MLA attention's
    projections counted as one weight of its parameters over the hidden size)."""
    h = model.hidden
    if model.mla:
        attention = [(model.attention_params // h, h)]
    else:
        attention = [(model.heads * model.head_dim + model.kv_heads * (model.head_dim + model.value_dim), h),
                     (h, model.heads * model.value_dim)]
    up = (2 if model.gated else 1) * model.ffn_hidden
    return attention + [(up, h), (h, model.ffn_hidden)]


def quantized_weight_bytes(model: ModelConfig, w: Workload) -> int:
    """Weights per GPU with the decoder layers' linear weights in the workload's weight format (packed
    values, scales and zeros at their bits, sharded by tp) and every other weight in the workload dtype."""
    if model.moe:
        raise PlanError(f"w={w.weights}: quantized expert weights are not planned yet ({model.name} is a mixture "
                        "of experts)")
    fmt, plain = WEIGHT_FORMATS[w.weights], DTYPES[w.dtype]
    pairs = linear_weights(model)
    quantized = model.layers * sum(fmt.weight_bytes(n, k) for n, k in pairs)
    rest = model.params - model.layers * sum(n * k for n, k in pairs)
    return (quantized + plain.bytes_of(rest)) // w.tp


def kv_cache_elements_per_token_per_gpu(model: ModelConfig, tp: int) -> int:
    """Elements one GPU caches per token and layer: its share of the kv heads' K and V (a kv head
    fewer GPUs than tp replicated), or MLA's whole latent and rotary key, which every GPU keeps."""
    if model.mla:
        return model.kv_cache_elements_per_token
    return model.kv_cache_elements_per_token * max(1, model.kv_heads // tp) // model.kv_heads


def kv_cache_bytes(model: ModelConfig, w: Workload) -> int:
    """The KV cache one GPU holds for the batch: every layer's elements per token (MLA: 512 + 64 in
    DeepSeek-V3) at the KV dtype's bytes (fp8: one; else the activations'), over the batch's contexts
    (spread from min_context to seq_len when set), each rounded up to whole pages when paged."""
    kv_dtype = DTYPES[w.kv_dtype] if w.kv_dtype else DTYPES[w.dtype].activation
    if w.min_context and w.batch > 1:
        span = w.seq_len - w.min_context
        lens = [w.min_context + span * i // (w.batch - 1) for i in range(w.batch)]
    else:
        lens = [w.seq_len] * w.batch
    if w.paged:
        lens = [-(-n // w.paged) * w.paged for n in lens]
    per_token = model.layers * kv_cache_elements_per_token_per_gpu(model, w.tp)
    return kv_dtype.bytes_of(per_token * sum(lens))


def batch_capacity(model: ModelConfig, w: Workload, gpu_memory_bytes: int, usable: float = 0.9) -> int:
    """The most sequences of the workload's context one GPU serves beside its weights (0: none)."""
    one = memory(model, replace(w, batch=1, min_context=0))
    free = usable * gpu_memory_bytes - one.weights_bytes
    return max(0, int(free // one.kv_cache_bytes)) if one.kv_cache_bytes else 0


def trained_params(model: ModelConfig, w: Workload) -> int:
    """Parameters one GPU updates per step: what the plan's optimizer calls cover."""
    return sum(c.shape.params * c.layers for c in plan(model, w).calls if c.op == "adamw")


def fewest_gpus(model: ModelConfig, w: Workload, gpu_memory_bytes: int, usable: float = 0.9,
                recompute: bool = False) -> int | None:
    """The fewest GPUs whose per-GPU memory fits in `usable` of a GPU: the smallest tensor-parallel
    degree (a power of two dividing the heads), or, for a workload with expert parallelism, the
    smallest expert-parallel degree (a power of two dividing the experts, at the workload's tp);
    None if even the largest such degree does not fit."""
    spread = "ep" if w.ep > 1 else "tp"
    n = w.tp if spread == "ep" else 1
    while (model.experts if spread == "ep" else model.heads) % n == 0:
        try:
            need = memory(model, replace(w, **{spread: n}), recompute).total_bytes
        except ValueError:
            need = math.inf
        if need <= usable * gpu_memory_bytes:
            return replace(w, **{spread: n}).gpus
        n *= 2
    return None


def model_flops_per_token(model: ModelConfig, seq_len: int) -> int:
    """PaLM's (Chowdhery et al. 2022, appendix B) training FLOPs per token: 6N + 12 L H Q T, N the
    non-embedding parameters a token uses (a mixture of experts: its routed experts', not all)."""
    n = sum(model.layer_params(i, active=True) for i in range(model.layers))
    return 6 * n + 12 * model.layers * model.heads * model.head_dim * seq_len


@dataclass(frozen=True)
class Estimate:
    model: str
    workload: str
    dtype: str
    gpus: int
    time_s: float  # prefill: time to first token; decode: one token per sequence; train: one step
    tokens_per_s_per_gpu: float
    gpu_s_per_1k_tokens: float
    mfu: float | None
    energy_j_per_token: float | None
    memory: Memory
    modules_s: dict
    sources: dict

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(composer: Composer, model: ModelConfig, w: Workload, **options) -> Estimate:
    return estimate_from(composer.compose(plan(model, w)), **options)


def estimate_from(breakdown: Breakdown, **options) -> Estimate:
    return compose_estimate(breakdown, **options)[1]


def compose_estimate(breakdown: Breakdown, *, peak_flops: float | None = None, train: TrainOptions = TrainOptions(),
                     collective_s: CollectiveTime | None = None) -> tuple[Breakdown, Estimate]:
    """The step's breakdown (in training with the recomputation and the gradient all-reduce the
    options add) and the estimate made from it, so that both show the same step.
    peak_flops: the card's dense FLOP/s at the workload dtype, for MFU (None: no MFU)."""
    model, w = breakdown.plan.model, breakdown.plan.workload
    recompute = w.training and train.recompute
    if w.training:
        breakdown = _training_extras(breakdown, train, collective_s)
    total_s = breakdown.total_s
    gpus = w.gpus * (train.dp if w.training else 1)
    tokens = (w.batch if w.phase == "decode" else w.batch * w.seq_len) * w.replicas
    tokens_per_s = tokens * (train.dp if w.training else 1) / total_s
    mfu = None
    if w.training and peak_flops:
        mfu = tokens_per_s * model_flops_per_token(model, w.seq_len) / (peak_flops * gpus)
    energy = breakdown.energy_j
    return breakdown, Estimate(model.name, w.label, w.dtype, gpus, total_s, tokens_per_s / gpus,
                               1000 * gpus / tokens_per_s, mfu, energy / tokens if energy is not None else None,
                               memory(model, w, recompute), breakdown.modules_s(), breakdown.sources())


def _training_extras(b: Breakdown, opts: TrainOptions, collective_s: CollectiveTime | None) -> Breakdown:
    """Add recomputation (another forward of every layer-scope call) and data-parallel gradient
    all-reduce (hidden behind the backward where overlap allows)."""
    calls = list(b.calls)
    if opts.recompute:
        calls += [replace(c, role=f"{c.role}.recompute") for c in b.calls if c.scope == "layer" and c.pass_ == "fwd"
                  and c.op != "adamw"]
    if opts.dp > 1:
        if collective_s is None:
            raise ValueError("data-parallel estimates need a collective model (a measured fit or a fabric profile)")
        model, w = b.plan.model, b.plan.workload
        grad_bytes = 2 * (model.params // w.tp if w.ep == 1 else trained_params(model, w))
        comm = collective_s("allreduce", grad_bytes, opts.dp)
        if opts.overlap:
            backward = sum(c.step_s for c in b.calls if c.pass_ in ("dgrad", "wgrad", "bwd"))
            comm = max(0.0, comm - backward)
        calls.append(CallTime("dp.allreduce.grads", "allreduce", "fwd", 1, "model", comm, "modeled", None))
    return replace(b, calls=tuple(calls))


def idealized_runtime(composer: Composer, model: ModelConfig, *, tp: int = 1, dtype: str = "bf16",
                      decode_context: int = 1024, prompt_tokens=HELM_PROMPT_TOKENS,
                      cost_aware: bool = False, ep: int = 1, weights: str = "") -> dict:
    """HELM's idealized runtime: runtime(p, o) = prompt_cost(p) + (o - 1) x per_output_token, at batch
    1. The per-token cost is a decode step at `decode_context` tokens of context. cost_aware
    multiplies by the GPUs used (the tensor-parallel degree, or the expert-parallel one). weights: the
    linear layers' weight format ("" in `dtype`), so each format has its own runtime."""
    scale = Workload("decode", 1, 1, tp=tp, ep=ep).gpus if cost_aware else 1

    def seconds(phase: str, length: int) -> float:
        w = Workload(phase, 1, length, tp=tp, dtype=dtype, ep=ep, weights=weights)
        return composer.compose(plan(model, w)).total_s * scale

    prompts = [p for p in prompt_tokens if p <= model.max_seq_len]
    return {
        "runtime_per_output_token": seconds("decode", min(decode_context, model.max_seq_len)),
        "runtime_for_prompt_tokens": {str(p): seconds("prefill", p) for p in prompts},
    }
