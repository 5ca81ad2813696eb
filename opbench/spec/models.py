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


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden: int  # d_model
    layers: int
    heads: int  # query heads
    kv_heads: int  # key/value heads (== heads: MHA, 1: MQA, between: GQA)
    head_dim: int
    ffn_hidden: int  # MLP intermediate width (per expert for MoE)
    vocab: int
    max_seq_len: int
    norm: str = "rmsnorm"
    activation: str = "swiglu"  # swiglu/geglu are gated: gate and up projections fused
    rotary: str = "neox"  # rotary layout; "none" for learned absolute positions
    sliding_window: int = 0  # 0: full attention
    experts: int = 1  # MoE experts per layer; 1 for a dense MLP
    experts_per_token: int = 1
    tied_embeddings: bool = False
    source: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        for f in ("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn_hidden", "vocab", "max_seq_len",
                  "experts", "experts_per_token"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model {self.name!r}: {f} must be a positive integer, got {value!r}")
        if self.sliding_window < 0:
            raise ConfigError(f"model {self.name!r}: sliding_window must be >= 0, got {self.sliding_window}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"model {self.name!r}: heads ({self.heads}) is not a multiple of kv_heads ({self.kv_heads})")
        if self.experts_per_token > self.experts:
            raise ConfigError(f"model {self.name!r}: experts_per_token ({self.experts_per_token}) > experts ({self.experts})")
        for f, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("rotary", ROTARY)):
            if getattr(self, f) not in allowed:
                raise ConfigError(f"model {self.name!r}: {f} must be one of {', '.join(allowed)}, got {getattr(self, f)!r}")

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def params_per_layer(self) -> int:
        """Weights of one decoder layer (projections, norms), biases ignored."""
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        mlp = self.experts * (3 if self.gated else 2) * self.hidden * self.ffn_hidden
        router = self.hidden * self.experts if self.experts > 1 else 0
        return attn + mlp + router + 2 * self.hidden

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.params_per_layer + embed + self.hidden


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
                "gemma3_text", "phi3", "olmo", "olmo2", "granite", "cohere", "starcoder2_gated"}
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
    experts = cfg.get("num_local_experts", cfg.get("num_experts")) or 1
    return ModelConfig(
        name=path.parent.name if path.name == "config.json" and path.parent.name else path.stem,
        hidden=hidden,
        layers=field("num_hidden_layers"),
        heads=heads,
        kv_heads=field("num_key_value_heads", heads),
        head_dim=field("head_dim", hidden // heads),
        ffn_hidden=field("intermediate_size", None if not gpt2_style else 4 * hidden),
        vocab=field("vocab_size"),
        max_seq_len=field("max_position_embeddings", 2048),
        norm="layernorm" if gpt2_style or "layer_norm_eps" in cfg or "layer_norm_epsilon" in cfg else "rmsnorm",
        activation=activation,
        rotary="none" if gpt2_style else ("gptj" if model_type == "gptj" else "neox"),
        sliding_window=int(window or 0),
        experts=int(experts),
        experts_per_token=int(cfg.get("num_experts_per_tok", 1) if experts > 1 else 1),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        source=str(path),
    )

