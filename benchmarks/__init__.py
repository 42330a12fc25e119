"""Benchmarks of captum-gradmask: ``python -m benchmarks.run`` (see docs/benchmarks.md)."""
