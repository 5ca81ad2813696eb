"""The seeded routing draw, and routing, permutation and un-permutation round-tripping exactly."""

import pytest
import torch

from opbench.ops import routing
from opbench.ops.dtypes import get_dtype
from opbench.ops.moe_permute import MOE_PERMUTE, PermuteShape, permute, row_map, unpermute_sum
from opbench.ops.moe_route import MOE_ROUTE, RouteShape, route
from opbench.ops.moe_unpermute import MOE_UNPERMUTE, combine


# The draw ----------------------------------------------------------------------------------------------

def test_the_draw_is_seeded_distinct_per_token_and_ragged():
    ids = routing.draw(64, 128, 8)
    assert ids.shape == (64, 8) and ids.dtype == torch.int64
    assert torch.equal(ids, routing.draw(64, 128, 8))  # the same draw every time
    assert not torch.equal(ids, routing.draw(64, 128, 8, seed=1))
    assert all(len(set(row.tolist())) == 8 for row in ids)  # a token's experts are distinct
    counts = routing.counts(64, 128, 8)
    assert sum(counts) == 64 * 8 and len(counts) == 128
    assert 0 in counts and max(counts) > 64 * 8 / 128  # ragged: empty experts and loaded ones


def test_a_larger_draw_begins_with_the_smaller_one():
    """Chunks are seeded by their index, so a draw does not depend on how it is chunked."""
    small, large = routing.draw(100, 16, 2), routing.draw(routing._CHUNK_TOKENS + 100, 16, 2)
    assert torch.equal(large[:100], small)


def test_skew_concentrates_the_tokens_on_few_experts():
    uniform, skewed = routing.counts(4096, 64, 4), routing.counts(4096, 64, 4, skew_milli=1200)
    assert max(uniform) < 1.3 * 4096 * 4 / 64
    assert max(skewed) > 3 * max(uniform)
    assert sorted(skewed)[:8] < sorted(uniform)[:8]
    # the hot experts are a seeded permutation's, not the first ones
    assert skewed.index(max(skewed)) == routing._popularity(64, 0, 1200).argmax().item()


def test_route_logits_choose_the_draws_experts_without_ties():
    logits = routing.distinct_logits(50, 128, 0, 700)
    for dtype in ("bf16", "fp16", "fp32"):
        cast = logits.to(get_dtype(dtype).torch)
        assert torch.equal(cast.double(), logits)  # exact in every dtype
        assert all(len(set(row.tolist())) == 128 for row in cast)  # no two scores of a token tie
        assert torch.equal(route(cast, 8, False, True)[1], routing.draw(50, 128, 8, skew_milli=700))


# Expert parallelism ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, experts, top_k, ep, skew", [(4, 8, 2, 2, 1200), (64, 128, 8, 8, 0),
                                                               (3, 16, 4, 4, 0), (33, 60, 6, 6, 2000)])
def test_all_to_all_splits_sum_and_agree_across_ranks(tokens, experts, top_k, ep, skew):
    rows = routing.ep_splits(tokens, experts, top_k, ep, skew_milli=skew)
    assert all(sum(r) == tokens * top_k for r in rows)  # each rank sends each of its copies once
    every = routing.counts(tokens * ep, experts, top_k, skew_milli=skew)
    per = experts // ep
    for j in range(ep):  # what rank j receives is what its experts were routed
        assert sum(rows[r][j] for r in range(ep)) == sum(every[j * per:(j + 1) * per])
    # rank r's send split to j is rank j's receive split from r: the alltoallv inputs agree
    from opbench.ops.collective import AllToAllVShape, split_rows
    shape = AllToAllVShape(tokens, 7, experts, top_k, ep, skew_milli=skew)
    assert split_rows(shape) == rows
    busiest = routing.busiest_rank(tokens, experts, top_k, ep, skew_milli=skew)
    local = routing.local_counts(tokens, experts, top_k, ep, skew_milli=skew)
    assert sum(local) == max(sum(col) for col in zip(*rows)) == sum(rows[r][busiest] for r in range(ep))


