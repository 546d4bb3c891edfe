"""Benchmarks: each measures psq side by side with its reference in the same run."""
