"""`opbench simulate RUN --model M --rate R`: a serving simulation of one configuration.

Continuous batching with chunked prefill, as vLLM and Sarathi-Serve schedule it: every iteration
spends a token budget, first one token for each sequence that is decoding, then prefill chunks of the
waiting prompts in arrival order. Requests arrive as a Poisson process; prompt and output lengths are
fixed, uniform, or drawn from a file of (prompt, output) pairs. A request is admitted when the KV cache
can hold its prompt and its whole output (no preemption). Iteration times come from the run, composed
once on a grid of token counts, batch sizes and contexts and interpolated in between (the approach of
Vidur, Agrawal et al. 2024, which predicts real serving within 9%).

Deterministic for a seed: arrivals and lengths are drawn once, and the arrival gaps scale with 1/rate,
so that the rate search compares the same requests at every rate.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from opbench.analyze.compose import SOURCES, Breakdown, Composer
from opbench.analyze.estimate import memory
from opbench.analyze.pareto import Slo, SloError, parse_slo
from opbench.analyze.tradeoff import GpuMemory, _gib, gpu_memory, provenance_lines
from opbench.spec.models import ModelConfig, get_model
from opbench.spec.plan import plan
from opbench.spec.workload import PlanError, Workload
from opbench.text import format_seconds, table_lines

SIMULATE_SLO = ("ttft", "tpot", "e2e")
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class ServingConfig:
    tp: int = 1
    dtype: str = "bf16"
    mode: str = "graph"
    max_seqs: int = 256  # sequences in the running batch at once (vLLM's max_num_seqs)
    token_budget: int = 2048  # tokens an iteration processes: decodes first, then prefill chunks
    block_tokens: int = 16  # KV cache paging: a request holds whole blocks

    def __post_init__(self) -> None:
        if self.token_budget < self.max_seqs:
            raise PlanError(f"token budget {self.token_budget} is below max_seqs {self.max_seqs}: a full batch "
                            "of decodes would not fit in one iteration")


@dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


# Iteration times -----------------------------------------------------------------------------------

def _grid(limit: int, *extra: int) -> list[int]:
    """Powers of two up to limit, the limit itself and any extra points (kept within 1..limit)."""
    points = {1, limit, *(e for e in extra if 1 <= e <= limit)}
    n = 2
    while n < limit:
        points.add(n)
        n *= 2
    return sorted(points)


def _lerp(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Linear interpolation on sorted grid points; beyond the ends, the end segment extended."""
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0) if x1 != x0 else ys[i]


def _bilerp(xs: Sequence[int], ys: Sequence[int], table: Sequence[Sequence[float]], x: float, y: float) -> float:
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    lo, hi = _lerp(ys, table[i - 1], y), _lerp(ys, table[i], y)
    x0, x1 = xs[i - 1], xs[i]
    return lo + (hi - lo) * (x - x0) / (x1 - x0) if x1 != x0 else hi


