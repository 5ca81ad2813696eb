"""What a run costs on a GPU, estimated before it starts, and what it cost, summed after it ran.

Estimate: every case pays its setup (the gate, input copies, warm-up, calibration, capture, and,
for compiled and autotuned backends, compilation and autotuning with cold caches) and its timing
(the profile's budget, or its fewest rounds of a long call). Calls are priced at a quarter of an
H100 SXM's datasheet rates, a pessimistic share (a ceiling is ~80% of it, an unfused attention far
less); the allowances below are cold-cache figures for an H100, to be checked against the `setup_s`
a GPU run records per case.

Spent: each record's `setup_s` (from the case's start to its first timed round) and `timing_s`
(its rounds and energy window), summed into the end-of-run line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

H100_FLOPS = {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 495e12, "fp32": 67e12}  # dense
H100_BYTES_PER_S = 3.35e12
EFFICIENCY = 0.25  # share of the datasheet rates a call is assumed to reach
CASE_OVERHEAD_S = 0.3  # gate, input copies, warm-up, host time, calibration, capture, pytest's bookkeeping
UNTIMED_CALLS = 8  # calls of a case outside its rounds: gate, warm-up, host time, probe, launch timing
# Once per run: the CUDA context, cuBLAS/cuDNN handles, inductor's imports and compile workers,
# Triton's first compile, collection and planning.
RUN_OVERHEAD_S = 30.0

# Cold-cache setup of one case beyond CASE_OVERHEAD_S, by backend (and by op where a backend name
# means different work in different families). torch.compile at a new static shape: dynamo's trace,
# AOT autograd, inductor's codegen and the Triton compiles of the forward (and backward) kernels.
# Autotuned Triton kernels: every config benchmarked at each new shape (Triton's do_bench: 25 ms of
# warm-up and 100 ms of repetitions, ~0.15 s a config), and every config compiled once per
# specialization (divisibility of sizes and strides: a handful per kernel), a compile of the matmul
# kernel for sm90 taking 2 to 5 s on a 2-core CPU, about 1 s on a GPU server's. Plain Triton kernels:
# a JIT compile now and then.
SETUP_ALLOWANCE_S = {
    "compile": 4.0,
    "flex": 15.0,  # FlexAttention's templates, forward and backward, compiled per shape and mask
    ("gemm", "triton"): 3.5,  # 11 configs: 1.7 s of benchmarks a shape, ~60 s of compiles over ~35 shapes
    ("attention", "triton"): 3.5,  # 7 forward configs, 4 + 4 backward
    ("attention", "triton-decode"): 1.5,  # 4 configs
    ("wgemm", "triton"): 3.5,  # 20 decode configs (split-K) or 5 prefill configs a shape, each format compiled apart
    ("scaled_gemm", "triton"): 2.0,  # 8 configs, fewer where the scales' K groups prune them
    ("paged_attention", "triton-paged"): 1.5,  # 4 configs
    ("mla_decode", "triton-mla"): 1.5,  # 4 configs
    "triton": 0.5,
    "flash-attn": 0.5,  # its Triton norms (autotuned over warps) and rotary
}


@dataclass(frozen=True)
class CaseCost:
    id: str
    setup_s: float
    timing_s: float


def setup_allowance_s(op: str, backend: str) -> float:
    """Cold-cache compile and autotune time of one case of `op` by `backend` (0 for library calls)."""
    return SETUP_ALLOWANCE_S.get((op, backend), SETUP_ALLOWANCE_S.get(backend, 0.0))


def call_s(flops: int, nbytes: int, dtype: str) -> float:
    """One call at EFFICIENCY of an H100's rates: the slower of its compute and its memory traffic."""
    rate = H100_FLOPS.get(dtype, H100_FLOPS["fp32"])
    return max(flops / (EFFICIENCY * rate), nbytes / (EFFICIENCY * H100_BYTES_PER_S))


def case_cost(case_id: str, seconds_per_call: float, budget_s: float, min_rounds: int,
              allowance_s: float = 0.0) -> CaseCost:
    """A case's setup (overhead, its untimed calls, its backend's allowance) and timing (the budget,
    or its fewest rounds of one call each where a call outlasts budget / min_rounds)."""
    return CaseCost(case_id, CASE_OVERHEAD_S + UNTIMED_CALLS * seconds_per_call + allowance_s,
                    max(budget_s, min_rounds * seconds_per_call))


@dataclass(frozen=True)
class RunCost:
    cases: tuple[CaseCost, ...]
    fixed_s: float = RUN_OVERHEAD_S

    @property
    def setup_s(self) -> float:
        return self.fixed_s + sum(c.setup_s for c in self.cases)

    @property
    def timing_s(self) -> float:
        return sum(c.timing_s for c in self.cases)

    @property
    def total_s(self) -> float:
        return self.setup_s + self.timing_s


@dataclass
class Spent:
    """What the cases of a run spent, from their records: setup and timing, summed."""
    cases: int = 0
    setup_s: float = 0.0
    timing_s: float = 0.0

    def add(self, setup_s: float | None, timing_s: float | None) -> None:
        if setup_s is None and timing_s is None:
            return
        self.cases += 1
        self.setup_s += setup_s or 0.0
        self.timing_s += timing_s or 0.0

    def line(self) -> str:
        return (f"setup (compile, autotune) {self.setup_s:.1f} s, timing {self.timing_s:.1f} s "
                f"over {self.cases} cases")


def spent(infos: Iterable[dict]) -> Spent:
    """The sums over records written as extra_info (dicts with setup_s and timing_s)."""
    total = Spent()
    for info in infos:
        total.add(info.get("setup_s"), info.get("timing_s"))
    return total
