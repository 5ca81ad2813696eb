"""plan(): the op calls of each kind of decoder layer with the number of layers of that kind, plus
embedding and LM head, and the fused kernels that may replace some of them.

The same plan decides what is measured (opbench.measure.cases) and what is composed, so the two never
disagree. Shapes are per GPU: tensor parallelism shards attention heads and MLP columns (qkv,
gate/up) and rows (o, down) the Megatron way, with an all-reduce after each row-parallel GEMM.

A model's layers differ in their attention (full, or a sliding window) and their MLP (dense, or a
mixture of experts); each kind is planned once and its calls carry how many layers repeat them.

Quantized weights (`w=`): the decoder layers' linear layers (not the router, not the LM head, which
serving stacks keep in the activation dtype) call the op of their weight format: a weight-only GEMM
(wgemm: int8, int4); an fp8 GEMM with its scales (scaled_gemm), each after the quantization of its
input activations (act_quant); NF4's dequantization to the activation dtype (dequant) before a plain
GEMM, in fine-tuning (QLoRA) again for the backward pass.

A mixture-of-experts MLP: the router GEMM; routing (scores, top-k, renormalisation); the token copies
permuted into expert order; the experts' gate/up grouped GEMM, activation and down grouped GEMM, whose
rows per expert come from a seeded routing draw (opbench.ops.routing: ragged, some experts empty);
the un-permutation with the weighted combine; shared experts as a dense MLP beside them. Without
expert parallelism, tensor parallelism shards every expert's width as it shards a dense MLP. With
ep > 1 each GPU holds experts / ep whole experts, and the tokens travel: each GPU dispatches its
tokens (a 1/tp slice of its attention replica's, the slices gathered again after the combine) by an
uneven all-to-all, regroups what it received by local expert, and after the down GEMM sends the rows
back the same way. A layer waits for its busiest GPU, so the per-GPU expert shapes are that GPU's.

Inference keeps a KV cache, paged (`paged=N`: pages of N tokens through a shuffled block table) and
in fp8 (`kv=fp8`, per-head scales) where the workload asks: the KV write scatters into pages and
quantizes, attention reads pages and dequantizes (op family paged_attention). Attention sinks
(gpt-oss) enter the attention shapes; a model's window layers and full layers are kinds of their own.

Multi-head latent attention (DeepSeek-V2/V3): queries through a low-rank down-projection, its norm
and the up-projection; a joint down-projection of the hidden state to the latent c_kv and the shared
rotary key k_pe, the latent's norm, the rotary on q_pe and k_pe; the cache holds [c_kv, k_pe].
Prefill and training up-project c_kv to each head's K (nope part) and V and attend with q/k 192 and
v 128 wide; decode runs absorbed: q_nope through W_UK per head (kv_lora_rank wide), attention of all
heads over the cached rows (mla_decode), and the output through W_UV per head, then o_proj. The
latent is not sharded: under tp each GPU computes and caches all of it for its heads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from opbench.ops.dtypes import DTYPES, WEIGHT_FORMATS, DType
from opbench.spec.workload import PlanError, Workload
from opbench.spec.models import ModelConfig
from opbench.ops import routing
from opbench.ops.act_quant import ActQuantShape
from opbench.ops.attention import AttentionShape
from opbench.ops.dequant import DequantShape
from opbench.ops.scaled_gemm import ScaledGemmShape
from opbench.ops.wgemm import WGemmShape
from opbench.ops.collective import AllToAllVShape, CollectiveShape
from opbench.ops.fused_moe import FusedMoEShape
from opbench.ops.gemm import GemmShape
from opbench.ops.grouped_gemm import GroupedGemmShape
from opbench.ops.kvcache import KVWriteShape
from opbench.ops.mla import MLADecodeShape
from opbench.ops.paged_attention import PagedAttentionShape
from opbench.ops.moe_permute import PermuteShape
from opbench.ops.moe_route import RouteShape
from opbench.ops.tokenwise import ParamsShape, RotaryShape, RowsShape, VocabShape

@dataclass(frozen=True)
class OpCall:
    role: str  # what the call is in the model: "attn.qkv", "mlp.down", "tp.allreduce.attn", ...
    op: str  # op family
    shape: object  # the family's shape record
    pass_: str = "fwd"  # fwd | dgrad | wgrad | bwd
    count: int = 1  # calls per layer (scope "layer") or per model step (scope "model")
    scope: str = "layer"  # layer: repeated in each layer of its kind; model: once per model
    layers: int = 1  # the layers the call repeats in (scope "model": 1)
    kind: str = ""  # the kind of layer, "full/dense", "window/moe", ... ("" for scope "model")

    @property
    def per_step(self) -> int:
        """Calls per model step."""
        return self.count * self.layers

    def to_dict(self) -> dict:
        return {"role": self.role, "op": self.op, "shape": asdict(self.shape), "pass": self.pass_,
                "count": self.count, "scope": self.scope, "layers": self.layers, "kind": self.kind}

    @classmethod
    def from_dict(cls, c: dict, model: ModelConfig) -> OpCall:
        from opbench.ops import get_family

        # plans written before layer kinds repeat every layer-scope call in every layer
        layer = c["scope"] == "layer"
        return cls(c["role"], c["op"], get_family(c["op"]).shape_type(**c["shape"]), c["pass"], c["count"], c["scope"],
                   c.get("layers", model.layers if layer else 1),
                   c.get("kind", kind_label(*next(iter(model.layer_kinds()))) if layer else ""))


@dataclass(frozen=True)
class Fusion:
    """Calls one fused kernel may replace: the calls of the roles in `replaces`, every pass of them,
    give way to `calls`, the fused kernel's."""
    replaces: tuple[str, ...]  # roles, in the order they run
    calls: tuple[OpCall, ...]

    @property
    def op(self) -> str:
        return self.calls[0].op

    @property
    def label(self) -> str:
        return f"{' + '.join(self.replaces)} -> {self.op}"

    def to_dict(self) -> dict:
        return {"replaces": list(self.replaces), "calls": [c.to_dict() for c in self.calls]}

    @classmethod
    def from_dict(cls, d: dict, model: ModelConfig) -> Fusion:
        return cls(tuple(d["replaces"]), tuple(OpCall.from_dict(c, model) for c in d["calls"]))


