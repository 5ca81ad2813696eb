"""Model configurations: the ModelConfig record, the built-in zoo, and Hugging Face config.json loading.

Only what decides the shapes of the op calls is recorded; weights are never loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A model name or config file that cannot be turned into a ModelConfig."""


NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("swiglu", "geglu", "gelu")
ROTARY = ("neox", "gptj", "none")


ROUTERS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden: int  # d_model
    layers: int
    heads: int  # query heads
    kv_heads: int  # key/value heads (== heads: MHA, 1: MQA, between: GQA)
    head_dim: int  # query/key head width (MLA: the non-rotary and rotary parts together)
    ffn_hidden: int  # dense MLP intermediate width (Mixtral-style MoE: also each expert's)
    vocab: int
    max_seq_len: int
    norm: str = "rmsnorm"
    activation: str = "swiglu"  # swiglu/geglu are gated: gate and up projections fused
    rotary: str = "neox"  # rotary layout; "none" for learned absolute positions
    sliding_window: int = 0  # 0: full attention
    window_layers: tuple[int, ...] = ()  # layers that use the window; () with a window: every layer
    attention_sinks: bool = False  # a learned logit per head in every softmax (gpt-oss)
    # Mixture of experts
    experts: int = 1  # routed experts per MoE layer; 1 for a dense MLP
    experts_per_token: int = 1
    moe_ffn_hidden: int = 0  # each routed expert's MLP width; 0: ffn_hidden
    shared_experts: int = 0  # experts every token passes through, beside the routed ones
    shared_ffn_hidden: int = 0  # each shared expert's width; 0: the routed experts' width
    dense_layers: tuple[int, ...] = ()  # MoE models: the layers whose MLP is dense
    router: str = "softmax"  # softmax | sigmoid scores over the experts
    router_norm: bool = True  # the top-k weights are renormalised to sum to one
    # Multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank 0: ordinary attention
    q_lora_rank: int = 0  # 0: queries projected directly from the hidden state
    kv_lora_rank: int = 0  # the latent K/V cache width
    qk_rope_head_dim: int = 0  # the decoupled rotary part of head_dim, shared by the heads in the cache
    v_head_dim: int = 0  # 0: head_dim
    tied_embeddings: bool = False
    source: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        for f in ("dense_layers", "window_layers"):  # a config read back from JSON holds lists
            object.__setattr__(self, f, tuple(getattr(self, f)))
        for f in ("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn_hidden", "vocab", "max_seq_len",
                  "experts", "experts_per_token"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model {self.name!r}: {f} must be a positive integer, got {value!r}")
        for f in ("sliding_window", "moe_ffn_hidden", "shared_experts", "shared_ffn_hidden", "q_lora_rank",
                  "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"model {self.name!r}: {f} must be an integer >= 0, got {value!r}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"model {self.name!r}: heads ({self.heads}) is not a multiple of kv_heads ({self.kv_heads})")
        if self.experts_per_token > self.experts:
            raise ConfigError(f"model {self.name!r}: experts_per_token ({self.experts_per_token}) > experts ({self.experts})")
        for f in ("dense_layers", "window_layers"):
            bad = [i for i in getattr(self, f) if not 0 <= i < self.layers]
            if bad:
                raise ConfigError(f"model {self.name!r}: {f} {bad} are not layers 0..{self.layers - 1}")
        if self.mla and not 0 < self.qk_rope_head_dim < self.head_dim:
            raise ConfigError(f"model {self.name!r}: multi-head latent attention needs 0 < qk_rope_head_dim "
                              f"({self.qk_rope_head_dim}) < head_dim ({self.head_dim})")
        for f, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("rotary", ROTARY), ("router", ROUTERS)):
            if getattr(self, f) not in allowed:
                raise ConfigError(f"model {self.name!r}: {f} must be one of {', '.join(allowed)}, got {getattr(self, f)!r}")

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def moe(self) -> bool:
        return self.experts > 1

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def expert_ffn(self) -> int:
        """Each routed expert's MLP width."""
        return self.moe_ffn_hidden or self.ffn_hidden

    @property
    def shared_ffn(self) -> int:
        """Each shared expert's MLP width."""
        return self.shared_ffn_hidden or self.expert_ffn

    @property
    def value_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    def moe_layer(self, i: int) -> bool:
        return self.moe and i not in self.dense_layers

    def window_layer(self, i: int) -> bool:
        return self.sliding_window > 0 and (not self.window_layers or i in self.window_layers)

    def layer_kinds(self) -> dict[tuple[str, str], int]:
        """How many layers of each kind: (attention "full" | "window", MLP "dense" | "moe") -> count."""
        kinds: dict[tuple[str, str], int] = {}
        for i in range(self.layers):
            kind = ("window" if self.window_layer(i) else "full", "moe" if self.moe_layer(i) else "dense")
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    @property
    def kv_cache_elements_per_token(self) -> int:
        """Elements one layer caches per token: K and V of every kv head, or MLA's latent and rotary key."""
        if self.mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.kv_heads * (self.head_dim + self.value_dim)

    @property
    def attention_params(self) -> int:
        h, d = self.hidden, self.head_dim
        if self.mla:
            q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.heads * d if self.q_lora_rank
                 else h * self.heads * d)
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv += self.kv_lora_rank * self.heads * (d - self.qk_rope_head_dim + self.value_dim)
            return q + kv + self.heads * self.value_dim * h
        return h * (self.heads * d + self.kv_heads * (d + self.value_dim)) + self.heads * self.value_dim * h

    def mlp_params(self, moe: bool, active: bool = False) -> int:
        """One layer's MLP weights: dense, or a MoE layer's (every expert, or the ones a token uses)."""
        per = (3 if self.gated else 2) * self.hidden
        if not moe:
            return per * self.ffn_hidden
        routed = self.experts_per_token if active else self.experts
        return per * (routed * self.expert_ffn + self.shared_experts * self.shared_ffn) + self.hidden * self.experts

    def layer_params(self, i: int, active: bool = False) -> int:
        """Weights of decoder layer i (projections, norms), biases ignored."""
        return self.attention_params + self.mlp_params(self.moe_layer(i), active) + 2 * self.hidden

    @property
    def params_per_layer(self) -> int:
        """The mean weights of a decoder layer."""
        return sum(self.layer_params(i) for i in range(self.layers)) // self.layers

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden  # and the final norm

    @property
    def params(self) -> int:
        return sum(self.layer_params(i) for i in range(self.layers)) + self.embedding_params

    @property
    def active_params(self) -> int:
        """Weights one token uses: the routed experts it is sent to, not all of them (embeddings counted)."""
        return sum(self.layer_params(i, active=True) for i in range(self.layers)) + self.embedding_params


