"""Benchmarks: each writes JSON (environment, settings, medians and spread) under runs/bench/<topic>/."""
