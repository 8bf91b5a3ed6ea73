"""Benchmarks and the demo driver (not part of the installed package)."""
