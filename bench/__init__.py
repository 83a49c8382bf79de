"""Benchmarks of ccs_fast; run as ``python -m bench.<name>`` from the repository root."""