def test_uneven_all_to_all_references_are_what_each_rank_receives():
    """The pattern of every rank's send buffer, simulated in one process, against each rank's reference."""
    from opbench.ops.collective import AllToAllVShape, alltoallv_bytes, alltoallv_reference, pattern, split_rows

    shape = AllToAllVShape(tokens=5, hidden=3, experts=6, top_k=2, world=3, skew_milli=1500)
    rows, h = split_rows(shape), shape.hidden
    sends = [pattern(r, 0, shape.tokens * shape.top_k * h, torch.float64, "cpu") for r in range(3)]
    for rank in range(3):
        received = torch.cat([sends[j][sum(rows[j][:rank]) * h:sum(rows[j][:rank + 1]) * h] for j in range(3)])
        inp = {"rank": rank, "rows": rows, "hidden": h, "send": sends[rank]}
        assert torch.equal(alltoallv_reference(inp, None, "fwd"), received)
    busiest = max(max(map(sum, rows)), max(map(sum, zip(*rows))))
    assert alltoallv_bytes(shape, get_dtype("bf16")) == busiest * h * 2


# Round trips ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_permutation_and_unpermutation_round_trip_exactly(dtype):
    t, e, k, h = 7, 9, 3, 20  # expert 6 gets no token, expert 4 a single one
    x = torch.randn(t, h).to(get_dtype(dtype).torch)
    ids = routing.draw(t, e, k, skew_milli=1000)
    xs, row_of, offs = permute(x, ids, e)
    counts = torch.bincount(ids.flatten(), minlength=e)
    assert torch.equal(offs, counts.cumsum(0).to(torch.int32)) and (counts == 0).any()
    for expert in range(e):  # each expert's run holds exactly its tokens, in token order
        run = xs[offs[expert] - counts[expert]:offs[expert]]
        tokens = torch.nonzero((ids == expert).any(dim=1)).flatten()
        assert torch.equal(run, x[tokens])
    assert torch.equal(xs[row_of].view(t, k, h), x.unsqueeze(1).expand(t, k, h))  # every copy is its token
    assert torch.equal(row_of, row_map(ids))
    # one-hot weights un-permute each token exactly; the sum of the copies is k times the token
    one_hot = torch.zeros(t, k)
    one_hot[:, 1] = 1
    assert torch.equal(combine(xs, row_of, one_hot), x)
    assert torch.equal(unpermute_sum(xs.float(), row_of, k), k * x.float())


def test_routing_round_trips_through_the_experts_to_the_weighted_sum():
    """Experts that scale their rows by (expert + 1): the output is the weighted sum of those scales."""
    t, e, k, h = 29, 8, 2, 16
    logits = routing.distinct_logits(t, e, 3, 0)
    weights, ids = route(logits, k, False, True)
    assert torch.allclose(weights.sum(dim=1), torch.ones(t))
    assert torch.equal(ids, routing.draw(t, e, k, seed=3))
    x = torch.randn(t, h, dtype=torch.float64)
    xs, row_of, offs = permute(x, ids, e)
    expert_of_row = torch.repeat_interleave(torch.arange(e), torch.diff(offs, prepend=offs.new_zeros(1)).long())
    out = combine(xs * (expert_of_row + 1).unsqueeze(1), row_of, weights.double())
    assert torch.allclose(out, x * (weights.double() * (ids + 1)).sum(dim=1, keepdim=True), atol=1e-12)


@pytest.mark.parametrize("family, shape", [
    (MOE_ROUTE, RouteShape(23, 12, 3, 0, 1, skew_milli=900)),
    (MOE_ROUTE, RouteShape(23, 12, 3, 1, 0)),  # sigmoid scores, kept as they are
    (MOE_PERMUTE, PermuteShape(23, 12, 3, 40, skew_milli=900)),
    (MOE_UNPERMUTE, PermuteShape(23, 12, 3, 40, skew_milli=900)),
])
@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_torch_backends_pass_their_gate(family, shape, pass_, dtype):
    from opbench.measure.gate import check

    d = get_dtype(dtype)
    torch.manual_seed(0)
    inp = family.inputs(shape, d, pass_, "cpu")
    verdict = check(family.backends["torch"].prepare(inp, d, pass_)(), family.reference(inp, d, pass_), d.tol)
    assert verdict.passed, verdict
