"""Benchmarks of grun_fast (run from the repository root: `python -m bench ...`)."""
