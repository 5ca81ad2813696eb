"""plan(): the op calls of one decoder layer, plus embedding and LM head, and the fused kernels
that may replace some of them.

The same plan decides what is measured (opbench.measure.cases) and what is composed, so the two never
disagree. Shapes are per GPU: tensor parallelism shards attention heads and MLP columns (qkv,
gate/up) and rows (o, down) the Megatron way, with an all-reduce after each row-parallel GEMM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from opbench.ops.dtypes import DTYPES
from opbench.spec.workload import PlanError, Workload
from opbench.spec.models import ModelConfig
from opbench.ops.attention import AttentionShape
from opbench.ops.collective import CollectiveShape
from opbench.ops.gemm import GemmShape
from opbench.ops.kvcache import KVWriteShape
from opbench.ops.tokenwise import ParamsShape, RotaryShape, RowsShape, VocabShape

@dataclass(frozen=True)
class OpCall:
    role: str  # what the call is in the model: "attn.qkv", "mlp.down", "tp.allreduce.attn", ...
    op: str  # op family
    shape: object  # the family's shape record
    pass_: str = "fwd"  # fwd | dgrad | wgrad | bwd
    count: int = 1  # calls per layer (scope "layer") or per model step (scope "model")
    scope: str = "layer"  # layer: repeated in every decoder layer; model: once per model

    def to_dict(self) -> dict:
        return {"role": self.role, "op": self.op, "shape": asdict(self.shape), "pass": self.pass_,
                "count": self.count, "scope": self.scope}

    @classmethod
    def from_dict(cls, c: dict) -> OpCall:
        from opbench.ops import get_family

        return cls(c["role"], c["op"], get_family(c["op"]).shape_type(**c["shape"]), c["pass"], c["count"], c["scope"])


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
    def from_dict(cls, d: dict) -> Fusion:
        return cls(tuple(d["replaces"]), tuple(map(OpCall.from_dict, d["calls"])))


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

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "workload": asdict(self.workload),
                "calls": [c.to_dict() for c in self.calls], "fusions": [f.to_dict() for f in self.fusions]}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """A plan as the JSON's opbench.plans holds it."""
        return cls(ModelConfig(**d["model"]), Workload(**d["workload"]), tuple(map(OpCall.from_dict, d["calls"])),
                   tuple(map(Fusion.from_dict, d.get("fusions") or ())))


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
            count: int = 1, scope: str = "layer") -> list[OpCall]:
    """A linear layer's GEMMs: forward, and in training dgrad and (unless frozen) wgrad."""
    calls = [OpCall(role, "gemm", GemmShape(tokens, out_features, in_features), "fwd", count, scope)]
    if training:
        calls.append(OpCall(role, "gemm", GemmShape(tokens, in_features, out_features), "dgrad", count, scope))
        if not frozen:
            calls.append(OpCall(role, "gemm", GemmShape(in_features, out_features, tokens), "wgrad", count, scope))
    return calls


def _tokenwise(role: str, op: str, shape, training: bool, count: int = 1, scope: str = "layer") -> list[OpCall]:
    calls = [OpCall(role, op, shape, "fwd", count, scope)]
    if training:
        calls.append(OpCall(role, op, shape, "bwd", count, scope))
    return calls