@dataclass(frozen=True)
class Plan:
    model: ModelConfig
    workload: Workload
    calls: tuple[OpCall, ...] = field(default_factory=tuple)
    fusions: tuple[Fusion, ...] = ()  # what fused kernels may replace; none applied in `calls`

    @property
    def name(self) -> str:
        return f"{self.model.name}/{self.workload.label}/{self.workload.dtype}"

    @property
    def all_calls(self) -> tuple[OpCall, ...]:
        """The calls and those of the fused kernels: every call a composition may ask a time of."""
        return self.calls + tuple(c for f in self.fusions for c in f.calls)

    def fuse(self, fusions) -> Plan:
        """The plan with `fusions` (some of its own) applied: each one's fused calls where the first
        call it replaces was, the calls it replaces gone."""
        calls = list(self.calls)
        for f in fusions:
            at = next(i for i, c in enumerate(calls) if c.role in f.replaces)
            calls[at:at] = f.calls
            calls = [c for c in calls if c.role not in f.replaces]
        return replace(self, calls=tuple(calls), fusions=tuple(f for f in self.fusions if f not in fusions))

    def kinds(self) -> dict[str, int]:
        """Each kind of layer the plan has, with its number of layers, in plan order."""
        return {c.kind: c.layers for c in self.calls if c.scope == "layer"}

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "workload": asdict(self.workload),
                "calls": [c.to_dict() for c in self.calls], "fusions": [f.to_dict() for f in self.fusions]}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """A plan as the JSON's opbench.plans holds it."""
        model = ModelConfig(**d["model"])
        return cls(model, Workload(**d["workload"]), tuple(OpCall.from_dict(c, model) for c in d["calls"]),
                   tuple(Fusion.from_dict(f, model) for f in d.get("fusions") or ()))


