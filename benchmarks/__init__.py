"""Benchmarks for comfysync; run with `python -m benchmarks.sync`."""
