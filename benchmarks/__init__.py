"""Benchmarks run by hand (speed) and the efficacy experiments (``benchmarks.efficacy``)."""
