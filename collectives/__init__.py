"""Collective cases (all-reduce, all-gather, reduce-scatter, all-to-all, broadcast), run under torchrun."""