class IterationModel:
    """Iteration time of a mixed batch from grids composed once:

        t = tokenwise(T) + head(k) + decode_attention(D, mean context) + sum of chunk_attention(c, end)

    T tokens in the iteration, k sequences that emit a token, D decoding sequences; every part is a
    sum of the plan's calls (the attention and LM head taken apart, the rest by token count), each
    per layer times the layers where it is a layer call."""

    def __init__(self, composer: Composer, model: ModelConfig, config: ServingConfig, max_context: int,
                 exact_tokens: Sequence[int] = (), exact_contexts: Sequence[int] = ()):
        self.model, self.config = model, config
        self.sources = dict.fromkeys(SOURCES, 0)
        c = config
        # token-wise calls (everything but attention and the LM head) and the LM head, by token count:
        # a decode plan of n sequences at one token of context has exactly a prefill's calls for n tokens
        self.tokens_grid = _grid(c.token_budget, *exact_tokens)
        self.tokenwise_s, self.head_s = [], []
        for n in self.tokens_grid:
            b = self._compose(Workload("decode", n, 1, tp=c.tp, dtype=c.dtype), composer)
            head = sum(x.count * x.time_s for x in b.calls if x.role == "lm_head")
            attn = sum(x.layers * x.count * x.time_s for x in b.calls if x.role == "attn.core")  # every kind's
            self.tokenwise_s.append(b.total_s - head - attn)
            self.head_s.append(head)
        # decode attention: D sequences at a mean context (memory-bound: the keys read)
        self.batch_grid = _grid(c.max_seqs)
        self.context_grid = _grid(max_context, *exact_contexts)
        self.decode_attn_s = [[self._attention(composer, Workload("decode", d, ctx, tp=c.tp, dtype=c.dtype))
                               for ctx in self.context_grid] for d in self.batch_grid]
        # a prefill chunk of q tokens ending at context `end`: the prefill plan's attention at `end`, q queries
        self.chunk_grid = _grid(min(c.token_budget, max_context), *exact_tokens)
        self.chunk_attn_s = [[self._attention(composer, Workload("prefill", 1, max(end, q), tp=c.tp, dtype=c.dtype),
                                              q_len=q) for end in self.context_grid] for q in self.chunk_grid]

    def _compose(self, w: Workload, composer: Composer) -> Breakdown:
        b = composer.compose(plan(self.model, w))
        for k, v in b.sources().items():
            self.sources[k] += v
        return b

    def _attention(self, composer: Composer, w: Workload, q_len: int | None = None) -> float:
        """The attention of every layer: each kind's (a window layer's, a full one's) times its layers."""
        total = 0.0
        for call in (c for c in plan(self.model, w).calls if c.role == "attn.core"):
            shape = call.shape if q_len is None else replace(call.shape, q_len=q_len)
            t, source, _, _ = composer.time(call.op, shape, w.dtype, call.pass_, call.role)
            self.sources[source] += 1
            total += call.layers * call.count * t
        return total

    def iteration_s(self, tokens: int, emitting: int, decoding: int, decode_context_sum: int,
                    chunks: Sequence[tuple[int, int]]) -> float:
        """tokens processed, sequences that emit a token, decoding sequences and the sum of their
        contexts, and the prefill chunks as (tokens, context at the chunk's end)."""
        t = _lerp(self.tokens_grid, self.tokenwise_s, tokens)
        if emitting:
            t += _lerp(self.tokens_grid, self.head_s, emitting)
        if decoding:
            t += _bilerp(self.batch_grid, self.context_grid, self.decode_attn_s, decoding,
                         decode_context_sum / decoding)
        for q, end in chunks:
            t += _bilerp(self.chunk_grid, self.context_grid, self.chunk_attn_s, q, end)
        return t