def _llama(name, hidden, layers, heads, kv_heads, ffn, vocab, max_seq, source, **kw) -> ModelConfig:
    return ModelConfig(name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                       head_dim=hidden // heads, ffn_hidden=ffn, vocab=vocab, max_seq_len=max_seq,
                       source=source, **kw)


TEST_MODEL = "opbench test model"

# Numbers from each model's published config.json (Hugging Face hub) or paper; tests/data/configs holds
# those files' shape fields and tests/test_models.py checks every entry against them.
ZOO: dict[str, ModelConfig] = {m.name: m for m in (
    _llama("llama-2-7b", 4096, 32, 32, 32, 11008, 32000, 4096, "meta-llama/Llama-2-7b-hf config.json"),
    _llama("llama-2-13b", 5120, 40, 40, 40, 13824, 32000, 4096, "meta-llama/Llama-2-13b-hf config.json"),
    _llama("llama-2-70b", 8192, 80, 64, 8, 28672, 32000, 4096, "meta-llama/Llama-2-70b-hf config.json"),
    _llama("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, 8192, "meta-llama/Meta-Llama-3-8B config.json"),
    _llama("llama-3-70b", 8192, 80, 64, 8, 28672, 128256, 8192, "meta-llama/Meta-Llama-3-70B config.json"),
    _llama("llama-3.1-405b", 16384, 126, 128, 8, 53248, 128256, 131072,
           "meta-llama/Llama-3.1-405B config.json"),
    _llama("mistral-7b", 4096, 32, 32, 8, 14336, 32000, 32768, "mistralai/Mistral-7B-v0.1 config.json",
           sliding_window=4096),
    _llama("mixtral-8x7b", 4096, 32, 32, 8, 14336, 32000, 32768, "mistralai/Mixtral-8x7B-v0.1 config.json",
           experts=8, experts_per_token=2),
    _llama("mixtral-8x22b", 6144, 56, 48, 8, 16384, 32000, 65536, "mistralai/Mixtral-8x22B-v0.1 config.json",
           experts=8, experts_per_token=2),
    ModelConfig(name="qwen3-30b-a3b", hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, ffn_hidden=6144,
                vocab=151936, max_seq_len=40960, experts=128, experts_per_token=8, moe_ffn_hidden=768,
                source="Qwen/Qwen3-30B-A3B config.json"),
    ModelConfig(name="qwen3-235b-a22b", hidden=4096, layers=94, heads=64, kv_heads=4, head_dim=128, ffn_hidden=12288,
                vocab=151936, max_seq_len=40960, experts=128, experts_per_token=8, moe_ffn_hidden=1536,
                source="Qwen/Qwen3-235B-A22B config.json"),
    ModelConfig(name="deepseek-v3", hidden=7168, layers=61, heads=128, kv_heads=128, head_dim=192, ffn_hidden=18432,
                vocab=129280, max_seq_len=163840, experts=256, experts_per_token=8, moe_ffn_hidden=2048,
                shared_experts=1, dense_layers=(0, 1, 2), router="sigmoid", q_lora_rank=1536, kv_lora_rank=512,
                qk_rope_head_dim=64, v_head_dim=128, source="deepseek-ai/DeepSeek-V3 config.json"),
    ModelConfig(name="gpt-oss-120b", hidden=2880, layers=36, heads=64, kv_heads=8, head_dim=64, ffn_hidden=2880,
                vocab=201088, max_seq_len=131072, sliding_window=128, window_layers=tuple(range(0, 36, 2)),
                attention_sinks=True, experts=128, experts_per_token=4, source="openai/gpt-oss-120b config.json"),
    ModelConfig(name="gpt-3-175b", hidden=12288, layers=96, heads=96, kv_heads=96, head_dim=128,
                ffn_hidden=4 * 12288, vocab=50257, max_seq_len=2048, norm="layernorm", activation="gelu",
                rotary="none", source="Brown et al. 2020, Table 2.1 (GPT-2 tokenizer vocabulary)"),
    # Small enough for a CPU, with GQA and widths that are not powers of two so kernels see odd shapes.
    ModelConfig(name="tiny", hidden=192, layers=2, heads=6, kv_heads=2, head_dim=32, ffn_hidden=520,
                vocab=1000, max_seq_len=512, source=TEST_MODEL),
    # The other choices: LayerNorm, GeGLU, GPT-J's interleaved rotary, full MHA and a sliding window.
    ModelConfig(name="tiny-alt", hidden=160, layers=2, heads=5, kv_heads=5, head_dim=32, ffn_hidden=432,
                vocab=999, max_seq_len=512, norm="layernorm", activation="geglu", rotary="gptj",
                sliding_window=64, source=TEST_MODEL),
    # Quantized weights on a CPU: widths multiples of 128, so int4's groups of 128 divide every K and
    # torch's CPU int4 layout (N a multiple of 16) takes every weight.
    ModelConfig(name="tiny-q", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, ffn_hidden=384,
                vocab=1000, max_seq_len=512, source=TEST_MODEL),
    # A mixture of experts small enough for a CPU: a dense first layer, then routed experts of an odd
    # width beside a shared expert.
    ModelConfig(name="tiny-moe", hidden=192, layers=2, heads=6, kv_heads=2, head_dim=32, ffn_hidden=520, vocab=1000,
                max_seq_len=512, experts=8, experts_per_token=2, moe_ffn_hidden=136, shared_experts=1,
                dense_layers=(0,), source=TEST_MODEL),
    # DeepSeek-V3's layer in small: multi-head latent attention (queries through a low-rank projection,
    # a latent of 80 that is no power of two, a 16-wide rotary key, values narrower than keys) over
    # tiny-moe's experts, so that its smoke cases beside the attention's are tiny-moe's.
    ModelConfig(name="tiny-mla", hidden=192, layers=2, heads=6, kv_heads=6, head_dim=48, ffn_hidden=520, vocab=1000,
                max_seq_len=512, experts=8, experts_per_token=2, moe_ffn_hidden=136, shared_experts=1,
                dense_layers=(0,), q_lora_rank=96, kv_lora_rank=80, qk_rope_head_dim=16,
                v_head_dim=40, source=TEST_MODEL),
    # gpt-oss's attention in small: a window layer and a full layer, attention sinks in both; the rest is tiny's.
    ModelConfig(name="tiny-sink", hidden=192, layers=2, heads=6, kv_heads=2, head_dim=32, ffn_hidden=520,
                vocab=1000, max_seq_len=512, sliding_window=64, window_layers=(0,), attention_sinks=True,
                source=TEST_MODEL),
)}


def get_model(spec: str) -> ModelConfig:
    """A zoo name (case-insensitive) or a path to a Hugging Face config.json (or a folder holding one)."""
    key = spec.strip().lower()
    if key in ZOO:
        return ZOO[key]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        return load_hf_config(path)
    raise ConfigError(f"unknown model {spec!r}: not in the zoo ({', '.join(ZOO)}) and not a config.json path")


# Hugging Face model types whose MLP is gated (gate and up projections, then a GLU).
_GATED_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                "gemma3_text", "phi3", "olmo", "olmo2", "olmoe", "granite", "cohere", "starcoder2_gated",
                "deepseek_v2", "deepseek_v3", "gpt_oss", "llama4_text"}
