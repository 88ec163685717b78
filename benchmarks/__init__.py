"""Benchmarks, run from the repository root: `python -m benchmarks.cpu` and `python -m benchmarks.gpu`."""
