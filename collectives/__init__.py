"""Collective cases (all-reduce, all-gather, reduce-scatter, all-to-all) under torchrun: not yet measured.

The plan already lists the tensor-parallel all-reduces (op "allreduce"); their cases land here.
"""
