"""The seeded routing draw that every mixture-of-experts shape derives its per-expert token counts from.

A shape of the MoE families holds only ints (tokens, experts, top_k, seed, skew_milli and, where a
group of GPUs matters, ep); the ragged counts follow from them deterministically, so a case id stays
short and a run's JSON can rebuild every shape.

The draw: expert e is chosen with probability proportional to (1 + its popularity rank)^-skew (Zipf;
skew 0 is uniform), the popularity ranks a seeded permutation of the experts, so that the hot experts
land on any expert-parallel rank rather than always on the first. Each token takes top_k distinct
experts, drawn without replacement in proportion to those probabilities by Gumbel top-k (the top_k of
log p + Gumbel noise; Kool et al. 2019, "Stochastic Beams and Where to Find Them"). At small batches
and with skew, some experts receive no token, as in real runs.

Under expert parallelism the ep ranks each bring `tokens` tokens (rank r the r-th block of the draw)
and hold experts/ep consecutive experts; a layer waits for its busiest rank, so the per-GPU shapes are
that rank's.
"""

from __future__ import annotations

from functools import lru_cache

import torch

ROUTING_SEED = 0  # the seed plans use: one draw per (tokens, experts, top_k, skew), shared by every MoE layer
_CHUNK_TOKENS = 4096  # the draw runs in chunks, so a large group never holds tokens x experts scores at once


def skew_milli(skew: float) -> int:
    """A workload's Zipf exponent as the integer the shapes hold."""
    return round(1000 * skew)


def _popularity(experts: int, seed: int, skew_milli: int) -> torch.Tensor:
    """log p of each expert, unnormalised: -skew log(1 + rank), ranks a seeded permutation."""
    rank = torch.randperm(experts, generator=torch.Generator().manual_seed(seed))
    return -(skew_milli / 1000) * torch.log1p(rank.to(torch.float64))


def scores(tokens: int, experts: int, seed: int, skew_milli: int, first_chunk: int = 0) -> torch.Tensor:
    """(tokens, experts) float64: log p + Gumbel noise; a token's experts are its top_k scores.
    Chunk c of the draw is seeded by (seed, c), so the result does not depend on the chunking."""
    logp = _popularity(experts, seed, skew_milli)
    parts = []
    for c, start in enumerate(range(0, tokens, _CHUNK_TOKENS), start=first_chunk):
        n = min(_CHUNK_TOKENS, tokens - start)
        g = torch.Generator().manual_seed(seed * 1_000_003 + c + 1)
        u = torch.rand(n, experts, generator=g, dtype=torch.float64)
        parts.append(logp - torch.log(-torch.log(u)))  # u = 0 gives -inf: never chosen, never NaN
    return torch.cat(parts) if parts else torch.empty(0, experts, dtype=torch.float64)


@lru_cache(maxsize=16)
def _draw(tokens: int, experts: int, top_k: int, seed: int, skew_milli: int) -> torch.Tensor:
    chunks = [scores(min(_CHUNK_TOKENS, tokens - start), experts, seed, skew_milli, first_chunk=c).topk(top_k).indices
              for c, start in enumerate(range(0, tokens, _CHUNK_TOKENS))]
    return torch.cat(chunks) if chunks else torch.empty(0, top_k, dtype=torch.int64)


def draw(tokens: int, experts: int, top_k: int, seed: int = ROUTING_SEED, skew_milli: int = 0) -> torch.Tensor:
    """(tokens, top_k) int64 expert ids, each row distinct experts in decreasing score."""
    if not 0 < top_k <= experts:
        raise ValueError(f"top_k {top_k} must be in 1..{experts} (the experts)")
    return _draw(tokens, experts, top_k, seed, skew_milli).clone()


