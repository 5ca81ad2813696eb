"""Benchmark cases, one module per op family (run with pytest bench/)."""
