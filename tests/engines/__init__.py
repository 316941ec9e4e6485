"""Checks of the exports with the real engines, each in an environment its script creates (check_vllm.py)."""
