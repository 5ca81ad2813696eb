"""Profiles and the selection of a run: which models, workloads, dtypes and backends, on which device."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from opbench.ops import FAMILIES, get_family
from opbench.ops.backends import backend_filter
from opbench.ops.collective import is_collective
from opbench.ops.dtypes import get_dtype
from opbench.spec.models import ConfigError, ModelConfig, get_model
from opbench.spec.workload import PlanError, parse_workload
from opbench.spec.plan import Plan, plan


@dataclass(frozen=True)
class Profile:
    name: str
    pairs: tuple[tuple[str, str], ...]  # (model, workload) pairs
    dtypes: tuple[str, ...]
    budget_s: float  # timing budget per case
    min_rounds: int
    about: str
    model_dtypes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # models run in other dtypes
    collective_max_bytes: int = 2**30  # the collectives' sweep runs from 1 KiB to this, doubling


# Sized to finish within 10 minutes on an H100 with cold caches (opbench.measure.cost estimates it):
# Llama-3-8B's prompt is as long as its training sequence, so the prefill's calls are the training
# step's forward calls, measured once; batched decoding is Llama-3-70B's at tp 8, with uniform and
# with mixed contexts (a serving batch), which differ in their attention calls only.
_LLAMA3_8B = ("prefill:b=1,s=4096", "decode:b=1,s=2048", "train:b=1,s=4096")
_LLAMA3_70B_TP8 = ("prefill:b=1,s=2048,tp=8", "decode:b=32,s=2048,tp=8", "decode:b=32,s=2048,smin=128,tp=8")
_FULL_WORKLOADS = ("prefill:b=1,s=512", "prefill:b=1,s=2048", "prefill:b=4,s=4096",
                   "decode:b=1,s=2048", "decode:b=16,s=4096", "decode:b=64,s=2048",
                   "train:b=1,s=4096", "finetune:b=1,s=2048,r=16")
_FULL_MODELS = {"llama-2-7b": 1, "llama-2-70b": 8, "llama-3-8b": 1, "llama-3-70b": 8, "mistral-7b": 1,
                "mixtral-8x7b": 2, "llama-3.1-405b": 8, "gpt-3-175b": 8}  # model: tensor-parallel degree

PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("smoke", tuple(("tiny", w) for w in ("prefill:b=2,s=96", "decode:b=4,s=200", "decode:b=4,s=200,smin=40",
                                                 "train:b=2,s=96"))
            + (("tiny-alt", "train:b=2,s=96"), ("tiny-alt", "decode:b=2,s=150"))
            # a dense layer and a MoE layer; expert parallelism over two GPUs with skewed routing gives
            # the collectives run its uneven all-to-all
            + tuple(("tiny-moe", w) for w in ("prefill:b=2,s=96", "decode:b=4,s=200", "train:b=2,s=96",
                                              "decode:b=4,s=200,ep=2,skew=1.2"))
            # weight-only int8 and int4 beside bf16 (torch's CPU packed kernels), composed into decode
            # and prefill estimates with their memory
            + tuple(("tiny-q", w) for w in ("prefill:b=2,s=96", "decode:b=4,s=200", "decode:b=4,s=200,w=int8",
                                            "decode:b=4,s=200,w=int4", "prefill:b=2,s=96,w=int4"))
            # serving-era attention: a paged cache, an fp8 cache; MLA prefill and absorbed decode (contiguous,
            # and paged in FlashMLA's 64-token pages with an fp8 cache); sinks over a window and a full layer.
            # Shapes as tiny's and tiny-moe's, so that few cases beside the attention's are new.
            + tuple(("tiny", w) for w in ("decode:b=4,s=200,paged=16", "decode:b=4,s=200,kv=fp8"))
            + tuple(("tiny-mla", w) for w in ("prefill:b=2,s=96", "decode:b=4,s=200",
                                              "decode:b=4,s=200,paged=64,kv=fp8"))
            + tuple(("tiny-sink", w) for w in ("prefill:b=2,s=96", "decode:b=4,s=200")),
            ("fp32", "bf16"), budget_s=0.02, min_rounds=3,
            about="the tiny models, fast on a CPU: checks that every case runs", collective_max_bytes=2**15,
            # fp16 rather than bf16: torch's CPU LayerNorm backward accumulates the bf16 weight
            # gradient in bf16 (1.3% off), which the correctness gate rightly fails
            model_dtypes={"tiny-alt": ("fp32", "fp16"), "tiny-q": ("bf16",), "tiny-mla": ("fp32",),
                          "tiny-sink": ("fp32",)}),
    Profile("default",
            tuple(("llama-3-8b", w) for w in _LLAMA3_8B) + tuple(("llama-3-70b", w) for w in _LLAMA3_70B_TP8),
            ("bf16",), budget_s=0.2, min_rounds=5,
            about="Llama-3-8B and Llama-3-70B at tp 8, realistic batches and lengths, bf16"),
    Profile("serving",
            tuple(("llama-3-8b", w) for w in ("decode:b=32,s=4096", "decode:b=32,s=4096,paged=16",
                                              "decode:b=32,s=4096,paged=16,kv=fp8"))
            + tuple(("deepseek-v3", w) for w in ("prefill:b=1,s=4096,ep=8", "decode:b=64,s=8192,ep=8",
                                                 "decode:b=64,s=8192,ep=8,paged=64")),
            ("bf16",), budget_s=0.2, min_rounds=5,
            about="serving-era attention on a GPU: Llama-3-8B decode at b=32 s=4096 over a contiguous, a paged and "
                  "a paged fp8 cache; DeepSeek-V3's MLA prefill and absorbed decode, contiguous and in FlashMLA's "
                  "64-token pages (bench/test_attention.py bench/test_paged_attention.py bench/test_mla_decode.py "
                  "for the attention alone)"),
    Profile("full",
            tuple((m, f"{w},tp={tp}") for m, tp in _FULL_MODELS.items() for w in _FULL_WORKLOADS
                  if not (m == "gpt-3-175b" and "s=4096" in w)),
            ("bf16", "fp16", "fp32", "tf32", "fp8"), budget_s=1.0, min_rounds=5,
            about="the zoo at several batches and lengths, every dtype"),
)}


class SelectionError(ValueError):
    pass


@dataclass(frozen=True)
class Selection:
    profile: Profile
    device: str
    plans: tuple[Plan, ...]
    dtypes: tuple[str, ...]
    backends: tuple[str, ...] | None  # patterns of opbench.ops.backends; None: every backend

    def allows(self, backend: str) -> bool:
        return backend_filter(self.backends)(backend)

    def unserved(self) -> dict[str, tuple[str, ...]]:
        """The ops the plans call (fused kernels included) that the backend patterns leave without a
        backend, each with the backends it has. Collectives are left aside: their backend is the
        process group the device implies."""
        ops = dict.fromkeys(c.op for p in self.plans for c in p.all_calls if not is_collective(c.op))
        backends = {op: tuple(get_family(op).backends) for op in ops}
        return {op: names for op, names in backends.items() if not any(map(self.allows, names))}


def quantized(text: str) -> bool:
    """Whether a workload names a weight format (w=), whose activation dtype is then the workload's."""
    return bool(parse_workload(text).weights)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def select(*, profile: str | None, device: str, models: list[str] | None = None,
           workloads: list[str] | None = None, dtypes: list[str] | None = None,
           backends: list[str] | None = None) -> Selection:
    """Build the run's plans. The profile supplies whatever is not given: given models take the
    profile's workloads, given workloads run on the profile's models."""
    if profile is None:
        profile = "default" if device == "cuda" else "smoke"
    if profile not in PROFILES:
        raise SelectionError(f"unknown profile {profile!r} (known: {', '.join(PROFILES)})")
    prof = PROFILES[profile]
    try:
        given_dtypes = tuple(dict.fromkeys(_split(dtypes)))
        for d in given_dtypes:
            get_dtype(d)
        model_names = _split(models)
        workload_texts = list(workloads or ())
        workload_texts_given = bool(workload_texts)
        if model_names or workload_texts:
            model_names = model_names or list(dict.fromkeys(m for m, _ in prof.pairs))
            workload_texts = workload_texts or list(dict.fromkeys(w for _, w in prof.pairs))
            pairs = [(m, w) for m in model_names for w in workload_texts]
        else:
            pairs = list(prof.pairs)
        configs: dict[str, ModelConfig] = {}
        plans = []
        for model_name, text in pairs:
            model = configs.setdefault(model_name, get_model(model_name))
            for d in given_dtypes or prof.model_dtypes.get(model_name, prof.dtypes):
                w = parse_workload(text) if quantized(text) else parse_workload(text, d)
                if w.ep > 1 and not model.moe and not workload_texts_given:
                    continue  # a profile's expert-parallel workload is for its mixtures of experts
                if w.weights and (w.dtype != d or model.moe):
                    if workload_texts_given:  # the format's activation dtype, or an unplannable model: say so
                        parse_workload(text, d) if w.dtype != d else plan(model, w)
                    continue  # a profile's quantized workload runs once, in its format's activation dtype
                plans.append(plan(model, w))
    except (ConfigError, PlanError, ValueError) as error:
        raise SelectionError(str(error)) from None
    return Selection(prof, device, tuple(plans), tuple(dict.fromkeys(p.workload.dtype for p in plans)),
                     tuple(_split(backends)) or None)


def measure_command(plans: Iterable[Plan], ops: Iterable[str], backends: Iterable[str] = ()) -> str:
    """One pytest command that measures `ops` at every call the plans make of them: the ops' bench
    modules (bench/test_OP.py), the plans' models, workloads and dtypes, and the backend patterns."""
    plans = list(plans)
    modules = [f"bench/test_{op}.py" for op in dict.fromkeys(ops) if op in FAMILIES and not is_collective(op)]
    options = [f"--model {m}" for m in dict.fromkeys(p.model.name for p in plans)]
    options += [f"--workload {w}" for w in dict.fromkeys(p.workload.label for p in plans)]
    options.append(f"--dtype {','.join(dict.fromkeys(p.workload.dtype for p in plans))}")
    if backends:
        options.append(f"--backend {','.join(backends)}")
    return " ".join(["pytest", *modules, *options])
