"""The reference layer means what the plan means: its rotary agrees with the rotary family's formula,
and a decode step over the KV cache gives what prefill gives for the same last token."""

import pytest
import torch

from opbench.spec.models import ZOO
from opbench.ops.rotary import rotary_formula
from opbench.measure.reference_layer import ReferenceLayer, _rotate, kv_cache, rope_tables
from opbench.spec.workload import Workload


@pytest.mark.parametrize("model", ["tiny", "tiny-alt"])  # half rotation, interleaved
def test_rotary_matches_the_rotary_family(model):
    cfg = ZOO[model]
    positions = torch.arange(7, 12)
    q = torch.randn(5, 3, cfg.head_dim, dtype=torch.float64)  # (tokens, heads, head_dim)
    cos, sin = rope_tables(cfg, positions, torch.float64)
    ours = _rotate(q, cos[:, None, :], sin[:, None, :], cfg.rotary == "gptj")
    exponents = -torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim
    half = torch.outer(torch.arange(12, dtype=torch.float64), 10000.0 ** exponents)
    theirs, _ = rotary_formula(q, q, half.cos(), half.sin(), positions, cfg.rotary == "gptj")
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("model, seq", [("tiny", 37), ("tiny-alt", 90)])  # tiny-alt: past its 64-token window
def test_a_decode_step_equals_the_last_row_of_prefill(model, seq):
    cfg = ZOO[model]
    torch.manual_seed(0)
    layer = ReferenceLayer(cfg).double()
    x = torch.randn(2, seq, cfg.hidden, dtype=torch.float64)
    prefill = Workload("prefill", 2, seq)
    cache = kv_cache(cfg, prefill, torch.float64, "cpu")
    full = layer(x, rope_tables(cfg, torch.arange(seq), torch.float64), cache)
    # the cache now holds every position's K and V; decode recomputes the last one and attends all
    decode_cache = tuple(c.clone() for c in cache)
    step = layer(x[:, -1:], rope_tables(cfg, torch.tensor([seq - 1]), torch.float64), decode_cache)
    torch.testing.assert_close(step, full[:, -1:])
    torch.testing.assert_close(decode_cache, cache)