def plan(model: ModelConfig, workload: Workload) -> Plan:
    w = workload
    if w.seq_len > model.max_seq_len:
        raise PlanError(f"length {w.seq_len} exceeds {model.name}'s max_seq_len {model.max_seq_len}")
    dims = shard(model, w.tp)
    d, h = model.head_dim, model.hidden
    training, lora = w.training, w.phase == "finetune"
    tokens = w.batch if w.phase == "decode" else w.batch * w.seq_len
    lm_tokens = tokens if training else w.batch  # inference needs logits of the last position only
    act = DTYPES[w.dtype].activation  # what the all-reduces carry: fp8 GEMMs still pass bf16 activations
    rows = RowsShape(tokens, h)
    calls: list[OpCall] = []

    def linear(role, out_f, in_f, count=1, scope="layer", n_tokens=tokens):
        calls.extend(_linear(role, n_tokens, out_f, in_f, training, frozen=lora, count=count, scope=scope))
        if lora and scope == "layer":
            r = w.lora_rank  # x A^T then (x A^T) B^T; only the adapters get weight gradients
            calls.extend(_linear(f"lora.{role}.a", n_tokens, r, in_f, training, False, count, scope))
            calls.extend(_linear(f"lora.{role}.b", n_tokens, out_f, r, training, False, count, scope))

    def tokenwise(role, op, shape, count=1, scope="layer"):
        calls.extend(_tokenwise(role, op, shape, training, count, scope))

    def allreduce(role, scope="layer"):
        if w.tp > 1:  # forward all-reduce, and its twin on the backward path
            n = 2 if training else 1
            calls.append(OpCall(role, "allreduce", CollectiveShape(act.bytes_of(tokens * h), w.tp), "fwd", n, scope))

    # Embedding (vocab-parallel under tp: each GPU holds a slice, partial results are all-reduced)
    tokenwise("embed", "embedding", VocabShape(tokens, h, dims.vocab), scope="model")
    allreduce("tp.allreduce.embed", scope="model")

    # Attention block
    tokenwise("norm.input", model.norm, rows)
    linear("attn.qkv", (dims.heads + 2 * dims.kv_heads) * d, h)
    if model.rotary != "none":  # decode: the new tokens follow seq_len - 1 cached positions
        offset = w.seq_len - 1 if w.phase == "decode" else 0
        tokenwise("attn.rotary", "rotary",
                  RotaryShape(tokens, dims.heads, dims.kv_heads, d, int(model.rotary == "gptj"), offset))
    if not training:  # inference stores each new token's K and V for the steps after it
        calls.append(OpCall("attn.kv_write", "kv_write", KVWriteShape(tokens, dims.kv_heads, d)))
    window = model.sliding_window if model.sliding_window < w.seq_len else 0  # a window past the end is none
    q_len = 1 if w.phase == "decode" else w.seq_len
    tokenwise("attn.core", "attention",
              AttentionShape(w.batch, dims.heads, dims.kv_heads, d, q_len, w.seq_len, 1, window, w.min_context))
    linear("attn.o", h, dims.heads * d)
    allreduce("tp.allreduce.attn")
    tokenwise("residual.attn", "add", rows)

    # MLP block (MoE: a router, then each expert sees its share of the tokens on average)
    tokenwise("norm.post_attn", model.norm, rows)
    up = (2 if model.gated else 1) * dims.ffn
    if model.experts > 1:
        linear("moe.router", model.experts, h)
        per_expert = -(-tokens * model.experts_per_token // model.experts)
        linear("mlp.gate_up", up, h, count=model.experts, n_tokens=per_expert)
        tokenwise("mlp.act", model.activation, RowsShape(per_expert, dims.ffn), count=model.experts)
        linear("mlp.down", h, dims.ffn, count=model.experts, n_tokens=per_expert)
    else:
        linear("mlp.gate_up", up, h)
        tokenwise("mlp.act", model.activation, RowsShape(tokens, dims.ffn))
        linear("mlp.down", h, dims.ffn)
    allreduce("tp.allreduce.mlp")
    tokenwise("residual.mlp", "add", rows)

    # Final norm and LM head
    tokenwise("norm.final", model.norm, rows, scope="model")
    linear("lm_head", dims.vocab, h, scope="model", n_tokens=lm_tokens)
    if training:
        tokenwise("loss", "cross_entropy", VocabShape(tokens, dims.vocab, model.vocab), scope="model")
        calls.extend(_optimizer_calls(model, w, dims))
    return Plan(model, w, tuple(calls), _fusions(model, rows, training))


def _fusions(model: ModelConfig, rows: RowsShape, training: bool) -> tuple[Fusion, ...]:
    """Each residual add with the RMSNorm after it, as one add_rmsnorm (vLLM's fused_add_rms_norm,
    flash-attn's prenorm residual), in the add's passes. After the MLP's add comes the next layer's
    input norm: fusing the two in every layer leaves the final norm, of the same shape, to stand for
    the first layer's input norm, which no add precedes; the step's total is that of the model."""
    if model.norm != "rmsnorm":
        return ()
    return tuple(Fusion(pair, tuple(_tokenwise("+".join(pair), "add_rmsnorm", rows, training)))
                 for pair in (("residual.attn", "norm.post_attn"), ("residual.mlp", "norm.input")))


def _optimizer_calls(model: ModelConfig, w: Workload, dims: ShardDims) -> list[OpCall]:
    """One AdamW step per training step over the parameters this GPU updates."""
    h, d = model.hidden, model.head_dim
    if w.phase == "finetune":  # only the adapters of the four projections train
        pairs = [(h, (dims.heads + 2 * dims.kv_heads) * d), (dims.heads * d, h),
                 (h, (2 if model.gated else 1) * dims.ffn), (dims.ffn, h)]
        per_layer = sum(w.lora_rank * (i + o) for i, o in pairs)
        return [OpCall("optim.adamw", "adamw", ParamsShape(per_layer))]
    per_layer = model.params_per_layer // w.tp
    model_params = dims.vocab * h * (1 if model.tied_embeddings else 2) + h
    return [OpCall("optim.adamw", "adamw", ParamsShape(per_layer)),
            OpCall("optim.adamw.embed", "adamw", ParamsShape(model_params), scope="model")]
