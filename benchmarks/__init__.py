"""Benchmarks and the arena's baselines (not part of the ``frontier_trainer`` product API)."""
