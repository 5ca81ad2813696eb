"""Workloads: what a model is asked to do (phase, batch, lengths, parallelism, dtype), and their grammar."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from opbench.ops.dtypes import DTYPES, WEIGHT_FORMATS

PHASES = ("prefill", "decode", "train", "finetune")
WORKLOAD_SYNTAX = ("PHASE:b=BATCH,s=LENGTH[,smin=LENGTH][,tp=N][,ep=N][,skew=Z][,r=RANK][,w=FORMAT]"
                   "[,paged=PAGE][,kv=fp8]")  # for help texts


KV_PAGES = (0, 16, 32, 64)  # tokens per page of a paged KV cache (vLLM's block sizes); 0: contiguous
KV_DTYPES = ("", "fp8")  # "": the activations' dtype; fp8: e4m3 with per-head scales


class PlanError(ValueError):
    """A workload that cannot run on a model (bad sizes, a tensor-parallel degree that does not fit)."""


@dataclass(frozen=True)
class Workload:
    phase: str  # prefill | decode | train | finetune (LoRA on frozen weights)
    batch: int  # sequences (train: the micro-batch)
    seq_len: int  # prefill: prompt length; decode: context length incl. the new token; train: sequence length
    tp: int = 1  # tensor-parallel degree
    dtype: str = "bf16"
    lora_rank: int = 16  # finetune only
    min_context: int = 0  # decode only: 0, every context is seq_len; else contexts spread from min_context to seq_len
    # Mixtures of experts. ep > 1: the routed experts are spread over ep GPUs, tokens dispatched to them and
    # combined back by all-to-all; tp still shards attention, so the ep GPUs are ep / tp replicas of the
    # attention, each serving `batch` sequences.
    ep: int = 1
    skew: float = 0.0  # routing imbalance: the Zipf exponent of the experts' popularity; 0 uniform
    # The decoder layers' linear weights: "" in the workload dtype, else a weight format (int8, int4, fp8,
    # fp8-row, fp8-block, nf4); finetune with nf4 is QLoRA
    weights: str = ""
    # The KV cache of inference as a serving stack keeps it: in pages of `paged` tokens that a block
    # table maps (0: one contiguous tensor per sequence), in `kv_dtype` ("": the activations' dtype).
    paged: int = 0
    kv_dtype: str = ""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise PlanError(f"unknown phase {self.phase!r} (known: {', '.join(PHASES)})")
        for name in ("batch", "seq_len", "tp", "lora_rank", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise PlanError(f"workload {name} must be a positive integer, got {value!r}")
        if isinstance(self.skew, bool) or not isinstance(self.skew, (int, float)) or not (
                math.isfinite(self.skew) and self.skew >= 0):
            raise PlanError(f"workload skew must be a number >= 0 (a Zipf exponent; 0 uniform), got {self.skew!r}")
        if self.ep > 1 and self.ep % self.tp:
            raise PlanError(f"ep={self.ep} must be a multiple of tp={self.tp} (the ep GPUs are replicas of the "
                            "tensor-parallel attention)")
        if self.dtype not in DTYPES:
            raise PlanError(f"unknown dtype {self.dtype!r} (known: {', '.join(DTYPES)})")
        if self.weights:
            self._check_weights()
        if self.paged not in KV_PAGES:
            raise PlanError(f"workload paged={self.paged!r}: a page of {', '.join(map(str, KV_PAGES[1:]))} tokens "
                            "(0: a contiguous cache)")
        if self.kv_dtype not in KV_DTYPES:
            raise PlanError(f"workload kv={self.kv_dtype!r}: the KV cache's dtype is one of "
                            f"{', '.join(filter(None, KV_DTYPES))} (or that of the activations)")
        if (self.paged or self.kv_dtype) and self.training:
            raise PlanError(f"paged and kv=: the KV cache of inference; a {self.phase} step keeps none")
        if self.min_context and (self.phase != "decode" or not 0 < self.min_context <= self.seq_len):
            raise PlanError(f"min_context {self.min_context!r}: a decode batch's shortest context, in [1, seq_len]")

    def _check_weights(self) -> None:
        fmt = WEIGHT_FORMATS.get(self.weights)
        if fmt is None:
            raise PlanError(f"unknown weight format {self.weights!r} (known: {', '.join(WEIGHT_FORMATS)})")
        if fmt.activation is not DTYPES[self.dtype]:
            raise PlanError(f"{fmt.name} weights take {fmt.activation.name} activations: the workload dtype must be "
                            f"{fmt.activation.name}, not {self.dtype}")
        if self.phase == "train":
            raise PlanError(f"{fmt.name} weights are frozen: train in a float dtype (finetune with w=nf4 is QLoRA)")
        if self.phase == "finetune" and fmt.codebook is None:
            raise PlanError(f"fine-tuning on quantized frozen weights is QLoRA's NF4 (w=nf4), not {fmt.name}")

    @property
    def label(self) -> str:
        lora = f",r={self.lora_rank}" if self.phase == "finetune" else ""
        spread = f",smin={self.min_context}" if self.min_context else ""
        moe = (f",ep={self.ep}" if self.ep > 1 else "") + (f",skew={self.skew:g}" if self.skew else "")
        weights = f",w={self.weights}" if self.weights else ""
        cache = (f",paged={self.paged}" if self.paged else "") + (f",kv={self.kv_dtype}" if self.kv_dtype else "")
        return f"{self.phase}:b={self.batch},s={self.seq_len}{spread},tp={self.tp}{moe}{lora}{weights}{cache}"

    @property
    def training(self) -> bool:
        return self.phase in ("train", "finetune")

    @property
    def replicas(self) -> int:
        """Copies of the attention serving `batch` sequences each: ep / tp under expert parallelism."""
        return self.ep // self.tp if self.ep > 1 else 1

    @property
    def gpus(self) -> int:
        return self.tp * self.replicas


_WORKLOAD_KEYS = {"b": "batch", "s": "seq_len", "tp": "tp", "r": "lora_rank", "smin": "min_context", "ep": "ep",
                  "skew": "skew", "paged": "paged"}
_NUMBER_KEYS = {"skew"}  # the others are integers, but for the words of _WORD_KEYS
_WORD_KEYS = {"w": "weights", "kv": "kv_dtype"}  # keys whose values are names


def parse_workload(text: str, dtype: str | None = None) -> Workload:
    """'prefill:b=1,s=2048,tp=8'. b: batch, s: prompt / context / sequence length, tp, r: LoRA rank,
    smin: a decode batch's shortest context (contexts spread evenly from smin to s), ep: expert-parallel
    GPUs, skew: the routing's Zipf exponent (0 uniform), w: the linear layers' weight format, paged:
    the KV cache's page in tokens, kv: the KV cache's dtype (fp8)."""
    m = re.fullmatch(r"\s*(\w+)\s*:\s*(.*?)\s*", text)
    if not m:
        raise PlanError(f"workload {text!r}: expected {WORKLOAD_SYNTAX}")
    phase, rest = m.groups()
    values: dict[str, int | float | str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key in _WORD_KEYS:
            values[_WORD_KEYS[key]] = value.strip()
            continue
        if key not in _WORKLOAD_KEYS:
            keys = ", ".join([*_WORKLOAD_KEYS, *_WORD_KEYS])
            raise PlanError(f"workload {text!r}: unknown key {key!r} (keys: {keys})")
        try:
            values[_WORKLOAD_KEYS[key]] = float(value) if key in _NUMBER_KEYS else int(value)
        except ValueError:
            kind = "a number" if key in _NUMBER_KEYS else "an integer"
            raise PlanError(f"workload {text!r}: {key} must be {kind}, got {value.strip()!r}") from None
    missing = [k for k, name in _WORKLOAD_KEYS.items() if k in ("b", "s") and name not in values]
    if missing:
        raise PlanError(f"workload {text!r}: missing {' and '.join(missing)}")
    if dtype is None:  # a weight format brings its activation dtype
        dtype = WEIGHT_FORMATS[values["weights"]].activation.name if values.get("weights") in WEIGHT_FORMATS else "bf16"
    return Workload(phase=phase, dtype=dtype, **values)
