"""Benchmarks; each prints one JSON object (see README.md)."""