def counts(tokens: int, experts: int, top_k: int, seed: int = ROUTING_SEED, skew_milli: int = 0) -> tuple[int, ...]:
    """Tokens per expert over the whole draw (they sum to tokens x top_k)."""
    ids = _draw(tokens, experts, top_k, seed, skew_milli)
    return tuple(torch.bincount(ids.flatten(), minlength=experts).tolist())


def ep_splits(tokens: int, experts: int, top_k: int, ep: int, seed: int = ROUTING_SEED,
              skew_milli: int = 0) -> tuple[tuple[int, ...], ...]:
    """rows[r][j]: the token copies rank r sends to rank j in the dispatch all-to-all (each of the ep
    ranks brings `tokens` tokens; rank j holds experts j*E/ep .. (j+1)*E/ep - 1). Row r sums to
    tokens x top_k; column j is what rank j's experts receive."""
    if experts % ep:
        raise ValueError(f"ep={ep} does not divide {experts} experts")
    ids = _draw(tokens * ep, experts, top_k, seed, skew_milli)
    dest = (ids // (experts // ep)).view(ep, tokens * top_k)
    return tuple(tuple(torch.bincount(dest[r], minlength=ep).tolist()) for r in range(ep))


def busiest_rank(tokens: int, experts: int, top_k: int, ep: int, seed: int = ROUTING_SEED, skew_milli: int = 0) -> int:
    """The rank whose experts receive the most token copies (the lowest such rank on a tie)."""
    rows = ep_splits(tokens, experts, top_k, ep, seed, skew_milli)
    received = [sum(rows[r][j] for r in range(ep)) for j in range(ep)]
    return received.index(max(received))


def local_counts(tokens: int, experts: int, top_k: int, ep: int = 1, seed: int = ROUTING_SEED,
                 skew_milli: int = 0) -> tuple[int, ...]:
    """Token copies per expert of the busiest rank's experts: what its grouped GEMM multiplies
    (ep 1: every expert, tokens x top_k rows in all)."""
    every = counts(tokens * ep, experts, top_k, seed, skew_milli)
    if ep == 1:
        return every
    per = experts // ep
    r = busiest_rank(tokens, experts, top_k, ep, seed, skew_milli)
    return every[r * per:(r + 1) * per]


def offsets(per_expert: tuple[int, ...], device="cpu") -> torch.Tensor:
    """int32 cumulative ends of the experts' row ranges, as grouped GEMMs take them."""
    return torch.tensor(per_expert, dtype=torch.int64, device=device).cumsum(0).to(torch.int32)


def distinct_logits(tokens: int, experts: int, seed: int, skew_milli: int) -> torch.Tensor:
    """(tokens, experts) float64 router logits whose order is the draw's, evenly spaced by 1/8 so that
    they are exact and distinct in every dtype the cases run in (no tie for a top-k to break)."""
    s = scores(tokens, experts, seed, skew_milli)
    rank = s.argsort(dim=1).argsort(dim=1)
    return (rank - experts // 2).to(torch.float64) / 8


def moe_id(s, *dims: int) -> str:
    """'t64-e128top8-ep8-1536x2048-zipf1.2': tokens, experts and top-k, ep, the dims, skew and seed
    where they are not the defaults."""
    text = f"t{s.tokens}-e{s.experts}top{s.top_k}"
    if getattr(s, "ep", 1) > 1:
        text += f"-ep{s.ep}"
    if dims:
        text += "-" + "x".join(map(str, dims))
    if s.skew_milli:
        text += f"-zipf{s.skew_milli / 1000:g}"
    if s.seed != ROUTING_SEED:
        text += f"-seed{s.seed}"
    return text


def describe_counts(per_expert: tuple[int, ...]) -> str:
    """'rows per expert 3 0 5 ... (max 5, mean 2.7, 1 empty)'."""
    mean = sum(per_expert) / len(per_expert)
    empty = sum(1 for c in per_expert if c == 0)
    return (f"rows per expert {' '.join(map(str, per_expert))} (max {max(per_expert)}, mean {mean:.3g}, "
            f"{empty} empty)")