def kind_label(attention: str, mlp: str) -> str:
    """'full/dense', 'window/moe': a kind of layer as ModelConfig.layer_kinds names it."""
    return f"{attention}/{mlp}"


@dataclass(frozen=True)
class ShardDims:
    """Per-GPU sizes of one layer under tensor parallelism."""
    heads: int
    kv_heads: int
    ffn: int
    vocab: int


def shard(model: ModelConfig, tp: int) -> ShardDims:
    if model.heads % tp:
        raise PlanError(f"tp={tp} does not divide {model.name}'s {model.heads} attention heads")
    if model.kv_heads % tp == 0:
        kv_heads = model.kv_heads // tp
    elif tp % model.kv_heads == 0:
        kv_heads = 1  # fewer kv heads than GPUs: each is replicated, one per GPU
    else:
        raise PlanError(f"tp={tp} neither divides nor is a multiple of {model.name}'s {model.kv_heads} kv heads")
    if model.ffn_hidden % tp:
        raise PlanError(f"tp={tp} does not divide {model.name}'s MLP width {model.ffn_hidden}")
    return ShardDims(model.heads // tp, kv_heads, model.ffn_hidden // tp, -(-model.vocab // tp))


def _linear(role: str, tokens: int, out_features: int, in_features: int, training: bool, frozen: bool,
            count: int = 1, scope: str = "layer", layers: int = 1, kind: str = "") -> list[OpCall]:
    """A linear layer's GEMMs: forward, and in training dgrad and (unless frozen) wgrad."""
    calls = [OpCall(role, "gemm", GemmShape(tokens, out_features, in_features), "fwd", count, scope, layers, kind)]
    if training:
        calls.append(OpCall(role, "gemm", GemmShape(tokens, in_features, out_features), "dgrad", count, scope, layers,
                            kind))
        if not frozen:
            calls.append(OpCall(role, "gemm", GemmShape(in_features, out_features, tokens), "wgrad", count, scope,
                                layers, kind))
    return calls


def _quantized_linear(role: str, tokens: int, out_features: int, in_features: int, fmt: DType, training: bool,
                      count: int = 1, scope: str = "layer", layers: int = 1, kind: str = "") -> list[OpCall]:
    """A linear layer over weights of format `fmt` (frozen: no wgrad)."""
    def call(suffix, op, shape, pass_="fwd", n=count):
        return OpCall(role + suffix, op, shape, pass_, n, scope, layers, kind)
    if fmt.codebook is not None:  # dequantize, then the GEMM in the activation dtype (bitsandbytes' way)
        calls = [call(".dequant", "dequant", DequantShape(out_features, in_features), n=count * (2 if training else 1))]
        return calls + _linear(role, tokens, out_features, in_features, training, True, count, scope, layers, kind)
    if fmt.act_block is None:  # weight-only: the dequantization is inside the GEMM
        return [call("", "wgemm", WGemmShape(tokens, out_features, in_features))]
    return [call(".act_quant", "act_quant", ActQuantShape(tokens, in_features)),
            call("", "scaled_gemm", ScaledGemmShape(tokens, out_features, in_features))]


def _tokenwise(role: str, op: str, shape, training: bool, count: int = 1, scope: str = "layer", layers: int = 1,
               kind: str = "") -> list[OpCall]:
    calls = [OpCall(role, op, shape, "fwd", count, scope, layers, kind)]
    if training:
        calls.append(OpCall(role, op, shape, "bwd", count, scope, layers, kind))
    return calls


def _check_moe(model: ModelConfig, w: Workload) -> None:
    if not model.moe:
        if w.ep > 1:
            raise PlanError(f"ep={w.ep}: {model.name} has no experts to spread (a dense model)")
        return
    if model.experts % w.ep:
        raise PlanError(f"ep={w.ep} does not divide {model.name}'s {model.experts} experts")
    if w.ep == 1:  # tensor parallelism shards the experts' widths
        for what, width in (("expert", model.expert_ffn), ("shared expert", model.shared_ffn)):
            if width % w.tp and (what == "expert" or model.shared_experts):
                raise PlanError(f"tp={w.tp} does not divide {model.name}'s {what} width {width}")


def plan(model: ModelConfig, workload: Workload) -> Plan:
    w = workload
    if w.seq_len > model.max_seq_len:
        raise PlanError(f"length {w.seq_len} exceeds {model.name}'s max_seq_len {model.max_seq_len}")
    dims = shard(model, w.tp)
    _check_moe(model, w)
    d, h = model.head_dim, model.hidden
    training, lora = w.training, w.phase == "finetune"
    tokens = w.batch if w.phase == "decode" else w.batch * w.seq_len
    lm_tokens = tokens if training else w.batch  # inference needs logits of the last position only
    act = DTYPES[w.dtype].activation  # what the all-reduces carry: fp8 GEMMs still pass bf16 activations
    fmt = WEIGHT_FORMATS[w.weights] if w.weights else None
    if fmt is not None and model.moe:
        raise PlanError(f"w={w.weights}: quantized expert weights (a grouped GEMM per format) are not planned yet; "
                        f"{model.name} is a mixture of experts")
    rows = RowsShape(tokens, h)
    calls: list[OpCall] = []
    where = {"scope": "model", "layers": 1, "kind": ""}  # the layers the calls added now repeat in

    def linear(role, out_f, in_f, count=1, n_tokens=tokens, adapt=True):
        if fmt is not None and where["scope"] == "layer":
            calls.extend(_quantized_linear(role, n_tokens, out_f, in_f, fmt, training, count=count, **where))
        else:
            calls.extend(_linear(role, n_tokens, out_f, in_f, training, frozen=lora, count=count, **where))
        if lora and adapt and where["scope"] == "layer":
            r = w.lora_rank  # x A^T then (x A^T) B^T; only the adapters get weight gradients
            calls.extend(_linear(f"lora.{role}.a", n_tokens, r, in_f, training, False, count, **where))
            calls.extend(_linear(f"lora.{role}.b", n_tokens, out_f, r, training, False, count, **where))

    def tokenwise(role, op, shape, count=1):
        calls.extend(_tokenwise(role, op, shape, training, count, **where))

    def collective(role, op, shape):
        n = 2 if training else 1  # forward, and its twin on the backward path
        calls.append(OpCall(role, op, shape, "fwd", n, **where))

    def allreduce(role):
        if w.tp > 1:
            collective(role, "allreduce", CollectiveShape(act.bytes_of(tokens * h), w.tp))

    def kv_cache_fields(kv_heads: int) -> dict:
        """How the workload keeps the KV cache: its page and its fp8 scales (per head; one for one head)."""
        fp8 = 0 if not w.kv_dtype else (2 if kv_heads > 1 else 1)  # the one KV dtype: fp8
        return {"page": w.paged, "kv_fp8_scales": fp8}

    def mla_attention_block(attn: str):
        nope, rope, latent, v = d - model.qk_rope_head_dim, model.qk_rope_head_dim, model.kv_lora_rank, model.value_dim
        tokenwise("norm.input", model.norm, rows)
        if model.q_lora_rank:
            linear("attn.q_down", model.q_lora_rank, h)
            tokenwise("attn.q_norm", "rmsnorm", RowsShape(tokens, model.q_lora_rank))
            linear("attn.q_up", dims.heads * d, model.q_lora_rank)
        else:
            linear("attn.q", dims.heads * d, h)
        linear("attn.kv_down", latent + rope, h)  # c_kv and the shared rotary key, one GEMM
        tokenwise("attn.kv_norm", "rmsnorm", RowsShape(tokens, latent))
        offset = w.seq_len - 1 if w.phase == "decode" else 0
        tokenwise("attn.rotary", "rotary",
                  RotaryShape(tokens, dims.heads, 1, rope, int(model.rotary == "gptj"), offset))
        if not training:
            cache = kv_cache_fields(1)
            calls.append(OpCall("attn.kv_write", "kv_write",
                                KVWriteShape(tokens, 1, latent + rope, cache["page"], cache["kv_fp8_scales"], 1),
                                **where))
        if w.phase == "decode":  # absorbed: per head, q_nope W_UK, then attention over the rows, then W_UV
            linear("attn.q_absorb", latent, nope, count=dims.heads, adapt=False)
            tokenwise("attn.core", "mla_decode",
                      MLADecodeShape(w.batch, dims.heads, latent, rope, d, w.seq_len, w.min_context,
                                     **kv_cache_fields(1)))
            linear("attn.v_absorb", v, latent, count=dims.heads, adapt=False)
        else:
            linear("attn.kv_up", dims.heads * (nope + v), latent)
            window = model.sliding_window if attn == "window" and model.sliding_window < w.seq_len else 0
            tokenwise("attn.core", "attention",
                      AttentionShape(w.batch, dims.heads, dims.heads, d, w.seq_len, w.seq_len, 1, window,
                                     value_dim=v if v != d else 0, sinks=int(model.attention_sinks)))
        linear("attn.o", h, dims.heads * v)
        allreduce("tp.allreduce.attn")
        tokenwise("residual.attn", "add", rows)

    def attention_block(attn: str):
        if model.mla:
            return mla_attention_block(attn)
        tokenwise("norm.input", model.norm, rows)
        linear("attn.qkv", (dims.heads + 2 * dims.kv_heads) * d, h)
        if model.rotary != "none":  # decode: the new tokens follow seq_len - 1 cached positions
            offset = w.seq_len - 1 if w.phase == "decode" else 0
            tokenwise("attn.rotary", "rotary",
                      RotaryShape(tokens, dims.heads, dims.kv_heads, d, int(model.rotary == "gptj"), offset))
        cache = kv_cache_fields(dims.kv_heads)
        if not training:  # inference stores each new token's K and V for the steps after it
            calls.append(OpCall("attn.kv_write", "kv_write", KVWriteShape(tokens, dims.kv_heads, d, **cache), **where))
        # a window past the end is none
        window = model.sliding_window if attn == "window" and model.sliding_window < w.seq_len else 0
        q_len = 1 if w.phase == "decode" else w.seq_len
        sinks = int(model.attention_sinks)
        if not training and (w.paged or w.kv_dtype):  # attention reads the cache as the workload keeps it
            tokenwise("attn.core", "paged_attention",
                      PagedAttentionShape(w.batch, dims.heads, dims.kv_heads, d, q_len, w.seq_len, window,
                                          w.min_context, sinks=sinks, **cache))
        else:
            tokenwise("attn.core", "attention",
                      AttentionShape(w.batch, dims.heads, dims.kv_heads, d, q_len, w.seq_len, 1, window, w.min_context,
                                     sinks=sinks))
        linear("attn.o", h, dims.heads * d)
        allreduce("tp.allreduce.attn")
        tokenwise("residual.attn", "add", rows)

    def dense_block():
        tokenwise("norm.post_attn", model.norm, rows)
        up = (2 if model.gated else 1) * dims.ffn
        linear("mlp.gate_up", up, h)
        tokenwise("mlp.act", model.activation, RowsShape(tokens, dims.ffn))
        linear("mlp.down", h, dims.ffn)
        allreduce("tp.allreduce.mlp")
        tokenwise("residual.mlp", "add", rows)

    def grouped(role, shape: GroupedGemmShape):
        """An expert linear layer: forward, and in training dgrad and (routed experts are frozen in
        fine-tuning) wgrad; the shape names the layer, the pass the GEMM."""
        calls.append(OpCall(role, "grouped_gemm", shape, "fwd", **where))
        if training:
            calls.append(OpCall(role, "grouped_gemm", shape, "dgrad", **where))
            if not lora:
                calls.append(OpCall(role, "grouped_gemm", shape, "wgrad", **where))

    def moe_block():
        tokenwise("norm.post_attn", model.norm, rows)
        ep, experts, k = w.ep, model.experts, model.experts_per_token
        moe_tokens = -(-tokens // w.tp) if ep > 1 else tokens  # under ep each tp rank dispatches its slice
        ffn = model.expert_ffn if ep > 1 else model.expert_ffn // w.tp
        up = (2 if model.gated else 1) * ffn
        draw = {"seed": routing.ROUTING_SEED, "skew_milli": routing.skew_milli(w.skew)}
        linear("moe.route.router", experts, h, n_tokens=moe_tokens, adapt=False)
        tokenwise("moe.route.topk", "moe_route",
                  RouteShape(moe_tokens, experts, k, int(model.router == "sigmoid"), int(model.router_norm), **draw))
        tokenwise("moe.route.permute", "moe_permute", PermuteShape(moe_tokens, experts, k, h, **draw))
        copies = moe_tokens * k
        if ep > 1:
            sent = AllToAllVShape(moe_tokens, h, experts, k, ep, **draw)
            collective("ep.dispatch", "alltoallv", sent)
            copies = sum(routing.local_counts(moe_tokens, experts, k, ep, **draw))
            # the rows arrive grouped by sender: regrouped by local expert, and back after the experts
            tokenwise("moe.route.regroup", "moe_permute", PermuteShape(copies, experts // ep, 1, h, **draw), count=2)
        grouped("moe.expert.gate_up", GroupedGemmShape(moe_tokens, experts, k, ep, up, h, **draw))
        tokenwise("moe.expert.act", model.activation, RowsShape(copies, ffn))
        grouped("moe.expert.down", GroupedGemmShape(moe_tokens, experts, k, ep, h, ffn, **draw))
        if ep > 1:
            collective("ep.combine", "alltoallv", sent)
        tokenwise("moe.route.unpermute", "moe_unpermute", PermuteShape(moe_tokens, experts, k, h, **draw))
        if model.shared_experts:
            shared = model.shared_experts * model.shared_ffn // (1 if ep > 1 else w.tp)
            linear("moe.shared.gate_up", (2 if model.gated else 1) * shared, h, n_tokens=moe_tokens, adapt=False)
            tokenwise("moe.shared.act", model.activation, RowsShape(moe_tokens, shared))
            linear("moe.shared.down", h, shared, n_tokens=moe_tokens, adapt=False)
            tokenwise("moe.shared.add", "add", RowsShape(moe_tokens, h))
        if ep > 1 and w.tp > 1:  # every tp rank gets back the whole replica's tokens
            collective("tp.allgather.moe", "allgather", CollectiveShape(act.bytes_of(moe_tokens * w.tp * h), w.tp))
        elif ep == 1:
            allreduce("tp.allreduce.mlp")
        tokenwise("residual.mlp", "add", rows)

    # Embedding (vocab-parallel under tp: each GPU holds a slice, partial results are all-reduced)
    tokenwise("embed", "embedding", VocabShape(tokens, h, dims.vocab))
    allreduce("tp.allreduce.embed")

    kinds = model.layer_kinds()
    for (attn, mlp), count in kinds.items():
        where.update(scope="layer", layers=count, kind=kind_label(attn, mlp))
        attention_block(attn)
        moe_block() if mlp == "moe" else dense_block()

    # Final norm and LM head
    where.update(scope="model", layers=1, kind="")
    tokenwise("norm.final", model.norm, rows)
    linear("lm_head", dims.vocab, h, n_tokens=lm_tokens)
    if training:
        tokenwise("loss", "cross_entropy", VocabShape(tokens, dims.vocab, model.vocab))
        calls.extend(_optimizer_calls(model, w, dims))
    return Plan(model, w, tuple(calls), _fusions(model, rows, training, kinds))


def _fusions(model: ModelConfig, rows: RowsShape, training: bool, kinds: dict) -> tuple[Fusion, ...]:
    """Each residual add with the RMSNorm after it, as one add_rmsnorm (vLLM's fused_add_rms_norm,
    flash-attn's prenorm residual), in the add's passes. After the MLP's add comes the next layer's
    input norm: fusing the two in every layer leaves the final norm, of the same shape, to stand for
    the first layer's input norm, which no add precedes; the step's total is that of the model."""
    if model.norm != "rmsnorm":
        return ()
    return tuple(Fusion(pair, tuple(c for (attn, mlp), count in kinds.items()
                                    for c in _tokenwise("+".join(pair), "add_rmsnorm", rows, training, layers=count,
                                                        kind=kind_label(attn, mlp))))
                 for pair in (("residual.attn", "norm.post_attn"), ("residual.mlp", "norm.input")))


def layer_params_per_gpu(model: ModelConfig, w: Workload, moe: bool) -> int:
    """The weights of one layer of a kind that one GPU holds: all of it sharded by tp; under expert
    parallelism attention sharded by tp and, of the MoE MLP, experts / ep whole experts beside the
    router and the shared experts (whole on every GPU)."""
    i = next(j for j in range(model.layers) if model.moe_layer(j) == moe)
    if not (moe and w.ep > 1):
        return model.layer_params(i) // w.tp
    per_expert = (3 if model.gated else 2) * model.hidden * model.expert_ffn
    shared = (3 if model.gated else 2) * model.hidden * model.shared_experts * model.shared_ffn
    return ((model.attention_params + 2 * model.hidden) // w.tp + model.experts // w.ep * per_expert + shared
            + model.hidden * model.experts)


def _optimizer_calls(model: ModelConfig, w: Workload, dims: ShardDims) -> list[OpCall]:
    """One AdamW step per training step over the parameters this GPU updates, per kind of layer."""
    h, d = model.hidden, model.head_dim
    calls = []
    for (attn, mlp), count in model.layer_kinds().items():
        kind = kind_label(attn, mlp)
        if w.phase == "finetune":  # only the adapters train: attention's, and a dense MLP's
            pairs = [(h, (dims.heads + 2 * dims.kv_heads) * d), (dims.heads * d, h)]
            if mlp == "dense":
                pairs += [(h, (2 if model.gated else 1) * dims.ffn), (dims.ffn, h)]
            params = sum(w.lora_rank * (i + o) for i, o in pairs)
        else:
            params = layer_params_per_gpu(model, w, mlp == "moe")
        calls.append(OpCall("optim.adamw", "adamw", ParamsShape(params), layers=count, kind=kind))
    if w.phase == "finetune":
        return calls
    model_params = dims.vocab * h * (1 if model.tied_embeddings else 2) + h
    return calls + [OpCall("optim.adamw.embed", "adamw", ParamsShape(model_params), scope="model")]


def fused_moe_calls(p: Plan) -> list[OpCall]:
    """The fused MoE calls that may replace each MoE layer's experts (permute, gate/up, activation, down,
    un-permute) in an inference plan without expert parallelism, for SwiGLU experts (the fused
    kernel's activation); composition keeps the unfused calls."""
    w = p.workload
    if w.training or w.ep > 1 or p.model.activation != "swiglu":
        return []
    out = []
    for c in p.calls:
        if c.op == "grouped_gemm" and c.role == "moe.expert.gate_up" and c.pass_ == "fwd":
            s: GroupedGemmShape = c.shape
            out.append(OpCall("moe.expert.fused", "fused_moe",
                              FusedMoEShape(s.tokens, s.experts, s.top_k, s.k, s.n // 2, s.seed, s.skew_milli),
                              layers=c.layers, kind=c.kind))
    return out