_GPT2_KEYS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
              "n_positions": "max_position_embeddings", "n_inner": "intermediate_size"}


def load_hf_config(path: str | Path) -> ModelConfig:
    """Read the shape fields of a Hugging Face config.json. Plain JSON only: nothing is fetched or executed."""
    path = Path(path)
    where = f"config {str(path)!r}"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    cfg = dict(raw.get("text_config") or {}, **{k: v for k, v in raw.items() if k != "text_config"})
    model_type = str(cfg.get("model_type", ""))
    gpt2_style = "n_embd" in cfg
    for old, new in _GPT2_KEYS.items():
        if old in cfg and new not in cfg:
            cfg[new] = cfg[old]

    def field(key, default=None):
        value = cfg.get(key)
        if value is None:  # absent, or null as configs write unused fields
            value = default
        if value is None:
            raise ConfigError(f"{where}: missing field '{key}'")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{where}: field '{key}' must be a positive integer, got {value!r}")
        return value

    hidden = field("hidden_size")
    heads = field("num_attention_heads")
    if hidden % heads and "head_dim" not in cfg:
        raise ConfigError(f"{where}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})"
                          " and no head_dim is given")
    act = str(cfg.get("hidden_act", cfg.get("activation_function", "silu")))
    gated = not gpt2_style and (model_type in _GATED_TYPES or model_type == "")
    if gated:
        activation = "geglu" if "gelu" in act else "swiglu"
    else:
        activation = "gelu"
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    layer_types = cfg.get("layer_types")
    window_layers: tuple[int, ...] = ()
    if window and isinstance(layer_types, list):
        window_layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    moe = _moe_fields(cfg, where, field("num_hidden_layers"), model_type)
    mla = {}
    if cfg.get("kv_lora_rank"):  # q_lora_rank may be null: queries projected directly (DeepSeek-V2-Lite)
        mla = {k: field(k) if k != "q_lora_rank" else (field(k) if cfg.get(k) else 0)
               for k in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")}
    head_dim = field("head_dim", hidden // heads)
    if mla:  # MLA: a query/key head is its non-rotary part and its rotary part
        head_dim = field("qk_nope_head_dim") + field("qk_rope_head_dim")
    return ModelConfig(
        name=path.parent.name if path.name == "config.json" and path.parent.name else path.stem,
        hidden=hidden,
        layers=field("num_hidden_layers"),
        heads=heads,
        kv_heads=field("num_key_value_heads", heads),
        head_dim=head_dim,
        ffn_hidden=field("intermediate_size", None if not gpt2_style else 4 * hidden),
        vocab=field("vocab_size"),
        max_seq_len=field("max_position_embeddings", 2048),
        norm="layernorm" if gpt2_style or "layer_norm_eps" in cfg or "layer_norm_epsilon" in cfg else "rmsnorm",
        activation=activation,
        rotary="none" if gpt2_style else ("gptj" if model_type == "gptj" else "neox"),
        sliding_window=int(window or 0),
        window_layers=window_layers,
        attention_sinks=model_type == "gpt_oss",
        **moe,
        **mla,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        source=str(path),
    )



# The names MoE configs give their fields, first match wins.
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts")
_EXPERTS_PER_TOKEN = ("num_experts_per_tok", "experts_per_token", "moe_topk")
_RENORMALISED_BY_DEFAULT = {"mixtral", "gpt_oss", "deepseek_v3", "qwen3_moe"}  # routers that renormalise the top-k


def _moe_fields(cfg: dict, where: str, layers: int, model_type: str) -> dict:
    """The MoE fields of a config under their usual names; a field present but unreadable is named."""
    def number(key: str, minimum: int = 1) -> int:
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{where}: field '{key}' must be an integer >= {minimum}, got {value!r}")
        return value

    experts = next((number(k) for k in _EXPERTS if cfg.get(k) is not None), 1)
    if experts <= 1:
        return {}
    per_token = next((number(k) for k in _EXPERTS_PER_TOKEN if cfg.get(k) is not None), None)
    if per_token is None:
        raise ConfigError(f"{where}: a mixture of {experts} experts, but no field says how many a token uses "
                          f"(looked for {', '.join(_EXPERTS_PER_TOKEN)})")
    out = {"experts": experts, "experts_per_token": per_token}
    if cfg.get("moe_intermediate_size") is not None:
        out["moe_ffn_hidden"] = number("moe_intermediate_size")
    if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE: one shared expert of its own width
        out["shared_experts"], out["shared_ffn_hidden"] = 1, number("shared_expert_intermediate_size")
    elif cfg.get("n_shared_experts"):  # DeepSeek: shared experts of the routed width
        out["shared_experts"] = number("n_shared_experts")
    dense: set[int] = set()
    if cfg.get("first_k_dense_replace"):
        dense.update(range(min(number("first_k_dense_replace", 0), layers)))
    step_key = next((k for k in ("decoder_sparse_step", "moe_layer_freq", "interleave_moe_layer_step")
                     if cfg.get(k) is not None), None)
    if step_key:
        step = number(step_key)
        dense.update(i for i in range(layers) if (i + 1) % step)
    only = cfg.get("mlp_only_layers")
    if only:
        if not isinstance(only, list) or not all(isinstance(i, int) and 0 <= i < layers for i in only):
            raise ConfigError(f"{where}: field 'mlp_only_layers' must list layer indices 0..{layers - 1}, got {only!r}")
        dense.update(only)
    out["dense_layers"] = tuple(sorted(dense))
    scoring = cfg.get("scoring_func", "softmax")
    if scoring not in ROUTERS:
        raise ConfigError(f"{where}: field 'scoring_func' is {scoring!r}; opbench knows {', '.join(ROUTERS)}")
    out["router"] = scoring
    norm = cfg.get("norm_topk_prob")
    out["router_norm"] = bool(norm) if norm is not None else model_type in _RENORMALISED_BY_DEFAULT
    return out