def kv_capacity_tokens(model: ModelConfig, config: ServingConfig, gpu: GpuMemory) -> int:
    """Tokens of KV cache one GPU holds beside its weights, in whole blocks."""
    one = memory(model, Workload("decode", 1, 1, tp=config.tp, dtype=config.dtype))
    free = gpu.usable_bytes - one.weights_bytes
    if free <= 0:
        raise PlanError(f"{model.name}'s weights at tp={config.tp} {config.dtype} ({_gib(one.weights_bytes)} per GPU) "
                        f"leave no room in {_gib(gpu.usable_bytes)} for a KV cache")
    blocks = int(free // (one.kv_cache_bytes * config.block_tokens))
    return blocks * config.block_tokens


# Workload of requests ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lengths:
    """Prompt and output lengths: fixed, uniform on [lo, hi], or pairs drawn from a list."""
    prompt: tuple[int, int] = (1024, 1024)
    output: tuple[int, int] = (256, 256)
    pairs: tuple[tuple[int, int], ...] = ()  # when given, each request draws one pair (with replacement)
    about: str = ""

    def draw(self, rng: random.Random) -> tuple[int, int]:
        if self.pairs:
            return self.pairs[rng.randrange(len(self.pairs))]
        return rng.randint(*self.prompt), rng.randint(*self.output)

    @property
    def max_total(self) -> int:
        if self.pairs:
            return max(p + o for p, o in self.pairs)
        return self.prompt[1] + self.output[1]

    def describe(self) -> str:
        if self.pairs:
            return self.about or f"{len(self.pairs)} (prompt, output) pairs, drawn with replacement"
        def one(lo, hi):
            return f"{lo}" if lo == hi else f"uniform {lo}..{hi}"
        return f"prompt {one(*self.prompt)} tokens, output {one(*self.output)} tokens"


def parse_range(text: str) -> tuple[int, int]:
    """'1024' or '512:2048' (uniform, both ends included)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", text)
    if not m:
        raise PlanError(f"length {text!r}: expected N or LO:HI")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= lo <= hi:
        raise PlanError(f"length {text!r}: expected 1 <= LO <= HI")
    return lo, hi


def read_pairs(path: str) -> Lengths:
    """A JSON list of [prompt, output] pairs, or text with one 'prompt output' (or 'prompt,output') a line."""
    text = Path(path).read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        raw = [re.split(r"[\s,]+", line.strip()) for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    try:
        pairs = tuple((int(p), int(o)) for p, o in raw)
    except (TypeError, ValueError):
        raise PlanError(f"{path}: expected (prompt, output) pairs of integers, a JSON list or one pair a line") \
            from None
    if not pairs or any(p < 1 or o < 1 for p, o in pairs):
        raise PlanError(f"{path}: no pairs, or a length below 1")
    return Lengths(pairs=pairs, about=f"{len(pairs)} (prompt, output) pairs from {path}, drawn with replacement")


def make_requests(n: int, rate: float, lengths: Lengths, seed: int) -> list[Request]:
    """n Poisson arrivals at `rate` per second. Gaps are unit exponentials over the rate, drawn before
    the lengths, so the same seed gives the same requests at any rate, only spaced differently."""
    rng = random.Random(seed)
    gaps = [rng.expovariate(1.0) for _ in range(n)]
    sizes = [lengths.draw(rng) for _ in range(n)]
    out, now = [], 0.0
    for gap, (p, o) in zip(gaps, sizes):
        now += gap / rate
        out.append(Request(now, p, o))
    return out


# The simulation ------------------------------------------------------------------------------------

@dataclass
class _Live:
    req: Request
    index: int
    blocks: int
    prefilled: int = 0
    generated: int = 0
    first_token_s: float | None = None


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, xs: Sequence[float]) -> Percentiles:
        if not xs:
            return cls(math.nan, math.nan, math.nan, math.nan)
        q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else [xs[0]] * 99
        return cls(q[49], q[89], q[98], statistics.fmean(xs))

    def at(self, percentile: int) -> float:
        return {50: self.p50, 90: self.p90, 99: self.p99}[percentile]


@dataclass(frozen=True)
class SimResult:
    requests: int
    rate_per_s: float
    ttft_s: tuple[float, ...]  # per request, in arrival order
    tpot_s: tuple[float, ...]  # per request with more than one output token
    e2e_s: tuple[float, ...]
    span_s: float  # first arrival to last completion
    iterations: int
    output_tokens: int
    in_system_s: float  # the integral of the number of requests in the system over time
    peak_running: int
    kv_capacity_tokens: int

    @property
    def ttft(self) -> Percentiles:
        return Percentiles.of(self.ttft_s)

    @property
    def tpot(self) -> Percentiles:
        return Percentiles.of(self.tpot_s)

    @property
    def e2e(self) -> Percentiles:
        return Percentiles.of(self.e2e_s)

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.span_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.span_s

    @property
    def mean_in_system(self) -> float:
        """Little's L: the time-average number of requests arrived and not yet finished."""
        return self.in_system_s / self.span_s

    def percentiles(self, name: str) -> Percentiles:
        return {"ttft": self.ttft, "tpot": self.tpot, "e2e": self.e2e}[name]

    def to_dict(self) -> dict:
        return {"requests": self.requests, "rate_per_s": self.rate_per_s, "span_s": self.span_s,
                "iterations": self.iterations, "output_tokens": self.output_tokens,
                "throughput_requests_per_s": self.throughput_rps, "output_tokens_per_s": self.output_tokens_per_s,
                "mean_in_system": self.mean_in_system, "peak_running": self.peak_running,
                "kv_capacity_tokens": self.kv_capacity_tokens,
                **{name: asdict(self.percentiles(name)) for name in SIMULATE_SLO}}


def simulate(requests: Sequence[Request], it: IterationModel, kv_capacity_tokens: int,
             rate_per_s: float = math.nan) -> SimResult:
    """Serve the requests (sorted by arrival) with continuous batching and chunked prefill."""
    cfg = it.config
    blocks_free = kv_capacity_tokens // cfg.block_tokens
    ttft = [math.nan] * len(requests)
    e2e = [math.nan] * len(requests)
    tpot: list[float] = []
    waiting: deque[_Live] = deque()
    running: list[_Live] = []  # admitted, in admission order
    now, nxt, iterations, in_system_s, out_tokens, peak = 0.0, 0, 0, 0.0, 0, 0
    finished = 0
    first_arrival = requests[0].arrival_s if requests else 0.0
    for i, r in enumerate(requests):
        need = -(-(r.prompt_tokens + r.output_tokens) // cfg.block_tokens)
        if need > blocks_free:
            raise PlanError(f"a request of {r.prompt_tokens} + {r.output_tokens} tokens needs more KV cache than the "
                            f"GPU holds ({kv_capacity_tokens} tokens)")
    while finished < len(requests):
        while nxt < len(requests) and requests[nxt].arrival_s <= now:
            r = requests[nxt]
            waiting.append(_Live(r, nxt, -(-(r.prompt_tokens + r.output_tokens) // cfg.block_tokens)))
            nxt += 1
        if not running and not waiting:  # idle until the next arrival
            now = requests[nxt].arrival_s
            continue
        budget = cfg.token_budget
        decoders = [x for x in running if x.prefilled == x.req.prompt_tokens]
        budget -= len(decoders)
        context_sum = sum(x.req.prompt_tokens + x.generated for x in decoders)
        chunks: list[tuple[_Live, int]] = []
        for x in running:  # partly prefilled prompts continue first
            if budget and x.prefilled < x.req.prompt_tokens:
                q = min(budget, x.req.prompt_tokens - x.prefilled)
                chunks.append((x, q))
                budget -= q
        while budget and waiting and len(running) < cfg.max_seqs and waiting[0].blocks <= blocks_free:
            x = waiting.popleft()
            blocks_free -= x.blocks
            running.append(x)
            q = min(budget, x.req.prompt_tokens)
            chunks.append((x, q))
            budget -= q
        peak = max(peak, len(running))
        emitting = len(decoders) + sum(1 for x, q in chunks if x.prefilled + q == x.req.prompt_tokens)
        tokens = cfg.token_budget - budget
        step = it.iteration_s(tokens, emitting, len(decoders), context_sum,
                              [(q, x.prefilled + q) for x, q in chunks])
        in_system_s += step * (len(running) + len(waiting))
        # arrivals during the step are in the system for the part of it after they arrive
        end = now + step
        k = nxt
        while k < len(requests) and requests[k].arrival_s < end:
            in_system_s += end - requests[k].arrival_s
            k += 1
        now = end
        iterations += 1
        done: list[_Live] = []
        for x in decoders:
            x.generated += 1
            out_tokens += 1
            if x.generated == x.req.output_tokens:
                done.append(x)
        for x, q in chunks:
            x.prefilled += q
            if x.prefilled == x.req.prompt_tokens:  # the prompt's last chunk yields the first token
                x.first_token_s = now
                x.generated = 1
                out_tokens += 1
                ttft[x.index] = now - x.req.arrival_s
                if x.req.output_tokens == 1:
                    done.append(x)
        for x in done:
            e2e[x.index] = now - x.req.arrival_s
            if x.req.output_tokens > 1:
                tpot.append((now - x.first_token_s) / (x.req.output_tokens - 1))
            blocks_free += x.blocks
            finished += 1
        if done:
            gone = {id(x) for x in done}
            running = [x for x in running if id(x) not in gone]
    return SimResult(len(requests), rate_per_s, tuple(ttft), tuple(tpot), tuple(e2e), now - first_arrival,
                     iterations, out_tokens, in_system_s, peak, kv_capacity_tokens)


# The rate an SLO allows ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RateSearch:
    slo: Slo
    percentile: int
    best_rate_per_s: float | None  # the highest rate found that meets the SLO; None if even one request alone fails
    at_best: SimResult | None
    binding: str | None  # the limit that fails first above the best rate
    tries: int


def meets(result: SimResult, slo: Slo, percentile: int) -> dict[str, float]:
    """Each limit's figure at the percentile over its limit (at most 1 where it is met)."""
    return {name: result.percentiles(name).at(percentile) / limit for name, limit in slo.limits_s.items()}


def search_rate(run_at, slo: Slo, percentile: int, start_rate: float, rel_tol: float = 0.02,
                most_tries: int = 40) -> RateSearch:
    """The highest arrival rate whose percentile latencies meet the SLO, by doubling then bisection (on
    a log scale). run_at(rate) -> SimResult. Latency grows with the rate for the same requests, so the
    boundary is one crossing."""
    tries = 0

    def ok(rate: float) -> tuple[bool, SimResult, dict[str, float]]:
        nonlocal tries
        tries += 1
        r = run_at(rate)
        use = meets(r, slo, percentile)
        return max(use.values()) <= 1.0, r, use

    lo = start_rate
    good, res, use = ok(lo)
    while not good and tries < most_tries // 2:  # shrink until one rate meets it (requests all but alone)
        lo /= 8
        good, res, use = ok(lo)
        if lo < 1e-9:
            break
    if not good:
        return RateSearch(slo, percentile, None, None, max(use, key=use.get), tries)
    best, best_res, hi, fail_use = lo, res, None, None
    while hi is None and tries < most_tries:
        rate = best * 2
        good, res, use = ok(rate)
        if good:
            best, best_res = rate, res
        else:
            hi, fail_use = rate, use
    while hi is not None and hi / best > 1 + rel_tol and tries < most_tries:
        mid = math.sqrt(best * hi)
        good, res, use = ok(mid)
        if good:
            best, best_res = mid, res
        else:
            hi, fail_use = mid, use
    binding = max(fail_use, key=fail_use.get) if fail_use else None
    return RateSearch(slo, percentile, best, best_res, binding, tries)


# The command ---------------------------------------------------------------------------------------

def assumptions(config: ServingConfig, gpu: GpuMemory, kv_tokens: int, lengths: Lengths, seed: int) -> list[str]:
    return [f"continuous batching with chunked prefill: each iteration spends up to {config.token_budget} tokens, "
            f"one per decoding sequence first, then prefill chunks in arrival order; at most {config.max_seqs} "
            "sequences at once",
            f"KV cache: {kv_tokens} tokens per GPU (blocks of {config.block_tokens}), what {_gib(gpu.usable_bytes)} "
            f"({gpu.source}, 90% usable) holds beside the weights; a request is admitted when its prompt and whole "
            "output fit, and never preempted",
            "iteration time: token-wise calls at the iteration's token count, the LM head per sequence that emits a "
            "token, decode attention at the decoders' mean context, and each prefill chunk's attention; composed "
            "on a grid once and interpolated",
            "no host time between iterations (scheduling, sampling, detokenizing), no network; the first token "
            "comes with the prompt's last chunk",
            f"arrivals: Poisson, seed {seed}; lengths: {lengths.describe()}; all requests counted, warm-up included"]


def _percentile_rows(r: SimResult) -> list[tuple]:
    rows = [("latency", "p50", "p90", "p99", "mean")]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "end-to-end")):
        p = r.percentiles(name)
        rows.append((label, *(format_seconds(v) if v == v else "-" for v in (p.p50, p.p90, p.p99, p.mean))))
    return rows


def add_command(sub) -> None:
    from opbench.analyze import session

    p = sub.add_parser("simulate", help="simulate serving one configuration (continuous batching, chunked "
                                        "prefill, Poisson arrivals) with iteration times composed from a run",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("run", help="a run: pytest bench/ --benchmark-json=FILE")
    session.model_options(p)
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (default 1)")
    p.add_argument("--requests", type=int, default=500, help="requests to serve (default 500)")
    p.add_argument("--seed", type=int, default=0, help="random seed of arrivals and lengths (default 0)")
    p.add_argument("--prompt", type=parse_range, default=(1024, 1024), metavar="N|LO:HI",
                   help="prompt tokens: fixed, or uniform LO:HI (default 1024)")
    p.add_argument("--output", type=parse_range, default=(256, 256), metavar="N|LO:HI",
                   help="output tokens: fixed, or uniform LO:HI (default 256)")
    p.add_argument("--lengths", metavar="FILE", help="(prompt, output) pairs to draw from: a JSON list or one "
                                                     "pair a line; overrides --prompt and --output")
    p.add_argument("--max-seqs", type=int, default=256, help="sequences in the batch at once (default 256)")
    p.add_argument("--token-budget", type=int, default=2048, help="tokens per iteration (default 2048)")
    p.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU (default: the run's GPU, else 80)")
    p.add_argument("--slo", help="find the highest rate meeting it: ttft=DUR,tpot=DUR[,e2e=DUR]")
    p.add_argument("--slo-percentile", type=int, default=90, choices=PERCENTILES,
                   help="the percentile the SLO bounds (default 90)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_command)


def _command(args) -> int:
    from opbench.analyze import session

    started = time.perf_counter()
    if args.weights:  # the serving configurations carry no weight format yet
        raise PlanError(f"--weights {args.weights}: `opbench simulate` composes weights in --dtype only; "
                        "`opbench estimate` and `opbench idealized` take a weight format")
    run, composer = session.composer_from_args(args)
    model = get_model(args.model)
    config = ServingConfig(args.tp, args.dtype, args.mode, args.max_seqs, args.token_budget)
    lengths = read_pairs(args.lengths) if args.lengths else Lengths(args.prompt, args.output)
    if lengths.max_total > model.max_seq_len:
        raise PlanError(f"prompt + output up to {lengths.max_total} tokens exceed {model.name}'s max_seq_len "
                        f"{model.max_seq_len}")
    slo = parse_slo(args.slo, SIMULATE_SLO) if args.slo else None
    if args.requests < 1 or args.rate <= 0:
        raise SloError("--requests must be at least 1 and --rate above 0")
    gpu = gpu_memory(run, args.gpu_memory_gib)
    kv_tokens = kv_capacity_tokens(model, config, gpu)
    it = IterationModel(composer, model, config, lengths.max_total)

    def run_at(rate: float) -> SimResult:
        return simulate(make_requests(args.requests, rate, lengths, args.seed), it, kv_tokens, rate)

    result = run_at(args.rate)
    search = search_rate(run_at, slo, args.slo_percentile, args.rate) if slo else None
    wall_s = time.perf_counter() - started
    said = assumptions(config, gpu, kv_tokens, lengths, args.seed)
    provenance = provenance_lines(run, composer, it.sources)
    if args.json:
        out = {"model": model.name, "config": asdict(config), "run": str(run.path), "provenance": provenance,
               "assumptions": said, "result": result.to_dict(), "wall_s": wall_s}
        if search:
            out["slo"] = {"slo_s": slo.limits_s, "percentile": search.percentile,
                          "highest_rate_per_s": search.best_rate_per_s, "binding": search.binding,
                          "at_highest": search.at_best.to_dict() if search.at_best else None, "tries": search.tries}
        json.dump(out, sys.stdout, indent=1)
        print()
        return 0
    lines = [f"opbench simulate: {model.name} at tp={config.tp} {config.dtype} {config.mode}, {args.requests} requests "
             f"at {args.rate:g}/s"]
    lines += ["  " + s for s in provenance]
    lines += ["  assumed: " + s for s in said]
    lines.append(f"simulated {format_seconds(result.span_s)} of serving in {result.iterations} iterations; at most "
                 f"{result.peak_running} sequences running (modeled, from the composition above):")
    lines += table_lines(_percentile_rows(result), indent="  ")
    gpus = config.tp
    lines.append(f"  throughput {result.throughput_rps:.4g} requests/s ({args.rate:g}/s offered), "
                 f"{result.output_tokens_per_s:.4g} output tokens/s ({result.output_tokens_per_s / gpus:.4g} per GPU)")
    if result.throughput_rps < 0.9 * args.rate:
        lines.append(f"  overloaded: it serves {result.throughput_rps:.4g} of the {args.rate:g} requests/s offered, "
                     "so the queue grows for the whole run and the latencies grow with --requests")
    lines.append(f"  Little's law: mean requests in the system {result.mean_in_system:.4g}; completion rate x mean "
                 f"end-to-end {result.throughput_rps * result.e2e.mean:.4g}")
    if search:
        lines.append(f"SLO {slo} at p{search.percentile}:")
        if search.best_rate_per_s is None:
            lines.append(f"  no rate meets it: even requests arriving all but alone fail on {search.binding}")
        else:
            r = search.at_best
            got = ", ".join(f"{k} p{search.percentile} {format_seconds(r.percentiles(k).at(search.percentile))}"
                            for k in slo.limits_s)
            lines.append(f"  highest rate that meets it: {search.best_rate_per_s:.4g} requests/s ({got}); above it "
                         f"{search.binding} fails first ({search.tries} simulations)")
    lines.append(f"wall time {wall_s:.2f} s")
    print("\n".join(lines))
    return 0
