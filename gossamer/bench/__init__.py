"""Benchmarks run by ``gossamer bench <name>``; each prints one JSON object."""
